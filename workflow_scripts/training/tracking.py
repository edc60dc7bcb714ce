"""What a training run reports: W&B set-up, the metrics CSV and loss plot, and provenance
(library versions, git commit, peak memory) for run.json."""

import csv
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from workflow_scripts.files import atomic_path, write_figure

log = logging.getLogger("snaketune.train")

METRIC_FIELDS = ["step", "loss", "eval_loss", "learning_rate", "tokens_per_s"]


# ---------------------------------------------------------------- W&B
def configure_wandb(wandb_cfg: dict, wandb_dir: Path, run_name: str) -> bool:
    """Set W&B's environment from the `wandb` section; False when W&B is disabled."""
    mode = wandb_cfg["mode"]
    if mode == "disabled":
        os.environ["WANDB_MODE"] = "disabled"
        return False
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "WANDB_MODE": mode,
            "WANDB_DIR": str(wandb_dir.resolve()),
            "WANDB_PROJECT": wandb_cfg["project"],
            "WANDB_NAME": wandb_cfg["run_name"] or run_name,
            "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off",
        }
    )
    if wandb_cfg["entity"]:
        os.environ["WANDB_ENTITY"] = wandb_cfg["entity"]
    log.info("W&B %s run under %s", mode, wandb_dir)
    return True


# ---------------------------------------------------------------- metrics
class MetricsCallback(TrainerCallback):
    """Real tokens/s (evaluation time excluded) in the log and progress bar; one row of
    ``rows`` per logging step."""

    def __init__(self, trainer, collator):
        self.trainer, self.collator = trainer, collator
        self.rows: list[dict] = []
        self.t0 = None
        self.tokens0 = 0
        self.eval0 = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.tokens0 = time.perf_counter(), self.collator.real_tokens
        self.eval0 = self.trainer.eval_seconds

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.t0 is None or ("loss" not in logs and "eval_loss" not in logs):
            return
        elapsed = time.perf_counter() - self.t0 - (self.trainer.eval_seconds - self.eval0)
        tps = (self.collator.real_tokens - self.tokens0) / elapsed if elapsed > 0 else 0.0
        logs["tokens_per_s"] = round(tps, 1)
        self.rows.append(
            {
                "step": state.global_step,
                "loss": logs.get("loss"),
                "eval_loss": logs.get("eval_loss"),
                "learning_rate": logs.get("learning_rate"),
                "tokens_per_s": round(tps, 1),
            }
        )

    def restore(self, checkpoint: Path) -> None:
        """Rows logged before ``checkpoint`` was written, from its trainer_state.json (tokens/s
        of those steps is not recorded there and stays empty)."""
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        for entry in state.get("log_history", []):
            if "loss" in entry or "eval_loss" in entry:
                self.rows.append(
                    {
                        "step": entry["step"],
                        "loss": entry.get("loss"),
                        "eval_loss": entry.get("eval_loss"),
                        "learning_rate": entry.get("learning_rate"),
                        "tokens_per_s": None,
                    }
                )

    def last_eval_step(self) -> int | None:
        return max((r["step"] for r in self.rows if r.get("eval_loss") is not None), default=None)


def write_metrics(rows: list[dict], csv_path: str, png_path: str) -> None:
    """metrics.csv (one row per logging step) and the loss plot."""
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_FIELDS})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training")
    ax.legend()
    ax.grid(alpha=0.3)
    write_figure(fig, png_path)


# ---------------------------------------------------------------- provenance
def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except Exception:
        return None


def library_versions() -> dict:
    import peft
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eval_loss_at(log_history: list[dict], step: int) -> float | None:
    """The validation loss a trainer state logged at ``step`` (None without one)."""
    return next(
        (h["eval_loss"] for h in reversed(log_history) if "eval_loss" in h and h["step"] == step), None
    )


def mean_logged_loss(log_history: list[dict]) -> float:
    """The mean of the training losses a trainer state logged."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else float("nan")
