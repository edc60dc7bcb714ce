"""The train stage under successive halving: rung after rung, each a fresh run of the script,
equals straight training; a rung whose checkpoint is already there trains nothing; a rung resumes
from the newest checkpoint at or before its step."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import train_job, write_formatted
from safetensors.torch import load_file

from workflow_scripts.files import write_json
from workflow_scripts.models.loading import bf16_is_fast, load_chat_formatter, torch_device
from workflow_scripts.stage import Job
from workflow_scripts.training import train as train_stage

# The first bf16_is_fast() call of a process times matmuls of torch.randn draws after train.py's seed
# (then it is cached), so the first run in a process would get another LoRA init than the runs after
# it. Each Snakemake job is a fresh process that makes that call the same way; here it is made once
# before any run, so every run of this module starts alike.
bf16_is_fast(torch_device())
RUNGS = (2, 5, 8)  # 24 examples / batch 4 = 6 steps an epoch: the last rung crosses an epoch boundary
POINT = "sweeps/s/lr~0.01"
TRAINING = {
    "learning_rate": 0.01,
    "max_steps": RUNGS[-1],
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 100,  # no evaluation inside a rung: only the rung's own, at its step
    "save_steps": 100,
    "save_total_limit": 2,
    "lr_scheduler_type": "linear",  # a decaying schedule: a wrong horizon would change the steps
    "seed": 1,
    "report_to": ["none"],
}
PEFT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}  # dropout: RNG restored


@pytest.fixture
def formatted(tmp_path, tiny_model_dir, tiny_tokenizer):
    return write_formatted(tmp_path, load_chat_formatter(tiny_model_dir), tiny_tokenizer)


def rung_job(
    point_job: Job, rung: int, start: int, target: int, previous_record: str | None = None, rungs=RUNGS
) -> Job:
    """The Job of rung ``rung`` (steps ``start`` to ``target``) for the point ``point_job`` trains:
    `train_rung0` (its own params), `train_rung` (slot 0 of a promotion naming ``previous_record``),
    or `train_finalist` (the last rung: the outputs of `train`)."""
    out = Path(point_job.params.checkpoint_dir).parent
    final = target == TRAINING["max_steps"]
    halving = {
        "rung": rung,
        "slot": None,
        "point": POINT,
        "target_step": target,
        "rung_start": start,
        "final": final,
        "rungs": list(rungs),
    }
    inputs, params = dict(point_job.input), {**point_job.params, "halving": halving}
    if rung > 0:
        promotion = out / "halving" / f"promotion-{rung - 1}.json"
        write_json(promotion, {"survivors": [{"point": POINT, "record": previous_record}]})
        inputs["promotion"] = str(promotion)
        halving.update(slot=0, point=None)
        params.update(training=None, peft=None, checkpoint_dir=None, experiment="finalist" if final else None)
    outputs = (
        dict(point_job.output) if final else {"record": str(out / "halving" / f"rung-{rung}-{target}.json")}
    )
    return Job(input=inputs, output=outputs, params=params)


def logged(metrics_csv: str, column: str) -> dict[int, float]:
    frame = pd.read_csv(metrics_csv).dropna(subset=[column])
    return dict(zip(frame["step"], frame[column], strict=True))


def last_eval_in_checkpoint(checkpoint: str) -> dict:
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "eval_loss" in h][-1]


def test_rung_after_rung_equals_straight_training(tmp_path, formatted, tiny_model_dir):
    straight = train_job(tmp_path / "straight", formatted, tiny_model_dir, TRAINING, PEFT)
    train_stage.run(straight)

    point = train_job(tmp_path / "point", formatted, tiny_model_dir, TRAINING, PEFT)
    previous = None
    for rung, (start, target) in enumerate(zip((0, *RUNGS), RUNGS, strict=False)):
        job = rung_job(point, rung, start, target, previous)
        result = train_stage.run(job)
        if rung < len(RUNGS) - 1:
            assert json.loads(Path(job.output.record).read_text()) == result  # what the file holds
            assert (result["resumed_from_step"], result["steps_trained"]) == (start, target - start)
            assert result["steps"] == target - start and result["global_step"] == target
            # the trainer evaluates before it saves: the rung's checkpoint holds the rung's validation loss
            assert result["checkpoint"] == f"{point.params.checkpoint_dir}/checkpoint-{target}"
            in_checkpoint = last_eval_in_checkpoint(result["checkpoint"])
            assert (in_checkpoint["step"], in_checkpoint["eval_loss"]) == (target, result["eval_loss"])
            previous = job.output.record

    assert result["point"] == POINT and result["experiment"] == "finalist"
    assert result["halving"] == {"rung": 2, "slot": 0, "rung_start": 5, "steps": 3, "resumed_from_step": 5}
    # Exactly equal, step by step: same seed, optimizer, scheduler and RNG state restored, evaluation
    # leaves the RNG alone, and CPU kernels are deterministic (a GPU may differ in the last bits)
    assert logged(point.output.metrics, "loss") == logged(straight.output.metrics, "loss")
    assert set(logged(point.output.metrics, "loss")) == set(range(1, RUNGS[-1] + 1))
    assert (
        logged(point.output.metrics, "eval_loss")[RUNGS[-1]]
        == logged(straight.output.metrics, "eval_loss")[RUNGS[-1]]
    )
    weights = load_file(Path(point.output.adapter_dir) / "adapter_model.safetensors")
    reference = load_file(Path(straight.output.adapter_dir) / "adapter_model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)


def test_rung_with_its_checkpoint_trains_nothing(tmp_path, formatted, tiny_model_dir):
    point = train_job(tmp_path / "point", formatted, tiny_model_dir, TRAINING, PEFT)
    job = rung_job(point, 0, 0, RUNGS[0])
    first = train_stage.run(job)
    again = train_stage.run(job)  # e.g. the record deleted, or a re-run after a crash
    assert again["steps_trained"] == 0 and again["resumed_from_step"] == RUNGS[0]
    assert again["eval_loss"] == first["eval_loss"] and again["steps"] == first["steps"]
    # without the evaluation in the checkpoint's log, one evaluation of its weights gives the same loss
    state_file = Path(first["checkpoint"]) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"] = [h for h in state["log_history"] if "eval_loss" not in h]
    state_file.write_text(json.dumps(state))
    evaluated = train_stage.run(job)
    assert evaluated["steps_trained"] == 0
    assert evaluated["eval_loss"] == first["eval_loss"]  # the same weights, the same batches


def test_rung_resumes_at_or_before_its_step(tmp_path, formatted, tiny_model_dir):
    """Checkpoints past the rung's step (the point went further under other rungs) are not resumed
    from: the job continues from the newest one at or before its step and rewrites the rest."""
    point = train_job(tmp_path / "point", formatted, tiny_model_dir, TRAINING, PEFT)
    rung0 = rung_job(point, 0, 0, 2)
    train_stage.run(rung0)
    train_stage.run(rung_job(point, 1, 2, 5, rung0.output.record))
    checkpoints = Path(point.params.checkpoint_dir)
    assert {p.name for p in checkpoints.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-5"}
    record = train_stage.run(rung_job(point, 1, 2, 4, rung0.output.record, rungs=(2, 4, 8)))  # rungs changed
    assert (record["resumed_from_step"], record["steps_trained"], record["global_step"]) == (2, 2, 4)
    assert {p.name for p in checkpoints.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}


def test_the_rungs_checkpoints_outlive_the_rotation(tmp_path, formatted, tiny_model_dir):
    """save_total_limit 1 with a checkpoint every step: the trainer's own rotation would delete each
    rung's checkpoint as the oldest. A halving point keeps them, so a re-run of an earlier rung (a
    point added to the sweep re-takes the promotions) trains nothing and deletes nothing."""
    training = {**TRAINING, "save_steps": 1, "save_total_limit": 1}
    point = train_job(tmp_path / "point", formatted, tiny_model_dir, training, PEFT)
    records = []
    for rung, (start, target) in enumerate(zip((0, *RUNGS), RUNGS, strict=False)):
        job = rung_job(point, rung, start, target, records[-1] if records else None)
        train_stage.run(job)
        records.append(job.output.get("record"))
    checkpoints = Path(point.params.checkpoint_dir)
    names = {p.name for p in checkpoints.glob("checkpoint-*")}
    assert names == {f"checkpoint-{s}" for s in RUNGS}  # the newest (8) and every rung's
    again = train_stage.run(rung_job(point, 1, RUNGS[0], RUNGS[1], records[0]))
    assert (again["resumed_from_step"], again["steps_trained"]) == (RUNGS[1], 0)
    assert {p.name for p in checkpoints.glob("checkpoint-*")} == names


def test_rung_jobs_run_in_several_processes(tmp_path, formatted, tiny_model_dir):
    """training.num_processes=2: a slot job's point, read from the promotion, travels to the processes."""
    training = {**TRAINING, "num_processes": 2}
    point = train_job(tmp_path / "point", formatted, tiny_model_dir, training, PEFT)
    rung0 = rung_job(point, 0, 0, 2)
    first = train_stage.run(rung0)
    second = train_stage.run(rung_job(point, 1, 2, 4, rung0.output.record))
    assert (first["global_step"], second["resumed_from_step"], second["global_step"]) == (2, 2, 4)
    assert second["point"] == POINT and second["training"]["num_processes"] == 2
    assert second["eval_loss"] == last_eval_in_checkpoint(second["checkpoint"])["eval_loss"]
