"""Files a stage writes: atomically (all or nothing), with the modes a plain create would have."""

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workflow_scripts.stage import StageError

log = logging.getLogger("snaketune")


def _read_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# mkstemp/mkdtemp create 0600/0700; atomic_path gives the modes a plain create would have.
_UMASK = _read_umask()
_TMP_MARK = ".tmp-"


def remove_stale_temps(target: Path) -> None:
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
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
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
        for folder in created:  # the folders made for it, if nothing else landed in them
            with contextlib.suppress(OSError):
                folder.rmdir()
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


def write_figure(fig, path: str | os.PathLike) -> None:
    """A matplotlib figure as a PNG, laid out and written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
