"""Stage 5: LoRA fine-tuning with TRL's SFTTrainer + PEFT, read top to bottom as a recipe.

Set-up: the checkpoint to resume from (checkpoints.py: a crash resumes from the newest complete
one; a changed config or data starts fresh), one process per GPU when there are several
(launch.py), W&B (tracking.py), the model with LoRA on the layers its family allows, the trainer.
Train: ``trainer.train(resume_from_checkpoint=...)``. Save: the adapter and the chat formatter,
metrics.csv and the loss plot, run.json with the provenance of the run.

Successive halving (params.halving set) runs the same recipe in slices of one trajectory: where a
rung stops, its callbacks and its record are rungs.py's.
"""

import json
import logging
import time
from pathlib import Path

import torch

from workflow_scripts import cluster
from workflow_scripts.data.tokens import open_tokens
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.models.families import ModelFamily, family_of
from workflow_scripts.models.loading import (
    bf16_is_fast,
    bf16_speed,
    load_chat_formatter,
    load_model,
    load_tokenizer,
    torch_device,
)
from workflow_scripts.stage import Job, StageError, set_threads, snakemake_main
from workflow_scripts.trainer_fields import lora_kwargs, trainer_kwargs
from workflow_scripts.training import launch
from workflow_scripts.training.checkpoints import (
    check_world_size,
    checkpoint_step,
    fingerprint,
    load_checkpoint,
    prepare_checkpoint_dir,
)
from workflow_scripts.training.data import Collator
from workflow_scripts.training.rungs import Rung, resolve_point
from workflow_scripts.training.tracking import (
    MetricsCallback,
    configure_wandb,
    eval_loss_at,
    git_commit,
    library_versions,
    mean_logged_loss,
    peak_memory_mb,
    write_metrics,
)

log = logging.getLogger("snaketune.train")


# ---------------------------------------------------------------- the stage
def run(job: Job) -> dict:
    """The `train` rule (and the halving rules `train_rung0`, `train_rung`, `train_finalist`): find
    the checkpoint to resume from, then train in this process or in one process per GPU."""
    job = resolve_point(job)
    training, peft_cfg, rung = job.params.training, job.params.peft, Rung.of(job)
    checkpoint_dir = Path(job.params.checkpoint_dir)
    if rung:
        rung.check_fits(training)
    data = [job.input.train, job.input.validation, str(Path(job.input.model_dir) / "config.json")]
    resume = prepare_checkpoint_dir(
        checkpoint_dir, fingerprint(training, peft_cfg, data), max_step=rung.target if rung else None
    )
    if resume is not None:
        log.info("resuming from %s", resume.name)
    else:
        log.info("no complete checkpoint in %s: training from scratch", checkpoint_dir)
    if rung:
        rung.discard_later_checkpoints(checkpoint_dir, resume)
    nproc, nodes = launch.num_processes(training, job.params.gpus), training["nodes"]
    if resume is not None:
        check_world_size(resume, nodes * nproc)
    # by import name: as a Snakemake script this file runs as __main__, which a child cannot import
    entry = "workflow_scripts.training.train:train_process"
    if nodes > 1:
        launch.relaunch_nodes(job, nodes, nproc, resume, checkpoint_dir, entry)
    elif nproc > 1:
        launch.relaunch(job, nproc, resume, checkpoint_dir, entry)
    else:
        return train_process(job, resume)
    return json.loads(Path(job.output.get("run_info") or job.output.record).read_text())


