"""Helpers shared by every stage: logging into the rule's log file, atomic writes, errors."""

import atexit
import codecs
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("snaketune")

SECRET_ENV = ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")


class StageError(RuntimeError):
    """A user-facing error: bad input, bad config. The message names the key, file or column."""


def secret_values() -> list[str]:
    """The values of the secret variables (4 characters or more), longest first."""
    values = {os.environ.get(k, "") for k in SECRET_ENV}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def mask_secrets(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, "***")
    return text


class MaskedStream:
    """A text stream that writes to ``raw`` with every secret value replaced by ``***``.

    A secret can arrive split over several write() calls (a progress bar, a child's output copied
    in chunks): the tail of the text that could still be the start of a secret is held back until
    the next write shows what follows; everything before it goes through at once, so the stream
    stays as line-buffered as ``raw``. The secrets are read from the environment on each write.
    Writes to ``fileno()`` (C code, a child given this stream) bypass the masking: start children
    through ``run_logged``.
    """

    def __init__(self, raw):
        self.raw = raw
        self._pending = ""
        self._lock = threading.RLock()
        self._buffer: _MaskedBuffer | None = None

    def write(self, text: str) -> int:
        with self._lock:
            secrets = secret_values()
            data = mask_secrets(self._pending + text, secrets)
            hold = max((_secret_prefix_len(data, s) for s in secrets), default=0)
            self._pending = data[len(data) - hold :]
            if hold < len(data):
                self.raw.write(data[: len(data) - hold])
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self.raw.flush()

    def close(self) -> None:
        """Write what is held back (a partial secret is masked too) and flush; ``raw`` stays open."""
        with self._lock:
            if self._pending:
                self.raw.write("***" if len(self._pending) >= 4 else self._pending)
                self._pending = ""
            self.raw.flush()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self.raw.closed

    @property
    def buffer(self) -> "_MaskedBuffer":
        if self._buffer is None:
            self._buffer = _MaskedBuffer(self)
        return self._buffer

    def __getattr__(self, name):  # encoding, errors, fileno, isatty, name, ...
        if name == "raw":
            raise AttributeError(name)
        return getattr(self.raw, name)


def _secret_prefix_len(text: str, secret: str) -> int:
    """Length of the longest end of ``text`` that is the start (not the whole) of ``secret``."""
    if secret[0] not in text[-(len(secret) - 1) :]:
        return 0
    for n in range(min(len(text), len(secret) - 1), 0, -1):
        if text.endswith(secret[:n]):
            return n
    return 0


class _MaskedBuffer:
    """``sys.stdout.buffer`` for code that writes bytes: decoded, then masked like the text."""

    def __init__(self, text_stream: MaskedStream):
        self._text = text_stream
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> int:
        self._text.write(self._decoder.decode(bytes(data)))
        return len(data)

    def flush(self) -> None:
        self._text.flush()

    def writable(self) -> bool:
        return True


def _masked(stream) -> "MaskedStream":
    """``stream`` behind the masking (once: an already masked stream is re-wrapped from its raw)."""
    if isinstance(stream, MaskedStream):
        stream.close()
        stream = stream.raw
    masked = MaskedStream(stream)
    atexit.register(masked.close)  # what is held back still reaches the log at exit
    return masked


def _retarget_handlers(new_for: dict[int, "MaskedStream"]) -> None:
    """Point the stream handlers that libraries attached before the set-up (to the old stdout or
    stderr) at the masked stream that replaces it."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in new_for:
                handler.setStream(new_for[id(handler.stream)])


def setup_logging(log_file: str | os.PathLike | None) -> None:
    """Send logging, stdout and stderr (warnings, tracebacks, progress bars) to the rule's log file
    (or to stderr), masking the secret values on the way (see MaskedStream)."""
    old_out = {id(s) for s in (sys.stdout, sys.__stdout__) if s is not None}
    old_err = {id(s) for s in (sys.stderr, sys.__stderr__) if s is not None}
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        for old in {id(sys.stdout): sys.stdout, id(sys.stderr): sys.stderr}.values():
            if isinstance(old, MaskedStream):
                old.close()
        raw = open(log_file, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        sys.stdout = sys.stderr = _masked(raw)
    else:
        if sys.stdout is not None:
            sys.stdout = _masked(sys.stdout)
        sys.stderr = _masked(sys.stderr)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr)],
        force=True,
    )
    _retarget_handlers({**dict.fromkeys(old_out, sys.stdout), **dict.fromkeys(old_err, sys.stderr)})


def run_logged(cmd: list[str], check: bool = False, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run a child process with its stdout and stderr copied, masked, into sys.stderr (the log).

    Like ``subprocess.run(cmd, check=check)``; the child is killed if this process is interrupted.
    """
    out = sys.stderr if isinstance(sys.stderr, MaskedStream) else MaskedStream(sys.stderr)
    out.flush()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen_kwargs) as proc:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while chunk := proc.stdout.read1(65536):
                out.write(decoder.decode(chunk))
            out.write(decoder.decode(b"", final=True))
            out.close()  # writes what was held back and flushes; sys.stderr stays open
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return subprocess.CompletedProcess(cmd, proc.returncode)


def snakemake_main(smk, run_stage) -> None:
    """Entry for a `script:` rule: log to the rule's log, run, turn StageError into a clean exit."""
    setup_logging(smk.log[0] if smk.log else None)
    try:
        run_stage(smk)
    except StageError as exc:
        log.error("%s", exc)
        print(mask_secrets(f"ERROR: {exc}"), file=sys.__stderr__)
        sys.exit(1)


def _read_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# mkstemp/mkdtemp create 0600/0700; atomic_path gives the modes a plain create would have.
_UMASK = _read_umask()
_TMP_MARK = ".tmp-"


def _remove_stale_temps(target: Path) -> None:
    """Remove ``.<name>.tmp-<random>`` siblings of ``target``: left by a killed earlier run of the
    same job (Snakemake never runs two jobs with the same output at once). The random part has no
    dot, so the temp of another target (``.<name>.tmp-x.tmp-<random>``) never matches."""
    prefix = f".{target.name}{_TMP_MARK}"
    with os.scandir(target.parent) as entries:
        stale = [e for e in entries if e.name.startswith(prefix) and _is_random(e.name[len(prefix) :])]
    for entry in stale:
        log.warning("removing %s, left by an interrupted run", entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _is_random(part: str) -> bool:
    return bool(part) and all(c.isascii() and (c.isalnum() or c == "_") for c in part)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``target`` only if the block succeeds.

    The temporary path ``.<name>.tmp-<random>`` gets the permissions a normal create would (the
    umask applies); stale ones from a killed earlier run are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    prefix = f".{target.name}{_TMP_MARK}"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
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
