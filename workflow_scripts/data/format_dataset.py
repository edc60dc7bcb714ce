"""Stage 3: render conversations with the base model's chat template and tokenize them.

The prompt is rendered with ``add_generation_prompt=True`` and the completion is the rest
of the rendered conversation, so the tokens a model is trained on after the prompt are
exactly the tokens it must generate at evaluation (which reads the same ``prompt_text``).
``input_ids = prompt_ids + completion_ids`` (int32); the loss covers ``input_ids[prompt_length:]``
(the collator makes the labels).

Streams: each split is read a batch at a time; each batch is rendered (each chat once, its
prompt once) and tokenized in one batched call, by ``threads`` worker processes, each with the
tokenizer's own thread pool off (rendering is Python, so only processes run it in parallel; see
the README's "Data at scale"). Batches are written in order as they come back: the split's
parquet (for people and evaluation) and, for train/validation, the token file training
memory-maps (`tokens.py`). Token-length statistics are kept as counts, exact at any size.
"""

import contextlib
import json
import logging
import multiprocessing
import os
from collections import deque
from pathlib import Path

import pyarrow as pa

from workflow_scripts.data.streams import LengthCounts, ParquetSink, Progress, batches_of
from workflow_scripts.data.tokens import TokensWriter
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.models.families import ChatFormatter
from workflow_scripts.models.loading import load_chat_formatter, load_tokenizer
from workflow_scripts.stage import Job, StageError, snakemake_main

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
    """Token ids of each text, as ``tok(texts, add_special_tokens=False)["input_ids"]`` gives them.

    The chat template already writes any BOS; adding special tokens would double it. A fast
    tokenizer's Rust backend is called directly (``encode_batch_fast``: no offsets computed,
    ~30% faster) once a first call through the tokenizer has set its state (no truncation or
    padding, its special-token splitting)."""
    if not texts:
        return []
    backend = getattr(tok, "_tokenizer", None)
    if not hasattr(backend, "encode_batch_fast") or not getattr(tok, "_snaketune_primed", False):
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        if hasattr(backend, "encode_batch_fast"):
            tok._snaketune_primed = True
        return ids
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


class Formatter:
    """Formats one batch of preprocessed rows (in a worker process, or in the stage's own)."""

    def __init__(self, model_dir: str, max_length: int, overlength: str):
        self.chat = load_chat_formatter(model_dir)
        self.tok = load_tokenizer(model_dir)
        self.max_length, self.overlength = max_length, overlength

    def train_batch(self, rows: list[dict]) -> tuple[pa.RecordBatch, list[int], dict]:
        """(formatted rows kept, every row's token length before any cut, overlength counts)."""
        prompts, completions = zip(*(render_example(self.chat, r["messages"]) for r in rows), strict=True)
        prompt_ids, completion_ids = tokenize(self.tok, list(prompts)), tokenize(self.tok, list(completions))
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
        lengths = [len(ids) for ids in tokenize(self.tok, prompts)]
        columns = {
            "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in rows],
            "prompt_text": prompts,
            "prompt_length": lengths,
            **{c: [r[c] for r in rows] for c in ("query", "reference", "target", "meta")},
        }
        return pa.RecordBatch.from_pydict(columns, schema=TEST_SCHEMA), lengths, {}


_WORKER: Formatter | None = None


def _start_worker(model_dir: str, max_length: int, overlength: str) -> None:
    global _WORKER
    # One kind of parallelism: the processes. A tokenizer thread pool per worker would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Formatter(model_dir, max_length, overlength)


def _work(task: tuple[str, list[dict]]):
    split, rows = task
    return _WORKER.test_batch(rows) if split == "test" else _WORKER.train_batch(rows)


class Workers:
    """``threads`` worker processes, or the stage's own process when threads is 1; results come
    back in the order the batches went in, with at most AHEAD_PER_WORKER batches per worker out."""

    def __init__(self, threads: int, *init_args):
        self.pool = None
        if threads > 1:
            # spawn: a fork would copy the parent's tokenizer threads' locks
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(threads, initializer=_start_worker, initargs=init_args)
            self.ahead = threads * AHEAD_PER_WORKER
        else:
            _start_worker(*init_args)

    def map(self, tasks):
        if self.pool is None:
            yield from map(_work, tasks)
            return
        pending = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(_work, (task,)))
            if len(pending) >= self.ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def format_split(workers: Workers, split: str, job: Job, fmt: dict) -> dict:
    """Format one split into its outputs; its statistics."""
    lengths, counts, rows_in = (
        LengthCounts(),
        dict.fromkeys(("over_max_length", "dropped", "truncated"), 0),
        0,
    )
    progress = Progress(f"format_dataset: {split}")
    schema = TEST_SCHEMA if split == "test" else TRAIN_SCHEMA
    tokens_path = job.output.get(f"{split}_tokens")
    with (
        ParquetSink(job.output[split], schema) as sink,
        atomic_path(tokens_path) if tokens_path else contextlib.nullcontext() as tmp,
    ):
        tokens = TokensWriter(tmp) if tokens_path else None
        for rows, (batch, batch_lengths, batch_counts) in _paired(
            batches_of(job.input[split]), lambda rows: workers.map((split, r) for r in rows)
        ):
            rows_in += rows
            sink.write(batch)
            lengths.add(batch_lengths)
            for k, v in batch_counts.items():
                counts[k] += v
            if tokens:
                tokens.write(batch.column("input_ids"), batch.column("prompt_length"))
            progress.update(rows)
        if tokens:
            tokens.close()
        if split == "test":
            if not rows_in:
                raise StageError(f"format_dataset: the test split {job.input.test} is empty")
            stats = {"rows": sink.rows, "prompt_tokens": lengths.summary()}
        else:
            stats = {**counts, "tokens": lengths.summary(), "rows": sink.rows}
            if not sink.rows:
                raise StageError(
                    f"training.max_length: all {rows_in} {split} rows are longer than {fmt['max_length']} "
                    f"tokens ({stats['tokens']}); raise training.max_length or set training.overlength: truncate"
                )
    progress.done()
    return stats


def _paired(batches, mapper):
    """(rows in the batch, the mapper's result for it), batches read lazily as the mapper asks."""
    sizes = deque()

    def counted():
        for rows in batches:
            sizes.append(len(rows))
            yield rows

    for result in mapper(counted()):
        yield sizes.popleft(), result


def run(job: Job) -> dict:
    fmt, model_dir = job.params.format, str(job.input.model_dir)
    manifest_path = Path(model_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    stats = {"max_length": fmt["max_length"], "overlength": fmt["overlength"]}
    stats["chat_template"] = manifest.get("chat_template", "model")
    workers = Workers(max(1, int(job.threads)), model_dir, fmt["max_length"], fmt["overlength"])
    try:
        for split in ("train", "validation", "test"):
            stats[split] = format_split(workers, split, job, fmt)
    finally:
        workers.close()
    write_json(job.output.stats, stats)
    log.info("formatted: %s", {s: stats[s]["rows"] for s in ("train", "validation", "test")})
    return stats


if "snakemake" in globals():
    snakemake_main(snakemake, run)
