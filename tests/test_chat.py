"""The chat command: the experiment's prompt format read from its artifacts, the evaluation's
greedy answer for a piped question, one-line errors, and a real terminal session (pseudo-terminal:
streamed tokens, /reset, /exit)."""

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, build_tokenizer, sample_rows, save_lively_model

from workflow_scripts import chat
from workflow_scripts.evaluation.prompt_format import PromptFormat, prompt_format, prompt_format_of

SYSTEM = "Answer the question about the table."
MAX_NEW_TOKENS = 24


def save_chatty_tiny_model(path: Path) -> Path:
    """The tiny test model with varied greedy answers (helpers.save_lively_model)."""
    return save_lively_model(path, build_tokenizer())


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """A workflow folder after a run: results/default/ (deployment model, experiment.json, the
    fine-tuned evaluation) and the shared formatted test split experiment.json points at.
    The questions are wrapped by the user template ("Question: {question}\\nAnswer briefly.")."""
    from transformers import AutoTokenizer

    from workflow_scripts.evaluation.generate import GenerationSettings, generate
    from workflow_scripts.models.loading import load_model

    root = tmp_path_factory.mktemp("wf")
    exp = root / "results" / "default"
    model_dir = save_chatty_tiny_model(exp / "deployment_model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    formatted = "results/shared/formatted/sample-tiny-0123abcd"
    rows = []
    for r in sample_rows(8):
        q = r["Open-ended Verifiable Question"]
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question: {q}\nAnswer briefly."},
        ]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(
            {"messages": json.dumps(messages), "prompt_text": prompt, "query": q, "reference": r["Response"]}
        )
    (root / formatted).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / formatted / "test.parquet")
    own = {k: f"results/default/{k}" for k in ("deployment_model", "evaluation")}
    (exp / "experiment.json").write_text(
        json.dumps({"experiment": "default", "shared": {"formatted": formatted}, "own": own})
    )
    # the evaluation's greedy predictions (its batched generation, as eval_finetuned runs it)
    settings = GenerationSettings(
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=8,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        share_prefix=True,
    )
    model = load_model(model_dir)
    predictions = generate(model, tok, [r["prompt_text"] for r in rows], settings, progress=False)["texts"]
    (exp / "evaluation").mkdir()
    generation = {**settings.__dict__, "dtype": "float32", "device": "cpu"}
    (exp / "evaluation/finetuned_model_evaluation.json").write_text(json.dumps({"generation": generation}))
    assert len(set(predictions)) == len(predictions) and all(p.strip() for p in predictions)
    return root, rows, predictions


