"""Rendering and tokenizing batches of conversations, in this process or in worker processes.

Kept out of the format_dataset stage script because worker processes import what they run by
module name (a stage script runs as Snakemake's __main__, which they must not import).

Parallelism is one kind: ``threads`` light worker processes, each rendering with the portable
template renderer (families.TemplateRenderer) and tokenizing with the tokenizer's Rust backend,
the tokenizer's own thread pool off. Rendering is Python, so threads would serialise on it; a
process per core renders and tokenizes in parallel (1.26x as fast as one process with the
tokenizer's threads, measured), and without torch or transformers' model code loaded a worker
costs ~120-250 MB (see the README's "Data at scale")."""

import contextlib
import json
import logging
import multiprocessing
import os
import pickle
import sys
import types
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyarrow as pa

from workflow_scripts.data import sources
from workflow_scripts.models.families import ChatFormatter
from workflow_scripts.stage import StageError

log = logging.getLogger("snaketune.format_dataset")

TRAIN_SCHEMA = pa.schema(
    [
        ("messages", pa.string()),
        ("prompt_text", pa.string()),
        ("completion_text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_length", pa.int64()),
        ("meta", pa.string()),
    ]
)
TEST_SCHEMA = pa.schema(
    [
        ("messages", pa.string()),
        ("prompt_text", pa.string()),
        ("prompt_length", pa.int64()),
        ("query", pa.string()),
        ("reference", pa.string()),
        ("target", pa.string()),
        ("meta", pa.string()),
    ]
)
# Batches handed to the workers ahead of the one being written: enough to keep every worker busy,
# few enough that memory stays a handful of batches.
AHEAD_PER_WORKER = 2
# Rows the worker processes' rendering and tokenization are checked on against the tokenizer's own
# before any is used (a template whose output the portable renderer does not reproduce stays local).
PROBE_ROWS = 256
# Splits of at most this many batches per thread format in the stage's own process: starting the
# workers (~1 s each, and a process that loads the model's tokenizer) would outlast the work.
IN_PROCESS_BATCHES = 2