def train_process(job: Job, resume: Path | None) -> dict:
    """One training process (of one, or of several under `launch.relaunch`)."""
    t_start = time.time()
    training, peft_cfg, wandb_cfg = job.params.training, job.params.peft, job.params.wandb
    rung = Rung.of(job)
    rung_job = rung is not None and not rung.final  # stops at its rung, writes a record

    # ---- set-up
    set_threads(training["fast_path"]["threads"] or job.threads)
    device = torch_device()
    out_dir = Path(job.output.adapter_dir if not rung_job else job.params.checkpoint_dir).parent
    # a halving point's runs (each rung's, the finalist's) are named after the point
    wandb_on = configure_wandb(
        wandb_cfg, out_dir / "wandb", rung.halving["point"] if rung else job.params.experiment
    )
    # W&B only where the wandb section enables it and training.report_to (a TRL key) names it
    report_to = ["wandb"] if wandb_on and "wandb" in training["report_to"] else ["none"]
    torch.manual_seed(training["seed"])
    callbacks, trainer_training = rung.trainer_setup(training) if rung else ([], training)
    trainer, collator, info = build_trainer(
        job.input.train,
        job.input.validation,
        job.input.model_dir,
        trainer_training,
        peft_cfg,
        Path(job.params.checkpoint_dir),
        report_to,
        device,
        extra_callbacks=callbacks,
    )
    if rung:
        rung.attach(trainer)
    metrics = MetricsCallback(trainer, collator)
    if resume:
        metrics.restore(resume)  # the steps logged before the crash stay in metrics.csv
    trainer.add_callback(metrics)
    info["world_size"] = trainer.args.world_size
    ran_on = node_names()  # every rank takes part
    log.info("trainable parameters: %s", trainer.model.get_nb_trainable_parameters())
    log.info("training set-up: %s", info)

    # ---- train
    resumed_step = checkpoint_step(resume) if resume else 0
    stop_step = rung.target if rung else trainer.args.max_steps
    if resume and 0 < stop_step <= resumed_step:
        # Killed after the last checkpoint, before the outputs were written, or a rung's checkpoint
        # already there: nothing is left to train (Trainer.train would take one step more).
        log.info("%s already reached step %d; loading it", resume.name, stop_step)
        load_checkpoint(trainer, resume)
        train_loss = mean_logged_loss(trainer.state.log_history)
    else:
        train_loss = trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss
        if resume:  # the trainer's mean covers this run's steps only: the whole run's, as a straight run's
            train_loss = mean_logged_loss(trainer.state.log_history)
    if rung:
        rung.check_reached(trainer.state.global_step)
    if trainer.args.eval_strategy != "no" and metrics.last_eval_step() != trainer.state.global_step:
        trainer.evaluate()  # validation loss of the final adapter, logged into metrics.csv
    if not trainer.is_world_process_zero():
        return {}

    # ---- save
    if rung_job:
        return rung.write_record(trainer.state.log_history, resumed_step, round(time.time() - t_start, 1))
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_path(job.output.adapter_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        load_chat_formatter(job.input.model_dir).save_pretrained(tmp)
    write_metrics(metrics.rows, job.output.metrics, job.output.loss_plot)
    summary = {
        "experiment": job.params.experiment,
        "resolved_config": {"training": training, "peft": peft_cfg, "wandb": wandb_cfg},
        "versions": library_versions(),
        "git_commit": git_commit(),
        "seed": trainer.args.seed,
        "device": device,
        "world_size": trainer.args.world_size,
        "nodes": ran_on,  # the nodes that ran ranks, in rank order
        "processes_per_node": trainer.args.world_size // len(ran_on),
        "setup": info,
        "resumed_from": resume.name if resume else None,
        "checkpoint_dir": str(job.params.checkpoint_dir),  # a halving finalist's: its point's folder
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "final_eval_loss": eval_loss_at(trainer.state.log_history, trainer.state.global_step),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "wall_time_s": round(time.time() - t_start, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "real_tokens_seen_this_run": collator.real_tokens,
    }
    if rung:
        summary.update(rung.run_info(resumed_step))
    write_json(job.output.run_info, summary)
    log.info("done: step %d, train loss %.4f", trainer.state.global_step, train_loss)
    return summary


# ---------------------------------------------------------------- set-up
def node_names() -> list[str]:
    """The nodes the training's ranks run on, in rank order (a collective: every rank calls it)."""
    name = cluster.node_name()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [name]
    names = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(names, name)
    return list(dict.fromkeys(names))


def lora_config_for(model, peft_cfg: dict, family: ModelFamily):
    """The LoraConfig of the `peft` section, on the Linear layers the model's family allows."""
    from peft import LoraConfig

    kwargs = lora_kwargs(peft_cfg)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    targets = kwargs["target_modules"]
    full_names = family.lora_targets(model)
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
    if family.lora_scope is not None:
        # By exact module name: layers outside the scope (vision/audio towers) stay untouched.
        kwargs["target_modules"] = full_names
    return LoraConfig(**kwargs)


def build_peft_model(model_dir: str, peft_cfg: dict, dtype: torch.dtype, device: str):
    """(the base model with LoRA adapters, its family)."""
    from peft import get_peft_model

    family = family_of(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)
    model.config.use_cache = False
    # autocast_adapter_dtype keeps the LoRA weights in fp32 while frozen weights may be bf16
    peft_model = get_peft_model(model, lora_config_for(model, peft_cfg, family), autocast_adapter_dtype=True)
    return peft_model, family


def dtype_policy(frozen_bf16: bool, autocast_bf16: bool, lora_bf16: bool) -> str:
    """The dtype policy a training runs with, in words (run.json and the log name it)."""
    if frozen_bf16:
        return f"bf16 frozen weights, {'bf16 LoRA compute over ' if lora_bf16 else ''}fp32 LoRA weights"
    return "bf16 autocast" if autocast_bf16 else "fp32"


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
    """The configured trainer, exactly as the `train` rule runs it (benchmarks reuse this).
    ``train_path`` / ``validation_path``: token files (`{split}.tokens.arrow`), memory-mapped."""
    from trl import SFTConfig

    from workflow_scripts.training.bf16_compute import (
        EAGER_MAX_SCORES,
        compile_decoder_layers,
        use_bf16_lora_compute,
        use_small_eager_attention,
    )
    from workflow_scripts.training.trainer import SnaketuneTrainer

    fast = training["fast_path"]
    use_bf16 = bf16_is_fast(device)
    # Frozen weights stored in bf16 (no per-step autocast re-cast); otherwise fp32 (+ autocast on GPU).
    store_bf16 = use_bf16 and fast["bf16_frozen_weights"]
    dtype = torch.bfloat16 if store_bf16 else torch.float32
    model, family = build_peft_model(model_dir, peft_cfg, dtype, device)
    # bf16 compute on the trainable path too (training/bf16_compute.py says why and what stays fp32)
    lora_bf16 = False
    if store_bf16 and fast["bf16_lora_compute"]:
        lora_bf16 = use_bf16_lora_compute(model) > 0  # none: no LoRA Linear to compute in bf16
    small_eager = store_bf16 and device == "cpu" and fast["eager_small_attention"]
    if small_eager:
        use_small_eager_attention(model.get_base_model())
    tok = load_tokenizer(model_dir)
    kwargs = trainer_kwargs(training)  # keys snaketune sets itself are refused at load (checks.py)
    # Compiled here, not by the Trainer (compile_decoder_layers says why); as in TrainingArguments,
    # a backend or mode alone asks for compilation too.
    backend, mode = kwargs.pop("torch_compile_backend", None), kwargs.pop("torch_compile_mode", None)
    compiled = 0
    if kwargs.pop("torch_compile", False) or backend or mode:
        compiled = compile_decoder_layers(model, backend, mode)
        if not compiled:
            raise StageError(f"training.torch_compile: no decoder layers found in {model_dir}")
    kwargs.setdefault("bf16", use_bf16 and not store_bf16)
    if kwargs["bf16"] and not use_bf16:
        log.warning("training.bf16 requested but this hardware has no fast bf16; using fp32")
        kwargs["bf16"] = False
    policy = dtype_policy(store_bf16, kwargs["bf16"], lora_bf16)
    if use_bf16 and policy == "fp32":
        _, sec16, sec32 = bf16_speed(device)
        faster = f" (its bf16 matmul {sec32 / sec16:.1f}x as fast as fp32)" if sec16 else ""
        log.warning(
            "this %s runs bf16 fast%s, but training.bf16: false and training.fast_path.bf16_frozen_weights: "
            "false pin fp32 (config.yaml does, for digit-exact demo numbers): drop both lines for bf16",
            device.upper() if device == "cuda" else "CPU",
            faster,
        )
    # gradient_checkpointing and eval_strategy arrive from the schema (snaketune's defaults differ
    # from TRL's there, with the reasons in the schema).
    kwargs["report_to"] = report_to
    patience = training["early_stopping_patience"]
    if patience:
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=device == "cpu",
        disable_tqdm=False,
        **kwargs,
    )
    collator = Collator(tok.pad_token_id, pack=fast["packing"], max_length=training["max_length"])
    # Memory-mapped token files: rows reach the collator as they are (prompt_length and length too:
    # remove_unused_columns=False), and the collator makes the labels.
    train_ds = open_tokens(train_path)
    eval_ds = open_tokens(validation_path) if args.eval_strategy != "no" else None
    if fast["group_by_length"]:
        # Examples of similar length share a step: little padding to compute. The sampler reads the
        # token file's `length` column (args.length_column_name), never the ids.
        args.train_sampling_strategy = "group_by_length"
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
        labels_only_logits=fast["labels_only_logits"],
    )
    info = {
        "dtype_policy": policy,
        "fp32_pinned_on_fast_bf16": use_bf16 and policy == "fp32",
        "bf16_hardware": use_bf16,
        "frozen_dtype": str(dtype),
        "attention": (
            f"plain matmuls up to {EAGER_MAX_SCORES:,} scores a call, else sdpa"
            if small_eager
            else model.get_base_model().config._attn_implementation
        ),
        "group_by_length": args.train_sampling_strategy == "group_by_length",
        "packing": fast["packing"],
        "labels_only_logits": fast["labels_only_logits"],
        "gradient_checkpointing": args.gradient_checkpointing,
        "compiled_decoder_layers": compiled,
        "model_family": family.name,
    }
    return trainer, collator, info


if "snakemake" in globals():
    snakemake_main(snakemake, run)
