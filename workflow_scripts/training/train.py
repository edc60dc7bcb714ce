"""Stage 5: LoRA fine-tuning with TRL's SFTTrainer + PEFT; resumable; writes the adapter.

Checkpoints live in results/{experiment}/checkpoints/ (outside the rule's outputs, so
Snakemake never deletes them on failure). A re-run after a crash resumes from the newest
*complete* checkpoint; a checkpoint of a different training/peft config or different data is
never mixed in: the folder carries a fingerprint and is cleared when it changes.
"""

import csv
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from workflow_scripts.common import StageError, atomic_path, set_threads, snakemake_main, write_json
from workflow_scripts.config import lora_kwargs, trainer_kwargs
from workflow_scripts.models.loading import is_multimodal, load_chat_formatter, load_model, load_tokenizer
from workflow_scripts.training.data import Collator, load_examples

log = logging.getLogger("snaketune.train")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT = "fingerprint.json"
# Keys snaketune sets itself: a user value would break resume, logging or the data pipeline.
MANAGED_KEYS = {
    "output_dir",
    "remove_unused_columns",
    "dataset_kwargs",
    "logging_dir",
    "resume_from_checkpoint",
}


# ---------------------------------------------------------------- checkpoints
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


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    candidates = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if CHECKPOINT_RE.match(p.name)),
        key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)),
        reverse=True,
    )
    for cand in candidates:
        if checkpoint_is_complete(cand):
            return cand
        log.warning("skipping incomplete checkpoint %s (interrupted while being written)", cand.name)
    return None


def fingerprint(training: dict, peft: dict, files: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"training": training, "peft": peft}, sort_keys=True, default=str).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def prepare_checkpoint_dir(checkpoint_dir: Path, fp: str) -> Path | None:
    """Keep checkpoints of the same run (and return the one to resume), clear those of another."""
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
    return find_resume_checkpoint(checkpoint_dir)


# ---------------------------------------------------------------- model set-up
def bf16_is_fast(device: str) -> bool:
    """bf16 where the hardware runs it fast: CUDA with bf16, or a CPU whose bf16 matmul beats fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    a32, b32 = torch.randn(512, 512), torch.randn(512, 512)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def timed(a, b):
        a @ b
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        return time.perf_counter() - t

    return timed(a16, b16) < 0.8 * timed(a32, b32)


def linear_modules(model, language_only: bool) -> list[str]:
    """Full names of the Linear layers LoRA may target (the LM head excluded)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            if language_only and "language_model" not in name:
                continue
            names.append(name)
    return names


def lora_config_for(model, peft_cfg: dict, multimodal: bool):
    from peft import LoraConfig

    kwargs = lora_kwargs(peft_cfg)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    targets = kwargs.get("target_modules", "all-linear")
    full_names = linear_modules(model, language_only=multimodal)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in full_names})
    if targets != "all-linear":
        wanted = [targets] if isinstance(targets, str) else list(targets)
        missing = [t for t in wanted if t not in leaves and t not in full_names]
        if missing:
            raise StageError(
                f"peft.target_modules: {missing} not found in the model; its linear modules are "
                f"{[x for x in leaves if not x.isdigit()]}"
            )
        full_names = [n for n in full_names if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    if multimodal:
        # LoRA on the language model only, by exact module name: vision/audio towers stay untouched.
        kwargs["target_modules"] = full_names
    return LoraConfig(**kwargs)


def build_peft_model(model_dir: str, peft_cfg: dict, dtype: torch.dtype, device: str):
    from peft import get_peft_model

    multimodal = is_multimodal(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)
    model.config.use_cache = False
    # autocast_adapter_dtype keeps the LoRA weights in fp32 while frozen weights may be bf16
    peft_model = get_peft_model(
        model, lora_config_for(model, peft_cfg, multimodal), autocast_adapter_dtype=True
    )
    return peft_model, multimodal


# ---------------------------------------------------------------- tracking
def configure_wandb(wandb_cfg: dict, wandb_dir: Path, run_name: str) -> bool:
    mode = wandb_cfg.get("mode", "auto")
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
            "WANDB_PROJECT": wandb_cfg.get("project") or "snaketune",
            "WANDB_NAME": wandb_cfg.get("run_name") or run_name,
            "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off",
        }
    )
    if wandb_cfg.get("entity"):
        os.environ["WANDB_ENTITY"] = wandb_cfg["entity"]
    log.info("W&B %s run under %s", mode, wandb_dir)
    return True


