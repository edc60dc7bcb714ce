"""Helpers shared by every stage: logging into the rule's log file, atomic writes, errors."""

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("snaketune")

SECRET_ENV = ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")


class StageError(RuntimeError):
    """A user-facing error: bad input, bad config. The message names the key, file or column."""


def setup_logging(log_file: str | os.PathLike | None) -> None:
    """Send logging, stdout and stderr (warnings, progress bars) to the rule's log file."""
    handlers: list[logging.Handler]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        sys.stdout = stream
        sys.stderr = stream
        handlers = [logging.StreamHandler(stream)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    redact_secrets()


class _RedactFilter(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for s in self.secrets:
            msg = msg.replace(s, "***")
        record.msg, record.args = msg, ()
        return True


def redact_secrets() -> None:
    """Never let a token reach a log: mask the values of the secret variables."""
    secrets = [os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 4]
    if secrets:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_RedactFilter(secrets))


def snakemake_main(smk, run_stage) -> None:
    """Entry for a `script:` rule: log to the rule's log, run, turn StageError into a clean exit."""
    setup_logging(smk.log[0] if smk.log else None)
    try:
        run_stage(smk)
    except StageError as exc:
        log.error("%s", exc)
        print(f"ERROR: {exc}", file=sys.__stderr__)
        sys.exit(1)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_parquet(path: str | os.PathLike, rows_or_frame) -> None:
    import pandas as pd

    frame = rows_or_frame if isinstance(rows_or_frame, pd.DataFrame) else pd.DataFrame(rows_or_frame)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def hf_token() -> str | None:
    """The Hub token, from the environment only (never from config, never written anywhere)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