def run_chat(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "workflow_scripts.chat", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_prompt_format_is_read_from_the_experiment(workflow):
    root, rows, _ = workflow
    exp = root / "results" / "default"
    assert chat.find_experiment(exp / "deployment_model") == exp
    fmt = prompt_format(exp)
    assert fmt.context == [{"role": "system", "content": SYSTEM}] and fmt.system_prompt == SYSTEM
    assert (fmt.user_prefix, fmt.user_suffix) == ("Question: ", "\nAnswer briefly.")
    assert fmt.source == str(root / "results/shared/formatted/sample-tiny-0123abcd/test.parquet")


def test_prompt_format_keeps_only_what_every_row_shares(tmp_path):
    rows = [
        {
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": f"ex {i}"}],
            "query": f"q{i}",
        }
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")  # as preprocess writes it
    fmt = prompt_format_of(
        tmp_path / "test.parquet"
    )  # the query is not in the user message: no wrapping guessed
    assert fmt.system_prompt == "S" and (fmt.user_prefix, fmt.user_suffix) == ("", "")
    # a folder without experiment.json has no prompt format, and is no experiment
    (tmp_path / "deployment_model").mkdir()
    assert prompt_format(tmp_path) == PromptFormat()
    assert chat.find_experiment(tmp_path / "deployment_model") is None


def test_decoding_is_the_evaluations_with_the_command_lines_changes():
    from workflow_scripts.config import load_schema

    schema = load_schema()["properties"]["evaluation"]["properties"]
    settings, dtype = chat.decoding({})  # no evaluation ran: the schema's defaults, nothing retyped
    assert settings.max_new_tokens == schema["max_new_tokens"]["default"] and not settings.do_sample
    assert dtype == schema["dtype"]["default"]
    evaluated = {
        "max_new_tokens": 7,
        "do_sample": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "dtype": "bfloat16",
    }
    settings, dtype = chat.decoding(evaluated)
    assert (settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_p) == (
        7,
        True,
        0.5,
        0.9,
    )
    assert dtype == "bfloat16"
    settings, _ = chat.decoding(evaluated, max_new_tokens=3, temperature=0)  # 0: greedy
    assert (settings.max_new_tokens, settings.do_sample, settings.temperature) == (3, False, 0.5)
    settings, _ = chat.decoding({}, temperature=0.7)
    assert settings.do_sample and settings.temperature == 0.7


def test_piped_question_gets_the_evaluations_greedy_answer(workflow, tmp_path):
    root, rows, predictions = workflow
    model = root / "results" / "default" / "deployment_model"
    proc = run_chat(model, stdin=rows[0]["query"] + "\n", cwd=tmp_path)  # from anywhere, as echo pipes it
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == predictions[0] + "\n"
    assert proc.stderr == ""
    # the console script: `make test` installs the package (`make setup`: pip install -e '.[dev]')
    script = Path(sys.executable).with_name("snaketune-chat")
    assert script.is_file(), (
        f"no {script}: the package is not installed in this environment (run `make setup`, or "
        "`pip install -e .` in it)"
    )
    proc = subprocess.run(
        [script, model, "--prompt", rows[1]["query"]], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout == predictions[1] + "\n", proc.stderr


def test_every_test_prompt_is_rebuilt_exactly_and_answered_as_evaluated(workflow):
    root, rows, predictions = workflow
    exp = root / "results" / "default"
    settings, dtype = chat.decoding(chat.evaluated_generation(exp))
    assert (settings.max_new_tokens, settings.do_sample, dtype) == (MAX_NEW_TOKENS, False, "float32")
    model, formatter = chat.load(exp / "deployment_model", dtype)
    session = chat.Chat(model, formatter, prompt_format(exp), settings)
    for row, prediction in zip(rows, predictions, strict=True):
        assert session.prompt(row["query"]) == row["prompt_text"]
        pieces = []
        assert session.reply(row["query"], pieces.append) == prediction
        assert "".join(pieces) == prediction and len(pieces) > 1  # streamed, not printed at the end
        assert len(session.history) == 2
        session.reset()
        assert session.history == []


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing", "missing: no such file or folder"),
        ("folder", "folder: not a model folder (no config.json)"),
        ("notes.gguf", "notes.gguf: not a GGUF file"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, target, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.gguf").write_text("hello")
    proc = run_chat(tmp_path / target, "--prompt", "hi")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("snaketune-chat: error: ")


def test_empty_piped_prompt_is_an_error(workflow):
    root, _, _ = workflow
    proc = run_chat(root / "results/default/deployment_model", stdin="\n")
    assert (
        proc.returncode == 1
        and proc.stderr == "snaketune-chat: error: empty prompt (give --prompt TEXT or pipe a question)\n"
    )


def test_bad_decoding_options_are_one_clear_line(workflow):
    root, _, _ = workflow
    model = root / "results/default/deployment_model"
    proc = run_chat(model, "--prompt", "hi", "--max-new-tokens", "0")
    assert proc.returncode == 1 and proc.stderr == (
        "snaketune-chat: error: --max-new-tokens: 0 is not a positive number of tokens\n"
    )
    proc = run_chat(model, "--prompt", "hi", "--temperature", "-1")
    assert (
        proc.returncode == 1
        and proc.stderr == "snaketune-chat: error: --temperature: -1 is negative (0 is greedy)\n"
    )


def test_control_characters_from_the_model_are_shown_not_obeyed_on_a_terminal(capsys):
    chat._emit_to_terminal("a\x1b[2Jb\x07\tc\n")
    assert capsys.readouterr().out == "a\ufffd[2Jb\ufffd\tc\n"


# A terminal session: every printed piece is slowed down so the reader sees the answer grow.
SLOW_EMIT = """
import sys, time
import workflow_scripts.chat as chat
emit = chat._emit
def slow(piece):
    emit(piece)
    time.sleep(0.04)
chat._emit = slow
sys.exit(chat.main(sys.argv[1:]))
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """A program on a pseudo-terminal (what tmux or pexpect give it): type lines, read the screen."""

    def __init__(self, argv: list[str], cwd: Path):
        import pty

        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm"}
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True
        )
        os.close(slave)
        self.reads: list[tuple[float, str]] = []  # (time, text) of every read

    @property
    def screen(self) -> str:
        return ANSI.sub("", "".join(t for _, t in self.reads)).replace("\r\n", "\n")

    def wait_for(self, text: str, after: int = 0, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while text not in self.screen[after:]:
            if time.monotonic() > end:
                raise AssertionError(f"{text!r} not on the screen after {timeout}s:\n{self.screen[-2000:]}")
            if select.select([self.master], [], [], 0.01)[0]:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the program ended
                    raise AssertionError(f"program ended before {text!r}:\n{self.screen[-2000:]}") from None
                self.reads.append((time.monotonic(), data.decode("utf-8", "replace")))
        return self.screen

    def type(self, line: str) -> int:
        """Type a line; where the screen stood before it."""
        mark = len(self.screen)
        os.write(self.master, line.encode() + b"\r")
        return mark

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def answer_on_screen(screen: str, mark: int) -> str:
    after = screen[mark:]
    start = after.index("model> ") + len("model> ")
    return after[start : after.index("\nyou> ", start)]


def test_terminal_session_streams_answers_resets_and_exits(workflow):
    root, rows, predictions = workflow
    model = root / "results" / "default" / "deployment_model"
    term = Terminal([sys.executable, "-c", SLOW_EMIT, str(model)], cwd=root)
    try:
        screen = term.wait_for("you> ")
        assert f"system prompt ({root}/results/shared/formatted" in screen and SYSTEM in screen
        assert "/reset" in screen and "/exit" in screen

        mark = term.type(rows[0]["query"].splitlines()[0])  # one line, as typed
        first_read = len(term.reads)
        screen = term.wait_for("\nyou> ", after=mark + 1)
        first = answer_on_screen(screen, mark)
        assert first.strip()
        # streaming: the answer reached the terminal in many reads, spread over time
        reads = term.reads[first_read:]
        start = next(i for i, (_, s) in enumerate(reads) if "model> " in s)
        answer_reads = [(t, s) for t, s in reads[start + 1 :] if "you>" not in s]
        assert len(answer_reads) >= 4, answer_reads
        assert answer_reads[-1][0] - answer_reads[0][0] > 0.2

        mark = term.type("what about the year before?")  # a follow-up: the history is in the prompt
        term.wait_for("\nyou> ", after=mark + 1)

        mark = term.type("/reset")
        term.wait_for("(conversation cleared)\nyou> ", after=mark)
        mark = term.type(rows[0]["query"].splitlines()[0])
        screen = term.wait_for("\nyou> ", after=mark + 1)
        assert answer_on_screen(screen, mark) == first  # a fresh conversation answers as the first time

        term.type("/exit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
