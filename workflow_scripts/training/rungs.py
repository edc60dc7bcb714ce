"""Successive halving inside the train stage: a rung job (params.halving, sweeps/plan.py builds it)
trains its point in one slice of one trajectory.

A rung job continues its point from the newest checkpoint at or before the rung's step, stops there
with a checkpoint and a validation loss, and writes a rung record; the final rung (a finalist)
writes the train rule's outputs. The schedule runs over training.max_steps (the last rung), so rung
after rung equals straight training. Past rung 0 the promotion names the point a slot holds
(`resolve_point`), at run time.
"""

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from workflow_scripts.files import write_json
from workflow_scripts.stage import Job, StageError
from workflow_scripts.training.checkpoints import (
    checkpoint_is_complete,
    checkpoint_step,
    discard_checkpoints_after,
    rotate_checkpoints,
)
from workflow_scripts.training.tracking import eval_loss_at

log = logging.getLogger("snaketune.train")


def resolve_point(job: Job) -> Job:
    """The job with its point's training, peft and checkpoint_dir in params (and halving.point
    named). A plain or rung-0 job has them already; a later rung's slot reads the record of the
    point the promotion put in that slot."""
    halving = job.params.get("halving")
    if halving is None or halving["rung"] == 0:
        return job
    promotion = json.loads(Path(job.input.promotion).read_text())
    survivors, slot = promotion["survivors"], halving["slot"]
    if not 0 <= slot < len(survivors):
        raise StageError(f"{job.input.promotion}: no survivor for slot {slot} ({len(survivors)} survivors)")
    record = json.loads(Path(survivors[slot]["record"]).read_text())
    params = {
        **job.params,
        "training": record["training"],
        "peft": record["peft"],
        "checkpoint_dir": record["checkpoint_dir"],
        "halving": {**halving, "point": survivors[slot]["point"]},
    }
    return Job(input=job.input, output=job.output, params=params, threads=job.threads)


class StopAtStep(TrainerCallback):
    """Ends training at ``step`` with a checkpoint and a validation loss of that step (a rung's end).
    The trainer evaluates before it saves, so the checkpoint's trainer_state holds that loss.

    An evaluation the schedule would not make at that step is marked RNG-neutral (the trainer
    restores torch's RNG after it): the checkpoint then carries the RNG state of a straight run, so
    the next rung continues exactly as if the point had never stopped. (The default flow callback
    runs first, so ``control.should_evaluate`` already says whether the schedule evaluates here.)"""

    def __init__(self, step: int):
        self.step = step
        self.trainer = None  # set once the trainer exists

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            if not control.should_evaluate:
                self.trainer.rng_neutral_eval_step = state.global_step
            control.should_evaluate = control.should_save = control.should_training_stop = True
        return control


class KeepRungCheckpoints(TrainerCallback):
    """A halving point's checkpoint rotation (checkpoints.rotate_checkpoints) after every save, in
    place of the trainer's: the rungs' checkpoints are never rotated away."""

    def __init__(self, checkpoint_dir: Path, limit: int | None, rungs: list[int]):
        self.checkpoint_dir, self.limit, self.rungs = checkpoint_dir, limit, set(rungs)

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            rotate_checkpoints(self.checkpoint_dir, self.limit, self.rungs)


class Rung:
    """The rung a job trains (its params.halving, the point resolved): where it stops, the callbacks
    that stop it there and keep its checkpoints, and what it reports."""

    def __init__(self, job: Job):
        self.job, self.halving = job, job.params.halving
        self.target = self.halving["target_step"]
        self.final = self.halving["final"]  # the last rung writes the train rule's outputs
        self.stop = None if self.final else StopAtStep(self.target)

    @classmethod
    def of(cls, job: Job) -> "Rung | None":
        """The job's rung; None for a plain training."""
        return cls(job) if job.params.get("halving") is not None else None

    def check_fits(self, training: dict) -> None:
        """The rung's step lies within max_steps, and only the last rung ends there."""
        if not (
            0 < self.target <= training["max_steps"] and (self.target == training["max_steps"]) == self.final
        ):
            raise StageError(
                f"halving: target_step {self.target} of rung {self.halving['rung']} does not fit "
                f"training.max_steps {training['max_steps']} (the last rung must equal it, the others lie below)"
            )

    def discard_later_checkpoints(self, checkpoint_dir: Path, resume: Path | None) -> None:
        """A rung that has not reached its step drops the point's checkpoints past where it resumes
        (left by a later rung of an earlier plan): they are not this trajectory's."""
        if resume is None or checkpoint_step(resume) < self.target:
            discard_checkpoints_after(checkpoint_dir, checkpoint_step(resume) if resume else 0)

    def trainer_setup(self, training: dict) -> tuple[list, dict]:
        """(callbacks, training section for the trainer): the rungs' checkpoints stay out of the
        trainer's rotation (KeepRungCheckpoints rotates the others)."""
        limit = training.get("save_total_limit")
        keep = KeepRungCheckpoints(Path(self.job.params.checkpoint_dir), limit, self.halving["rungs"])
        return [c for c in (self.stop, keep) if c], {**training, "save_total_limit": None}

    def attach(self, trainer) -> None:
        if self.stop:
            self.stop.trainer = trainer

    def check_reached(self, global_step: int) -> None:
        if global_step != self.target:
            raise StageError(
                f"halving: {self.halving['point']} stopped at step {global_step}, not at its rung's "
                f"target_step {self.target}"
            )

    def write_record(self, log_history: list[dict], resumed_step: int, wall_time_s: float) -> dict:
        """A non-final rung's output: the point's validation loss at the rung's step, the checkpoint
        the next rung continues from, and the steps the rung cost."""
        h, checkpoint_dir = self.halving, self.job.params.checkpoint_dir
        checkpoint = Path(checkpoint_dir) / f"checkpoint-{self.target}"
        if not checkpoint_is_complete(checkpoint):
            raise StageError(
                f"halving: {checkpoint} was not saved (training.save_strategy must allow saving)"
            )
        record = {
            **{k: h[k] for k in ("point", "rung", "slot", "target_step", "rung_start")},
            "steps": self.target - h["rung_start"],
            "resumed_from_step": resumed_step,
            "steps_trained": self.target - resumed_step,
            "global_step": self.target,
            "eval_loss": eval_loss_at(log_history, self.target),
            "checkpoint": str(checkpoint),
            "checkpoint_dir": checkpoint_dir,
            "training": self.job.params.training,
            "peft": self.job.params.peft,
            "wall_time_s": wall_time_s,
        }
        write_json(self.job.output.record, record)
        log.info("rung %d done: step %d, validation loss %.4f", h["rung"], self.target, record["eval_loss"])
        return record

    def run_info(self, resumed_step: int) -> dict:
        """What a finalist's run.json adds: the point it trained and its last rung."""
        h = self.halving
        rung = {k: h[k] for k in ("rung", "slot", "rung_start")}
        rung.update(steps=self.target - h["rung_start"], resumed_from_step=resumed_step)
        return {"point": h["point"], "halving": rung}