def render_example(formatter: ChatFormatter, messages: list[dict]) -> tuple[str, str]:
    """(prompt_text, completion_text) of a conversation whose last message is the assistant's."""
    prompt = formatter.render(messages[:-1], add_generation_prompt=True)
    full = formatter.render(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise StageError(
            "format_dataset: the chat template renders the prompt differently inside the full conversation "
            f"(prompt {prompt[-80:]!r} is not a prefix of the conversation); training and evaluation would "
            "see different prompts. Use a prefix-consistent template (model.fallback_chat_template)."
        )
    return prompt, full[len(prompt) :]


def tokenize(tok, texts: list[str]) -> list[list[int]]:
    # The chat template already writes any BOS; adding special tokens would double it.
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def primed_backend(tok):
    """A fast tokenizer's Rust tokenizer after one call through ``tok`` has set its state (no
    truncation or padding, its special-token splitting): ``encode_batch_fast`` on it gives the ids
    ``tokenize`` gives, without offsets (faster) and without transformers (a light worker). None
    for a slow tokenizer."""
    backend = getattr(tok, "_tokenizer", None)
    if not hasattr(backend, "encode_batch_fast"):
        return None
    tokenize(tok, [""])
    return backend


class Formatter:
    """Formats one batch of preprocessed rows: ``chat.render`` renders (a ChatFormatter, or its
    portable TemplateRenderer), ``encode`` tokenizes a list of texts."""

    def __init__(self, chat, encode, max_length: int, overlength: str):
        self.chat, self.encode = chat, encode
        self.max_length, self.overlength = max_length, overlength

    def train_batch(self, rows: list[dict]) -> tuple[pa.RecordBatch, list[int], dict]:
        """(formatted rows kept, every row's token length before any cut, overlength counts)."""
        prompts, completions = zip(*(render_example(self.chat, r["messages"]) for r in rows), strict=True)
        prompt_ids, completion_ids = self.encode(list(prompts)), self.encode(list(completions))
        counts = {"over_max_length": 0, "dropped": 0, "truncated": 0}
        lengths, kept = [], []
        for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            n = len(p_ids) + len(c_ids)
            lengths.append(n)
            if n > self.max_length:
                counts["over_max_length"] += 1
                # A prompt that alone fills max_length leaves no token to learn from: always drop it.
                if self.overlength == "drop" or len(p_ids) >= self.max_length:
                    counts["dropped"] += 1
                    continue
                c_ids = c_ids[: self.max_length - len(p_ids)]
                counts["truncated"] += 1
            kept.append((i, p_ids + c_ids, len(p_ids)))
        columns = {
            "messages": [json.dumps(rows[i]["messages"], ensure_ascii=False) for i, _, _ in kept],
            "prompt_text": [prompts[i] for i, _, _ in kept],
            "completion_text": [completions[i] for i, _, _ in kept],
            "input_ids": [ids for _, ids, _ in kept],
            "prompt_length": [n for _, _, n in kept],
            "meta": [rows[i]["meta"] for i, _, _ in kept],
        }
        return pa.RecordBatch.from_pydict(columns, schema=TRAIN_SCHEMA), lengths, counts

    def test_batch(self, rows: list[dict]) -> tuple[pa.RecordBatch, list[int], dict]:
        prompts = [self.chat.render(r["messages"], add_generation_prompt=True) for r in rows]
        lengths = [len(ids) for ids in self.encode(prompts)]
        columns = {
            "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in rows],
            "prompt_text": prompts,
            "prompt_length": lengths,
            **{c: [r[c] for r in rows] for c in ("query", "reference", "target", "meta")},
        }
        return pa.RecordBatch.from_pydict(columns, schema=TEST_SCHEMA), lengths, {}

    def work(self, task: tuple[str, list[dict]]):
        split, rows = task
        return self.test_batch(rows) if split == "test" else self.train_batch(rows)


def _encoder(backend):
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def full_formatter(model_dir: str, max_length: int, overlength: str, template_kwargs: dict) -> Formatter:
    """The model's own chat template owner and tokenizer (loads transformers and torch)."""
    from workflow_scripts.models.loading import load_chat_formatter, load_tokenizer

    chat = load_chat_formatter(model_dir, template_kwargs)
    return Formatter(chat, TokenizerEncoder(load_tokenizer(model_dir)), max_length, overlength)


def check_template_renders(chat: ChatFormatter, model_dir: str, probe: list[dict]) -> None:
    """The template renders the first conversation, or one line naming why: several templates
    refuse a system message (Gemma 2, Mistral's) with a Jinja exception, never a traceback."""
    from jinja2.exceptions import TemplateError

    if not probe:
        return
    messages = probe[0]["messages"]
    try:
        render_example(chat, messages)
    except TemplateError as exc:
        roles = "/".join(m["role"] for m in messages)
        fix = ""
        if any(m["role"] == "system" for m in messages):
            fix = (
                "; this template takes no system message: put the system prompt into the first user "
                'message in messages_format.messages (e.g. `{role: user, content: "{system_prompt}\\n\\n'
                '{question}"}`) and drop the system message'
            )
        raise StageError(
            f"format_dataset: the chat template of {model_dir} refuses a {roles} conversation "
            f"({type(exc).__name__}: {exc}){fix}"
        ) from None


def prepare_light(model_dir: str, max_length: int, overlength: str, template_kwargs: dict, probe: list[dict]):
    """(renderer, tokenizer backend, None), or (None, None, why not): the light formatter's parts,
    checked on ``probe`` rows to format exactly as the model's own template owner and tokenizer
    call do (``tokenize``), after the trip to another process (pickled). Run in a short-lived
    process, so the stage's own process never loads torch."""
    full = full_formatter(model_dir, max_length, overlength, template_kwargs)
    check_template_renders(full.chat, model_dir, probe)
    renderer, backend = full.chat.portable(), full.encode.backend
    if renderer is None:
        return None, None, "the chat template belongs to a processor"
    if backend is None:
        return None, None, "the tokenizer is not a fast tokenizer"
    renderer, backend = pickle.loads(pickle.dumps((renderer, backend)))  # as a worker receives them
    try:
        light = Formatter(renderer, _encoder(backend), max_length, overlength).train_batch(probe)
    except Exception as exc:  # noqa: BLE001 - any failure of the portable path means: use the model's own
        return None, None, f"the portable rendering failed ({type(exc).__name__}: {exc})"
    if _batches_differ(_work_on(full, ("train", probe)), light):
        return (
            None,
            None,
            "the portable rendering or tokenization differs from the model's own on the first rows",
        )
    return renderer, backend, None


_WORKER: Formatter | None = None


def _start_worker(renderer, backend, max_length: int, overlength: str) -> None:
    global _WORKER
    # One kind of parallelism: the processes. A tokenizer thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Formatter(renderer, _encoder(backend), max_length, overlength)


def _work(task: tuple[str, list[dict]]):
    return _work_on(_WORKER, task)


def _work_on(formatter: Formatter, task: tuple[str, list[dict]]):
    try:
        return formatter.work(task)
    except StageError:
        raise
    except Exception as exc:  # any error crosses back to the stage as one picklable line
        raise StageError(
            f"format_dataset: formatting a {task[0]} batch failed: {type(exc).__name__}: {exc}"
        ) from None


def _ready() -> int:
    return os.getpid()


class Workers:
    """Batches formatted by the light formatter (the portable template renderer and the Rust
    tokenizer: no torch, no transformers model code) in ``threads`` worker processes. Data of at most
    ``threads`` x IN_PROCESS_BATCHES batches formats in this process instead (starting workers
    would take longer than the work), and so does everything with threads 1. Where the light
    formatter cannot reproduce the model's own (a processor-owned template, a slow tokenizer, a
    rendering that differs on the first rows), the model's own formats in this process, with a
    warning saying why. Results come back in the order the batches went in, with at most
    AHEAD_PER_WORKER batches per worker outstanding; a worker that dies (killed, out of memory)
    ends the stage with one line, never a hang."""

    def __init__(self, threads: int, model_dir: str, fmt: dict, probe: list[dict], rows: int):
        self.pool, ctx = None, multiprocessing.get_context("spawn")  # fork would copy threads' locks
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one kind of parallelism: the processes
        in_process = threads <= 1 or rows <= threads * IN_PROCESS_BATCHES * sources.BATCH_ROWS
        max_length, overlength = fmt["max_length"], fmt["overlength"]
        template_kwargs = fmt.get("chat_template_kwargs") or {}
        setup = (model_dir, max_length, overlength, template_kwargs, probe)
        if in_process:  # no need to keep torch out of this process
            renderer, backend, why = prepare_light(*setup)
        else:  # checked in a process of its own, so this one never loads torch
            with _main_not_rerun(), ProcessPoolExecutor(1, mp_context=ctx) as helper:
                renderer, backend, why = _result(helper.submit(prepare_light, *setup))
        if why:
            log.warning("format_dataset: formatting in one process with the model's own tokenizer (%s)", why)
            full = full_formatter(model_dir, max_length, overlength, template_kwargs)
            self.local, self.mode = full, f"1 process ({why})"
        elif in_process:
            self.local, self.mode = (
                Formatter(renderer, _encoder(backend), max_length, overlength),
                "1 process",
            )
        else:
            init = (renderer, backend, max_length, overlength)
            self.pool = ProcessPoolExecutor(threads, mp_context=ctx, initializer=_start_worker, initargs=init)
            with _main_not_rerun():  # every worker starts now, while the stand-in main is in place
                for ready in [self.pool.submit(_ready) for _ in range(threads)]:
                    _result(ready)
            self.ahead, self.mode = threads * AHEAD_PER_WORKER, f"{threads} worker processes"

    def map(self, tasks):
        if self.pool is None:
            yield from (_work_on(self.local, task) for task in tasks)
            return
        pending = deque()
        for task in tasks:
            pending.append(self.pool.submit(_work, task))
            if len(pending) >= self.ahead:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise StageError(
            "format_dataset: a worker process died or could not start (killed, out of memory?); lower "
            "resources.threads or give the rule more memory, then re-run"
        ) from None


@contextlib.contextmanager
def _main_not_rerun():
    """A spawned process runs the parent's main module again unless it has no file; under Snakemake
    that is the rule's generated script (the whole stage, and Snakemake's imports). The workers need
    only this module, so they start while __main__ is an empty stand-in."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _batches_differ(a, b) -> bool:
    return not (a[0].equals(b[0]) and a[1] == b[1] and a[2] == b[2])


class TokenizerEncoder:
    """``tokenize`` with the model's own tokenizer; its primed Rust backend (or None) beside it,
    for the light formatter."""

    def __init__(self, tok):
        self.tok = tok
        self.backend = primed_backend(tok)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return tokenize(self.tok, texts)
