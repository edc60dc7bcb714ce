"""Talk to a fine-tuned model: a deployment model folder or a GGUF file, as it was trained.

    python -m workflow_scripts.chat results/default/deployment_model        # interactive
    snaketune-chat results/default/export/smollm2-135m-instruct-default-q8_0.gguf
    echo "What was the revenue in 2019?" | snaketune-chat results/default/deployment_model
    snaketune-chat results/default/deployment_model --prompt "What was the revenue in 2019?"

The prompt is built the way training and evaluation built it, from the experiment's own
artifacts, never retyped: the chat template is the model's (the deployment model keeps the
training template; a GGUF file carries it in its metadata), and the system prompt, any fixed
turns before the question and the text around the question come from the experiment's
formatted test split (found through ``results/{experiment}/experiment.json``, next to the
model). Decoding follows the experiment's evaluation (greedy, its max_new_tokens), so a
piped question gets the answer the evaluation recorded for it. Tokens are printed as they are
generated. Interactive commands: /reset (forget the conversation), /exit (or Ctrl-D).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROG = "snaketune-chat"
# where an experiment's test split is when it has no experiment.json (a copied results folder)
TEST_SPLITS = ("dataset/formatted/test.parquet", "dataset/preprocessed/test.jsonl")
EVALUATION = "evaluation/finetuned_model_evaluation.json"
DEFAULT_MAX_NEW_TOKENS = 512


class ChatError(Exception):
    """A user-facing error, printed as one line."""


@dataclass
class Decoding:
    """How answers are decoded: the evaluation's settings unless told otherwise."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class PromptFormat:
    """How a question becomes the conversation the model was trained on."""

    context: list[dict] = field(default_factory=list)  # turns before the question (the system prompt)
    user_prefix: str = ""  # text the user template puts around the question
    user_suffix: str = ""
    source: str | None = None  # the artifact it was read from

    @property
    def system_prompt(self) -> str | None:
        return next((m["content"] for m in self.context if m["role"] == "system"), None)

    def user_message(self, text: str) -> dict:
        return {"role": "user", "content": f"{self.user_prefix}{text}{self.user_suffix}"}


def _test_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path, columns=["messages", "query"])
        return [
            {"messages": json.loads(m), "query": q}
            for m, q in zip(frame["messages"], frame["query"], strict=True)
        ]
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def find_test_split(experiment_dir: Path) -> Path | None:
    """The experiment's test split: where its experiment.json says the formatted (or preprocessed)
    data is (paths relative to the workflow folder), else inside the experiment folder."""
    index = experiment_dir / "experiment.json"
    if index.is_file():
        artifacts = json.loads(index.read_text())
        own = Path(
            (artifacts.get("own") or {}).get("evaluation") or f"results/{experiment_dir.name}/evaluation"
        )
        depth = len(own.parent.parts)  # results/{experiment} -> 2: the workflow folder is 2 levels up
        root = experiment_dir.resolve().parents[depth - 1] if depth else experiment_dir.resolve()
        shared = artifacts.get("shared") or {}
        for key, name in (("formatted", "test.parquet"), ("preprocessed", "test.jsonl")):
            if shared.get(key) and (root / shared[key] / name).is_file():
                return root / shared[key] / name
    return next((experiment_dir / p for p in TEST_SPLITS if (experiment_dir / p).is_file()), None)


def prompt_format(experiment_dir: Path) -> PromptFormat:
    """The prompt format of the experiment's test prompts (see prompt_format_of)."""
    return prompt_format_of(find_test_split(experiment_dir))


def prompt_format_of(path: Path | None) -> PromptFormat:
    """The prompt format of the test prompts in ``path``: the turns before the last user message
    (equal in every row) and the text the user template writes around the question."""
    if path is None:
        return PromptFormat()
    path = Path(path)
    rows = [r for r in _test_rows(path) if r.get("messages") and r["messages"][-1]["role"] == "user"]
    if not rows:
        return PromptFormat(source=str(path))
    contexts = [r["messages"][:-1] for r in rows]
    context = contexts[0] if all(c == contexts[0] for c in contexts) else []
    if not context:  # turns differ per row: keep only a system prompt they share
        systems = {json.dumps(c[0]) for c in contexts if c and c[0]["role"] == "system"}
        context = [json.loads(systems.pop())] if len(systems) == 1 and all(c for c in contexts) else []
    wraps = set()
    for r in rows:
        content, query = r["messages"][-1]["content"], r.get("query") or ""
        at = content.find(query) if query else -1
        wraps.add((content[:at], content[at + len(query) :]) if at >= 0 else None)
    prefix, suffix = wraps.pop() if len(wraps) == 1 and None not in wraps else ("", "")
    return PromptFormat(context=context, user_prefix=prefix, user_suffix=suffix, source=str(path))


