"""Talk to a fine-tuned model: a deployment model folder or a GGUF file, as it was trained.

    python -m workflow_scripts.chat results/default/deployment_model        # interactive
    snaketune-chat results/default/export/smollm2-135m-instruct-default-q8_0.gguf
    echo "What was the revenue in 2019?" | snaketune-chat results/default/deployment_model
    snaketune-chat results/default/deployment_model --prompt "What was the revenue in 2019?"
    snaketune-chat results/sweeps/lr-rank                     # a sweep's winner (best.json)
    snaketune-chat results/sweeps/lr-rank --point learning_rate~0.001_r~16

The prompt is built the way training and evaluation built it, from the experiment's own
artifacts, never retyped: the chat template is the model's (the deployment model keeps the
training template; a GGUF file carries it in its metadata), and the system prompt, any fixed
turns before the question and the text around the question come from the experiment's
formatted test split (workflow_scripts.evaluation.prompt_format, found through
``results/{experiment}/experiment.json``, next to the model). Answers come from the evaluation's
generator (workflow_scripts.evaluation.generate.stream) with the evaluation's decoding (its
recorded settings, else the schema's `evaluation` defaults), so a piped question gets the answer
the evaluation recorded for it. Tokens are printed as they are generated. This module keeps only
the command and the conversation. Interactive commands: /reset (forget the conversation), /exit
(or Ctrl-D). Given a sweep's folder, it talks to the winner in its best.json, or to the finished
point ``--point`` names (workflow_scripts.winner picks it, as for export_gguf and push_to_hub).
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from workflow_scripts import layout
from workflow_scripts.evaluation.prompt_format import PromptFormat, prompt_format
from workflow_scripts.layout import BEST, EXPERIMENT_INDEX, LEADERBOARD

PROG = "snaketune-chat"
EVALUATION = "evaluation/finetuned_model_evaluation.json"
DEPLOYMENT_MODEL = "deployment_model"  # in a point's folder


class ChatError(Exception):
    """A user-facing error, printed as one line."""


def find_experiment(model_path: Path) -> Path | None:
    """results/{experiment}/ of a deployment model folder or of an export/*.gguf file."""
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / EXPERIMENT_INDEX).is_file():
            return folder
    return None


def sweep_model(sweep_dir: Path, point: str | None) -> tuple[Path, str]:
    """(deployment model, what it is) of the sweep point to talk to: best.json's winner, or the
    finished point ``point`` names. The candidates are the finished rows of the sweep's leaderboard
    (a grid's points, a halving sweep's finalists), never whatever folders lie there: a sweep
    re-planned under the same name leaves the old plan's folders behind."""
    from workflow_scripts.stage import StageError
    from workflow_scripts.sweeps import winner

    board = sweep_dir / LEADERBOARD
    if not board.is_file():
        raise ChatError(
            f"{sweep_dir}: no {LEADERBOARD}: the sweep has not finished (its leaderboard writes it)"
        )
    workdir = layout.workdir_of_sweep(sweep_dir)
    candidates = {
        layout.experiment_of_root(row["results_dir"]): {"root": str(workdir / row["results_dir"])}
        for row in json.loads(board.read_text())["points"]
        if row["selection_value"] is not None  # trained to the end (pruned points have none)
    }
    try:
        choice = winner.choose(sweep_dir / BEST, point or "best", candidates, key="--point")
    except StageError as exc:
        raise ChatError(str(exc)) from None
    what = f"the winner in {BEST}" if point is None else "--point"
    return Path(choice.candidate["root"]) / DEPLOYMENT_MODEL, f"point {choice.point} ({what})"


def evaluated_generation(experiment_dir: Path | None) -> dict:
    """The generation record of the experiment's fine-tuned evaluation (its settings and dtype), if it ran."""
    path = experiment_dir / EVALUATION if experiment_dir else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text()).get("generation") or {}


def decoding(evaluated: dict, max_new_tokens: int | None = None, temperature: float | None = None):
    """(GenerationSettings, dtype name): the evaluation's decoding (``evaluated``, its generation
    record, over the schema's `evaluation` defaults) with the command line's changes; temperature
    0 is greedy."""
    from workflow_scripts.config import schema_default
    from workflow_scripts.evaluation.generate import GenerationSettings

    keys = (*GenerationSettings.__dataclass_fields__, "dtype")
    cfg = {**{k: schema_default(f"evaluation.{k}") for k in keys}, **evaluated}
    if max_new_tokens is not None:
        cfg["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        cfg.update(do_sample=temperature > 0, temperature=temperature or cfg["temperature"])
    return GenerationSettings.from_config(cfg), cfg["dtype"]


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
    """(model, chat formatter) of a deployment model folder or GGUF file (models.loading)."""
    check_model_path(model_path)
    _quiet()

    from workflow_scripts.models.loading import load_model_and_formatter, resolve_dtype, torch_device

    device = torch_device()
    try:
        model, formatter = load_model_and_formatter(model_path, resolve_dtype(dtype_name, device), device)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ChatError(f"{model_path}: cannot load the model ({type(exc).__name__}: {first})") from None
    if not getattr(formatter.owner, "chat_template", None):
        raise ChatError(f"{model_path}: the model has no chat template")
    model.eval()
    return model, formatter


class Chat:
    """A conversation with the model: its chat template, the experiment's prompt format, a history."""

    def __init__(self, model, formatter, fmt: PromptFormat, settings):
        from workflow_scripts.evaluation.generate import eos_ids

        # rendered with the template options the training data was rendered with
        formatter = dataclasses.replace(formatter, template_kwargs=fmt.template_kwargs)
        self.model, self.formatter, self.fmt, self.settings = model, formatter, fmt, settings
        self.tok = formatter.tokenizer
        self.stop_ids = eos_ids(model, self.tok)
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def prompt(self, text: str) -> str:
        messages = [*self.fmt.context, *self.history, self.fmt.user_message(text)]
        return self.formatter.render(messages, add_generation_prompt=True)

    def reply(self, text: str, emit) -> str:
        """Generate the answer to ``text``, calling ``emit(piece)`` as the text grows; the answer."""
        from workflow_scripts.evaluation.generate import stream

        prompt_ids = self.tok(self.prompt(text), add_special_tokens=False)["input_ids"]
        ids = stream(
            self.model, self.tok, prompt_ids, self.settings, emit, self.stop_ids, self.formatter.family
        )
        answer = self.tok.decode(ids, skip_special_tokens=True)
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
    parser.add_argument(
        "model",
        help=f"{layout.experiment_path('<experiment>', 'deployment_model')}, a .gguf file, or a sweep folder "
        f"{layout.sweep_dir('<name>')} "
        "(its winner)",
    )
    parser.add_argument(
        "--point",
        help="with a sweep folder: talk to this finished point (its name as in the leaderboard) instead of the winner",
    )
    parser.add_argument("--prompt", help="ask this one question and exit (otherwise stdin, when piped)")
    parser.add_argument("--system", help="system prompt to use instead of the experiment's")
    parser.add_argument(
        "--experiment",
        help=f"{layout.experiment_root('<experiment>')} folder to read the prompt format from (default: next to the model)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="default: the experiment's evaluation setting, else evaluation.max_new_tokens's default",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="sample at this temperature, 0: greedy (default: the evaluation's decoding, greedy unless it sampled)",
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
    model_path, acted_on = Path(args.model), None
    if model_path.is_dir() and (model_path / BEST).is_file():
        model_path, acted_on = sweep_model(model_path, args.point)
    elif args.point is not None:
        raise ChatError(
            f"--point: {model_path} is not a sweep folder ({layout.sweep_dir('<name>')}, holding {BEST})"
        )
    elif model_path.is_dir() and layout.is_sweep_dir(model_path):
        raise ChatError(f"{model_path}: no {BEST}: the sweep has not finished (its leaderboard writes it)")
    check_model_path(model_path)
    experiment = Path(args.experiment) if args.experiment else find_experiment(model_path)
    if args.experiment and not experiment.is_dir():
        raise ChatError(f"{experiment}: no such experiment folder")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens: {args.max_new_tokens} is not a positive number of tokens")
    if args.temperature is not None and args.temperature < 0:
        raise ChatError(f"--temperature: {args.temperature:g} is negative (0 is greedy)")
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
    settings, dtype = decoding(evaluated_generation(experiment), args.max_new_tokens, args.temperature)
    model, formatter = load(model_path, dtype)
    chat = Chat(model, formatter, fmt, settings)
    if fmt.source is None and args.system is None:
        print(
            f"{PROG}: note: no experiment data next to {model_path}; chatting without its system prompt "
            f"(use --experiment {layout.experiment_root('<experiment>')} or --system)",
            file=sys.stderr,
        )
    if one_shot:
        chat.reply(question, _emit)
        _emit("\n")
        return 0
    system = fmt.system_prompt
    how = "greedy" if not settings.do_sample else f"temperature {settings.temperature:g}"
    interactive(
        chat,
        [
            f"snaketune chat: {model_path} ({how}, up to {settings.max_new_tokens} new tokens)",
            *([f"sweep {acted_on}"] if acted_on else []),
            f"system prompt ({fmt.source or '--system'}): {system!r}" if system else "no system prompt",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