def make_metrics_callback(trainer, collator: Collator, rows: list[dict]):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Real tokens/s in the log and progress bar; one metrics row per logging step."""

        def __init__(self):
            self.t0 = None
            self.tokens0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tokens0 = time.perf_counter(), collator.real_tokens
            self.eval0 = trainer.eval_seconds

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is None or self.t0 is None or ("loss" not in logs and "eval_loss" not in logs):
                return
            elapsed = time.perf_counter() - self.t0 - (trainer.eval_seconds - self.eval0)
            tps = (collator.real_tokens - self.tokens0) / elapsed if elapsed > 0 else 0.0
            logs["tokens_per_s"] = round(tps, 1)
            rows.append(
                {
                    "step": state.global_step,
                    "loss": logs.get("loss"),
                    "eval_loss": logs.get("eval_loss"),
                    "learning_rate": logs.get("learning_rate"),
                    "tokens_per_s": round(tps, 1),
                }
            )

    return MetricsCallback()


def write_metrics(rows: list[dict], csv_path: str, png_path: str) -> None:
    fields = ["step", "loss", "eval_loss", "learning_rate", "tokens_per_s"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
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
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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


# ---------------------------------------------------------------- the stage
def build_trainer(
    train_path: str,
    validation_path: str,
    model_dir: str,
    training: dict,
    peft_cfg: dict,
    checkpoint_dir: Path,
    report_to: list[str],
    device: str,
    extra_callbacks=(),
):
    """The configured trainer, exactly as the `train` rule runs it (benchmarks reuse this)."""
    from datasets import Dataset
    from trl import SFTConfig

    from workflow_scripts.training.trainer import SnaketuneTrainer

    fast = training.get("fast_path") or {}
    use_bf16 = bf16_is_fast(device)
    # Frozen weights stored in bf16 (no per-step autocast re-cast); otherwise fp32 (+ autocast on GPU).
    store_bf16 = use_bf16 and fast.get("bf16_frozen_weights", True)
    dtype = torch.bfloat16 if store_bf16 else torch.float32
    model, multimodal = build_peft_model(model_dir, peft_cfg, dtype, device)
    tok = load_tokenizer(model_dir)
    kwargs = trainer_kwargs(training)
    for key in MANAGED_KEYS & set(kwargs):
        log.warning("training.%s is managed by snaketune; ignoring the configured value", key)
        kwargs.pop(key)
    kwargs.setdefault("bf16", use_bf16 and not store_bf16)
    if kwargs.get("bf16") and not use_bf16:
        log.warning("training.bf16 requested but this hardware has no fast bf16; using fp32")
        kwargs["bf16"] = False
    kwargs.setdefault("gradient_checkpointing", False)
    kwargs["report_to"] = report_to
    patience = training.get("early_stopping_patience")
    if patience:
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    kwargs.setdefault("eval_strategy", "steps" if kwargs.get("eval_steps") else "no")
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=device == "cpu",
        disable_tqdm=False,
        **kwargs,
    )
    pack = bool(fast.get("packing", False))
    collator = Collator(tok.pad_token_id, pack=pack, max_length=training["max_length"])
    train_ds = Dataset.from_list(load_examples(train_path))
    eval_ds = Dataset.from_list(load_examples(validation_path)) if args.eval_strategy != "no" else None
    if fast.get("group_by_length", True):
        # Examples of similar length share a step: little padding to compute.
        args.train_sampling_strategy = "group_by_length"
        train_ds = train_ds.add_column("length", [len(x) for x in train_ds["input_ids"]])
    callbacks = list(extra_callbacks)
    if patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience))
    trainer = SnaketuneTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        data_collator=collator,
        callbacks=callbacks,
        labels_only_logits=bool(fast.get("labels_only_logits", True)),
    )
    info = {
        "bf16_hardware": use_bf16,
        "frozen_dtype": str(dtype),
        "group_by_length": args.train_sampling_strategy == "group_by_length",
        "packing": pack,
        "labels_only_logits": bool(fast.get("labels_only_logits", True)),
        "gradient_checkpointing": args.gradient_checkpointing,
        "multimodal": multimodal,
    }
    return trainer, collator, info


def num_processes(training: dict, gpus: int = 0) -> int:
    return max(int(training.get("num_processes") or 1), int(gpus or 0))


def launch_distributed(kwargs: dict, nproc: int, resume: Path | None, accelerate_config: str | None) -> None:
    """Re-run this stage with ``nproc`` processes: `accelerate launch` on GPUs (DDP, or FSDP/DeepSpeed
    through the user's accelerate config file), torchrun (DDP over gloo) on CPU. The parent has
    already prepared the checkpoints."""
    import tempfile

    from workflow_scripts.common import run_logged

    spec = {**kwargs, "resume": str(resume) if resume else None}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=kwargs["checkpoint_dir"]) as f:
        json.dump(spec, f)
    if accelerate_config or torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc)]
        cmd += (
            ["--config_file", accelerate_config]
            if accelerate_config
            else ["--multi_gpu", "--num_machines", "1"]
        )
    else:
        # accelerate runs several CPU processes only through MPI; torchrun gives plain DDP (gloo) on CPU.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "workflow_scripts.training.train", "--spec", f.name]
    log.info("launching %d training processes: %s", nproc, " ".join(cmd))
    try:
        run_logged(cmd, check=True)  # the children's output reaches the log masked, like ours
    except subprocess.CalledProcessError as exc:
        raise StageError(
            f"train: distributed training failed (exit {exc.returncode}); see the log above"
        ) from None
    finally:
        Path(f.name).unlink(missing_ok=True)


def run(
    train_path: str,
    validation_path: str,
    model_dir: str,
    adapter_dir: str,
    metrics_csv: str,
    loss_png: str,
    run_json: str,
    checkpoint_dir: str,
    training: dict,
    peft_cfg: dict,
    wandb_cfg: dict,
    experiment: str,
    threads: int | None = None,
    gpus: int = 0,
) -> dict:
    kwargs = dict(locals())
    checkpoint_dir = Path(checkpoint_dir)
    fp = fingerprint(training, peft_cfg, [train_path, validation_path, str(Path(model_dir) / "config.json")])
    resume = prepare_checkpoint_dir(checkpoint_dir, fp)
    if resume is not None:
        log.info("resuming from %s", resume.name)
    else:
        log.info("no complete checkpoint in %s: training from scratch", checkpoint_dir)
    nproc = num_processes(training, gpus)
    if nproc > 1:
        launch_distributed(kwargs, nproc, resume, training.get("accelerate_config"))
        return json.loads(Path(run_json).read_text())
    return train_process(resume=resume, **kwargs)


def train_process(
    train_path: str,
    validation_path: str,
    model_dir: str,
    adapter_dir: str,
    metrics_csv: str,
    loss_png: str,
    run_json: str,
    checkpoint_dir: str,
    training: dict,
    peft_cfg: dict,
    wandb_cfg: dict,
    experiment: str,
    threads: int | None = None,
    gpus: int = 0,
    resume: Path | None = None,
) -> dict:
    """One training process (of one, or of several under accelerate launch)."""
    t_start = time.time()
    fast = training.get("fast_path") or {}
    set_threads(fast.get("threads") or threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint_dir = Path(checkpoint_dir)
    wandb_on = configure_wandb(wandb_cfg, Path(adapter_dir).parent / "wandb", experiment)
    report_to = ["wandb"] if wandb_on and "wandb" in (training.get("report_to") or ["wandb"]) else ["none"]
    torch.manual_seed(training.get("seed", 42))
    rows: list[dict] = []
    trainer, collator, info = build_trainer(
        train_path, validation_path, model_dir, training, peft_cfg, checkpoint_dir, report_to, device
    )
    trainer.add_callback(make_metrics_callback(trainer, collator, rows))
    info["world_size"] = trainer.args.world_size
    log.info("trainable parameters: %s", trainer.model.get_nb_trainable_parameters())
    log.info("training set-up: %s", info)
    done_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
    if resume and trainer.args.max_steps > 0 and done_step >= trainer.args.max_steps:
        # Killed after the last checkpoint but before the adapter was written: nothing left to train.
        log.info("%s already reached max_steps=%d; loading it", resume.name, trainer.args.max_steps)
        trainer._load_from_checkpoint(str(resume))
        trainer.state = trainer.state.load_from_json(str(resume / "trainer_state.json"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = type(
            "Result", (), {"training_loss": sum(losses) / len(losses) if losses else float("nan")}
        )()
    else:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    last_eval = max((r["step"] for r in rows if r.get("eval_loss") is not None), default=None)
    if trainer.args.eval_strategy != "no" and last_eval != trainer.state.global_step:
        trainer.evaluate()  # validation loss of the final adapter, logged into metrics.csv
    if not trainer.is_world_process_zero():
        return {}
    formatter = load_chat_formatter(model_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_path(adapter_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        formatter.save_pretrained(tmp)
    write_metrics(rows, metrics_csv, loss_png)
    summary = {
        "experiment": experiment,
        "resolved_config": {"training": training, "peft": peft_cfg, "wandb": wandb_cfg},
        "versions": library_versions(),
        "git_commit": git_commit(),
        "seed": trainer.args.seed,
        "device": device,
        "setup": info,
        "resumed_from": resume.name if resume else None,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_eval_loss": next(
            (r["eval_loss"] for r in reversed(rows) if r.get("eval_loss") is not None), None
        ),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "wall_time_s": round(time.time() - t_start, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "real_tokens_seen_this_run": collator.real_tokens,
    }
    write_json(run_json, summary)
    log.info("done: step %d, train loss %.4f", trainer.state.global_step, result.training_loss)
    return summary


def _from_snakemake(smk) -> None:
    run(
        smk.input.train,
        smk.input.validation,
        smk.input.model_dir,
        smk.output.adapter_dir,
        smk.output.metrics,
        smk.output.loss_plot,
        smk.output.run_info,
        smk.params.checkpoint_dir,
        dict(smk.params.training),
        dict(smk.params.peft),
        dict(smk.params.wandb),
        smk.params.experiment,
        smk.threads,
        smk.params.gpus,
    )


def main() -> None:
    """Entry of each process under `accelerate launch` (see launch_distributed)."""
    import argparse

    from workflow_scripts.common import setup_logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    setup_logging(None)
    resume = spec.pop("resume")
    train_process(resume=Path(resume) if resume else None, **spec)


if "snakemake" in globals():
    snakemake_main(snakemake, _from_snakemake)
elif __name__ == "__main__":
    main()