def find_experiment(model_path: Path) -> Path | None:
    """results/{experiment}/ of a deployment model folder or of an export/*.gguf file."""
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / "experiment.json").is_file() or find_test_split(folder) is not None:
            return folder
    return None


def generation_defaults(experiment_dir: Path | None) -> dict:
    """The decoding the experiment's evaluation used (greedy, max_new_tokens, dtype), if it ran."""
    path = experiment_dir / EVALUATION if experiment_dir else None
    if path is None or not path.is_file():
        return {}
    generation = json.loads(path.read_text()).get("generation") or {}
    keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "dtype")
    return {k: generation[k] for k in keys if k in generation}


def _quiet() -> None:
    """Model loading prints progress bars and notices; a chat shows only the conversation."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never wait on the network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def load(model_path: Path, dtype_name: str | None):
    """(model, tokenizer, render(messages) -> prompt text) of a deployment model folder or GGUF file."""
    check_model_path(model_path)
    _quiet()

    from workflow_scripts.models.loading import resolve_dtype, torch_device

    device = torch_device()
    dtype = resolve_dtype(dtype_name, device)
    try:
        if model_path.is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            where = {"pretrained_model_name_or_path": str(model_path.parent), "gguf_file": model_path.name}
            tok = AutoTokenizer.from_pretrained(**where)
            model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype).to(device)

            template_owner = tok

            def render(messages):
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        else:
            from workflow_scripts.models.loading import load_chat_formatter, load_model

            formatter = load_chat_formatter(model_path)
            tok, template_owner = formatter.tokenizer, formatter.owner
            model = load_model(model_path, dtype=dtype, device=device)

            def render(messages):
                return formatter.render(messages, add_generation_prompt=True)

    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ChatError(f"{model_path}: cannot load the model ({type(exc).__name__}: {first})") from None
    if not getattr(template_owner, "chat_template", None):
        raise ChatError(f"{model_path}: the model has no chat template")
    model.eval()
    return model, tok, render


def stream_tokens(model, prompt_ids: list[int], stop_ids: list[int], settings):
    """Yield generated token ids one at a time (the stop token excluded). Greedy decoding computes
    exactly what the evaluation's generate_batch does for a single prompt."""
    import torch
    from transformers import DynamicCache

    from workflow_scripts.models.families import family_of

    family = family_of(model.config)
    last_only = family.last_logits_kwargs(model)
    cache_kw = family.cache_kwarg(model)
    device = model.device
    gen = torch.Generator(device=device).manual_seed(settings.seed) if settings.do_sample else None
    stop = set(stop_ids)
    n = len(prompt_ids)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        attn = torch.ones((1, n), dtype=torch.long, device=device)
        out = model(
            input_ids=torch.tensor([prompt_ids], device=device),
            attention_mask=attn,
            position_ids=torch.arange(n, device=device)[None],
            use_cache=True,
            **{cache_kw: cache},
            **last_only,
        )
        logits = out.logits[:, -1]
        for step in range(settings.max_new_tokens):
            if settings.do_sample:
                token = _sample(logits, settings, gen)
            else:
                token = logits.argmax(-1)
            t = int(token[0])
            if t in stop:
                return
            yield t
            if step == settings.max_new_tokens - 1:
                return
            attn = torch.cat([attn, attn.new_ones((1, 1))], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=attn,
                position_ids=torch.tensor([[n + step]], device=device),
                use_cache=True,
                **{cache_kw: cache},
                **last_only,
            )
            logits = out.logits[:, -1]


