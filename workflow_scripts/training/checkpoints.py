"""Training checkpoints: which one to resume from, and when to throw them all away.

Checkpoints live in results/{experiment}/checkpoints/, outside the train rule's outputs (so
Snakemake never deletes them when a run dies). A re-run resumes from the newest *complete*
checkpoint (a SIGKILL can leave the last one half written). The folder carries a fingerprint of
the training/peft config and the data; when it changes the checkpoints are cleared, so a run
never continues from another run's state.
"""

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch

from workflow_scripts.files import write_json
from workflow_scripts.stage import StageError

log = logging.getLogger("snaketune.train")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT = "fingerprint.json"


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint a SIGKILL did not cut short: state, weights, optimizer, all readable."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if "global_step" not in state:
            return False
        weights = path / "adapter_model.safetensors"
        if (
            not weights.is_file()
            or not (path / "optimizer.pt").is_file()
            or not (path / "scheduler.pt").is_file()
        ):
            return False
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            list(f.keys())
        torch.load(path / "scheduler.pt", weights_only=True)
        return True
    except Exception:  # any unreadable piece means the write was interrupted
        return False


def find_resume_checkpoint(checkpoint_dir: Path, max_step: int | None = None) -> Path | None:
    """The newest complete checkpoint; with ``max_step``, the newest at or before that step."""
    steps = {
        int(m.group(1)): p for p in checkpoint_dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))
    }
    for step in sorted(steps, reverse=True):
        if max_step is not None and step > max_step:
            continue
        if checkpoint_is_complete(steps[step]):
            return steps[step]
        log.warning("skipping incomplete checkpoint %s (interrupted while being written)", steps[step].name)
    return None


def discard_checkpoints_after(checkpoint_dir: Path, step: int) -> None:
    """Remove the checkpoints past ``step``: a run that continues from ``step`` rewrites that part
    of the trajectory, and the trainer's rotation would otherwise delete the new checkpoints first."""
    for path in checkpoint_dir.glob("checkpoint-*"):
        m = CHECKPOINT_RE.match(path.name)
        if m and int(m.group(1)) > step:
            log.info("removing %s: this run continues from step %d and rewrites it", path.name, step)
            shutil.rmtree(path)


def rotate_checkpoints(checkpoint_dir: Path, limit: int | None, keep_steps) -> None:
    """training.save_total_limit as snaketune applies it to a halving point: the newest ``limit``
    checkpoints stay, and so does every one at a step of ``keep_steps`` (the rungs' ends: a promoted
    point continues from it, a re-run of its rung finds it and trains nothing), which the trainer's
    own rotation would delete as the oldest."""
    if not limit:
        return
    found = sorted(
        (int(m.group(1)), path)
        for path in checkpoint_dir.glob("checkpoint-*")
        if (m := CHECKPOINT_RE.match(path.name))
    )
    kept = {path for _, path in found[-limit:]} | {path for step, path in found if step in keep_steps}
    for _, path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def load_checkpoint(trainer, checkpoint: Path) -> None:
    """Put ``checkpoint``'s adapter weights and trainer state into ``trainer`` (PEFT's and
    transformers' public API), for a checkpoint with no step left to train."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many training processes wrote ``checkpoint``: the trainer saves one RNG state per process
    (rng_state_{rank}.pth), or rng_state.pth when there is one."""
    return len(list(Path(checkpoint).glob("rng_state_*.pth"))) or 1


def check_world_size(checkpoint: Path, world_size: int) -> None:
    """A run resumes only a checkpoint of its own world size: each process continues its own RNG
    state and data shard (the trainer would only warn about a missing one)."""
    written = checkpoint_world_size(checkpoint)
    if written != world_size:
        raise StageError(
            f"{checkpoint}: written by {written} training processes, this run has {world_size} "
            "(training.nodes x processes per node); resuming needs the same number: set them back, or "
            f"delete {Path(checkpoint).parent} to train from scratch"
        )


def fingerprint(training: dict, peft: dict, files: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"training": training, "peft": peft}, sort_keys=True, default=str).encode())
    for f in files:
        with open(f, "rb") as data:  # in chunks: a token file need not fit in memory
            while chunk := data.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def prepare_checkpoint_dir(checkpoint_dir: Path, fp: str, max_step: int | None = None) -> Path | None:
    """Keep checkpoints of the same run (and return the one to resume, at or before ``max_step``
    when given), clear those of another."""
    marker = checkpoint_dir / FINGERPRINT
    if checkpoint_dir.exists():
        old = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if old != fp:
            log.info(
                "training config or data changed since the checkpoints in %s: starting fresh", checkpoint_dir
            )
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fp})
    return find_resume_checkpoint(checkpoint_dir, max_step)
