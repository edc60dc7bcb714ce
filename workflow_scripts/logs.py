"""Logging into the rule's log file, with every secret value masked; child processes logged the same way."""

import atexit
import codecs
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from workflow_scripts.credentials import secret_values


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