def _sample(logits, settings, gen):
    import torch

    probs = torch.softmax(logits.float() / settings.temperature, -1)
    if settings.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < settings.top_p)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class Chat:
    """A conversation with the model: its template, the experiment's prompt format, a history."""

    def __init__(self, model, tok, render, fmt: PromptFormat, settings):
        from workflow_scripts.evaluation.generate import eos_ids

        self.model, self.tok, self.render, self.fmt, self.settings = model, tok, render, fmt, settings
        self.stop_ids = eos_ids(model, tok)
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def prompt(self, text: str) -> str:
        return self.render([*self.fmt.context, *self.history, self.fmt.user_message(text)])

    def reply(self, text: str, emit) -> str:
        """Generate the answer to ``text``, calling ``emit(piece)`` as the text grows; the answer."""
        prompt_ids = self.tok(self.prompt(text), add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        shown = ""
        for token in stream_tokens(self.model, prompt_ids, self.stop_ids, self.settings):
            ids.append(token)
            now = self.tok.decode(ids, skip_special_tokens=True)
            # hold back a half-decoded character, and anything a later token could still change
            if not now.endswith("\ufffd") and now.startswith(shown) and len(now) > len(shown):
                emit(now[len(shown) :])
                shown = now
        answer = self.tok.decode(ids, skip_special_tokens=True)
        if answer.startswith(shown) and len(answer) > len(shown):
            emit(answer[len(shown) :])
        self.history += [self.fmt.user_message(text), {"role": "assistant", "content": answer}]
        return answer


def _emit(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


# Control characters a model may generate (escape sequences, bells) are shown, not obeyed, on a terminal.
_CONTROLS = {c: "\ufffd" for c in (*range(0, 9), *range(11, 32), 127)}


def _emit_to_terminal(piece: str) -> None:
    _emit(piece.translate(_CONTROLS))


def interactive(chat: Chat, banner: list[str]) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    for line in banner:
        print(line)
    print("Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            chat.reset()
            print("(conversation cleared)")
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; /reset or /exit")
            continue
        _emit("model> ")
        try:
            chat.reply(text, _emit_to_terminal)
        except KeyboardInterrupt:
            _emit(" [interrupted]")
        print()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Chat with a snaketune deployment model or GGUF file, with the chat template and "
        "system prompt it was trained with. Interactive on a terminal; with --prompt or piped stdin it "
        "prints one answer and exits.",
    )
    parser.add_argument("model", help="results/<experiment>/deployment_model, or a .gguf file")
    parser.add_argument("--prompt", help="ask this one question and exit (otherwise stdin, when piped)")
    parser.add_argument("--system", help="system prompt to use instead of the experiment's")
    parser.add_argument(
        "--experiment",
        help="results/<experiment> folder to read the prompt format from (default: next to the model)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="default: the experiment's evaluation setting, else 512"
    )
    parser.add_argument(
        "--temperature", type=float, help="sample at this temperature (default: greedy, as evaluated)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except ChatError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


def check_model_path(model_path: Path) -> None:
    """The one-line errors for a path that cannot be a model, before anything is loaded or read."""
    if not model_path.exists():
        raise ChatError(f"{model_path}: no such file or folder")
    if model_path.is_file() and not _is_gguf(model_path):
        raise ChatError(f"{model_path}: not a GGUF file (and not a model folder)")
    if model_path.is_dir() and not (model_path / "config.json").is_file():
        raise ChatError(
            f"{model_path}: not a model folder (no config.json); give a deployment_model folder or a .gguf file"
        )


def _main(args) -> int:
    model_path = Path(args.model)
    check_model_path(model_path)
    experiment = Path(args.experiment) if args.experiment else find_experiment(model_path)
    if args.experiment and not experiment.is_dir():
        raise ChatError(f"{experiment}: no such experiment folder")
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    question = None
    if one_shot:
        question = args.prompt if args.prompt is not None else sys.stdin.read()
        question = question.rstrip("\r\n")
        if not question.strip():
            raise ChatError("empty prompt (give --prompt TEXT or pipe a question)")
    fmt = prompt_format(experiment) if experiment else PromptFormat()
    if args.system is not None:
        fmt.context = [m for m in fmt.context if m["role"] != "system"]
        fmt.context.insert(0, {"role": "system", "content": args.system})
    defaults = generation_defaults(experiment)
    model, tok, render = load(model_path, defaults.get("dtype"))
    settings = Decoding(
        max_new_tokens=args.max_new_tokens or defaults.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
        do_sample=bool(args.temperature) if args.temperature is not None else bool(defaults.get("do_sample")),
        temperature=args.temperature or defaults.get("temperature") or 1.0,
        top_p=defaults.get("top_p", 1.0),
        seed=defaults.get("seed", 0),
    )
    chat = Chat(model, tok, render, fmt, settings)
    if fmt.source is None and args.system is None:
        print(
            f"{PROG}: note: no experiment data next to {model_path}; chatting without its system prompt "
            "(use --experiment results/<experiment> or --system)",
            file=sys.stderr,
        )
    if one_shot:
        chat.reply(question, _emit)
        _emit("\n")
        return 0
    system = fmt.system_prompt
    decoding = "greedy" if not settings.do_sample else f"temperature {settings.temperature:g}"
    interactive(
        chat,
        [
            f"snaketune chat: {model_path} ({decoding}, up to {settings.max_new_tokens} new tokens)",
            f"system prompt ({fmt.source or '--system'}): {system!r}" if system else "no system prompt",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
