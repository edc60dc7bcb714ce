"""The plan of a sweep: what every point starts from (`sweep_base`), and for successive halving
the checks at load, how many points each rung trains (its slots), the files that connect the rungs
and each rung job's parameters. Static: `snakemake -n` shows every job before anything runs; which
point a slot holds is read from the promotion at run time (promote.py writes it).
"""

import copy
import itertools
import math
import re
from dataclasses import dataclass

from workflow_scripts import layout
from workflow_scripts.errors import ConfigError
from workflow_scripts.layout import FORMAT_KEYS, Experiment

# Training keys a halving sweep cannot vary: max_length/overlength change the formatted (so the
# validation) data the rungs rank on, max_steps is the last rung.
HALVING_FIXED_TRAINING = (*FORMAT_KEYS, "max_steps")


def check_halving(sweep: dict, training: dict, overrides: list[dict]) -> None:
    """What a halving sweep needs, refused at load naming the key (the points are checked by
    `halving_point_problems` once resolved)."""
    halving = sweep.get("halving")
    if halving is None:
        raise ConfigError("sweep.halving: required with sweep.strategy: halving (rungs and keep)")
    rungs = halving["rungs"]
    if any(b <= a for a, b in itertools.pairwise(rungs)):
        raise ConfigError(f"sweep.halving.rungs: {rungs} must be strictly increasing training steps")
    if training["max_steps"] not in (-1, rungs[-1]):
        raise ConfigError(
            f"sweep.halving.rungs: the last rung ({rungs[-1]}) is every point's max_steps, but "
            f"training.max_steps is {training['max_steps']} (config.yaml's demo value applies unless you "
            f"set it): set training.max_steps to {rungs[-1]} or -1"
        )
    for origin, dotted in _varied_keys(sweep, overrides):
        section, _, key = dotted.partition(".")
        top = key.split(".", 1)[0]
        if section not in ("training", "peft") or (section == "training" and top in HALVING_FIXED_TRAINING):
            raise ConfigError(
                f"sweep.{origin}: {dotted}: a halving sweep ranks every point on one validation split at "
                f"the same steps, so its points vary only training and peft keys (not "
                f"{', '.join('training.' + k for k in HALVING_FIXED_TRAINING)})"
            )


def _varied_keys(sweep: dict, overrides: list[dict]) -> list[tuple[str, str]]:
    """(where it is written, dotted key) of every key the sweep's points set."""
    written = [("grid", k) for k in sweep.get("grid") or {}]
    written += [(f"points[{i}]", k) for i, p in enumerate(sweep.get("points") or []) for k in p]
    written += [("samples.space", k) for k in (sweep.get("samples") or {}).get("space", {})]
    seen = {k for _, k in written}
    return written + [("points", k) for o in overrides for k in o if k not in seen]


def halving_point_problems(point: dict) -> list[str]:
    """A resolved point's settings halving cannot work with (a point may set them itself)."""
    training = point["training"]
    problems = []
    if training["eval_strategy"] != "steps":
        problems.append(
            f"training.eval_strategy: {training['eval_strategy']!r} — halving ranks points on the validation "
            "loss at each rung's step, and an epoch's evaluation (and save) at a rung's end would change the "
            "state a promoted point continues from; use 'steps'"
        )
    if training["early_stopping_patience"]:
        problems.append(
            "training.early_stopping_patience: halving stops points early itself; a point stopped before "
            "a rung's step could not be compared there (set it to null)"
        )
    # TRL keys (set only when the user sets them) that break continuing a point from its rung checkpoint
    breaks = {
        "save_only_model": "a rung's checkpoint needs the optimizer and scheduler to continue from",
        "load_best_model_at_end": "a finalist must be the model at the last step, as a straight run's",
        "ignore_data_skip": "a continued point would see the first batches of its epoch again",
    }
    problems += [f"training.{k}: true — {why}" for k, why in breaks.items() if training.get(k)]
    if training.get("save_strategy") == "best":
        problems.append("training.save_strategy: 'best' — every rung must save a checkpoint at its step")
    return problems


def halving_slots(n_points: int, keep: float, n_rungs: int) -> list[int]:
    """How many points train in each rung: all at the first, then ceil(keep * previous), at least 1."""
    slots = [n_points]
    for _ in range(n_rungs - 1):
        slots.append(max(1, math.ceil(keep * slots[-1] - 1e-9)))
    return slots


class PlanError(ValueError):
    """A rung job asked for that the plan does not have (a path given by hand)."""


@dataclass(frozen=True)
class Halving:
    """The static plan of a halving sweep: every rung's slots, the files that connect them
    (layout.py spells them) and the parameters of each rung job.

    results/sweeps/{S}/{point}/halving/rung-0.json       each point's first rung (train_rung0)
    results/sweeps/{S}/halving/promotion-{r}.json        the survivors of rung r (promote)
    results/sweeps/{S}/halving/rung-{r}/slot-{k}.json    slot k of a middle rung r (train_rung)
    results/sweeps/{S}/finalist-{k}/                     slot k of the last rung: an experiment
                                                         (train_finalist, then merge, evaluation ...)
    """

    sweep: str
    rungs: tuple[int, ...]
    keep: float
    slots: tuple[int, ...]
    points: tuple[Experiment, ...]
    finalists: tuple[Experiment, ...]

    @property
    def folder(self) -> str:
        return layout.halving_dir(self.sweep)

    @property
    def last(self) -> int:
        return len(self.rungs) - 1

    # The rules' output patterns; record() and promotion() fill them in.
    RUNG0_RECORD = layout.RUNG0_RECORD

    @property
    def slot_record(self) -> str:
        return layout.slot_record(self.sweep)

    @property
    def promotion_file(self) -> str:
        return layout.promotion_file(self.sweep)

    @property
    def finalist_re(self) -> str:
        """The shape of the finalists' experiment names (train_finalist's wildcard constraint)."""
        return layout.point_experiment(re.escape(self.sweep), layout.FINALIST_RE)

    def record(self, rung: int, slot: int) -> str:
        """The record of slot ``slot`` of rung ``rung`` < last (at rung 0, a slot is a point)."""
        if rung == 0:
            return self.RUNG0_RECORD.format(point=self.points[slot].name)
        return self.slot_record.format(rung=rung, slot=slot)

    def records(self, rung: int) -> list[str]:
        return [self.record(rung, k) for k in range(self.slots[rung])]

    def promotion(self, rung: int) -> str:
        return self.promotion_file.format(rung=rung)

    def rung_records(self) -> list[str]:
        """Every rung's records but the last's (rung 0's points, then each middle rung's slots)."""
        return [f for r in range(self.last) for f in self.records(r)]

    def promotions(self) -> list[str]:
        return [self.promotion(r) for r in range(self.last)]

    def records_of(self, rung: str) -> list[str]:
        """The records promote ranks for rung ``rung`` (wildcard text)."""
        return self.records(int(rung))

    def filled_by(self, rung: str) -> str:
        """The promotion that filled the slots of rung ``rung`` > 0 (wildcard text)."""
        return self.promotion(int(rung) - 1)

    def checked_against(self, rung: str) -> list[str]:
        """What promote checks rung ``rung``'s records against: past rung 0, the promotion that
        filled its slots (the records must hold the points it names)."""
        return [self.filled_by(rung)] if int(rung) > 0 else []

    def kept_after(self, rung: str) -> int:
        """How many points rung ``rung`` promotes: the next rung's slots."""
        return self.slots[int(rung) + 1]

    @property
    def final_promotion(self) -> str:
        """The promotion that names the finalists' points."""
        return self.promotion(self.last - 1)

    def plan(self) -> dict:
        """What the leaderboard and halving.json read of the plan."""
        return {
            "rungs": list(self.rungs),
            "keep": self.keep,
            "slots": list(self.slots),
            "points": [p.name for p in self.points],
            "finalists": [f.name for f in self.finalists],
        }

    # --- the rung jobs' parameters (params.halving of train_rung0, train_rung, train_finalist)

    def rung0_job(self, point: str) -> dict:
        """A point's first rung: it trains from step 0 to the first rung."""
        return self._job(0, None, point)

    def slot_job(self, rung: str, slot: str) -> dict:
        """Slot ``slot`` of middle rung ``rung`` (wildcard text): the promotion names its point, at run time."""
        r, k = int(rung), int(slot)
        if not 0 < r < self.last:
            self._refuse(r, k)
        return self._job(r, k, None)

    def finalist_job(self, experiment: str) -> dict:
        """A finalist (sweeps/{S}/finalist-{k}): slot k of the last rung."""
        return self._job(self.last, layout.finalist_slot(experiment), None)

    def _job(self, rung: int, slot: int | None, point: str | None) -> dict:
        if slot is not None and slot >= self.slots[rung]:
            self._refuse(rung, slot)
        return {
            "rung": rung,
            "slot": slot,
            "point": point,
            "target_step": self.rungs[rung],
            "rung_start": self.rungs[rung - 1] if rung else 0,
            "final": rung == self.last,
            "rungs": list(self.rungs),  # the checkpoints a point keeps (training/rungs.py)
        }

    def _refuse(self, rung: int, slot: int):
        raise PlanError(
            f"halving: no slot {slot} of rung {rung} here: slots per rung {list(self.slots)}; the slots of "
            f"rungs 1..{self.last - 1} are {self.slot_record}, the last rung's are "
            f"{layout.point_experiment(self.sweep, layout.FINALIST)}"
        )


def halving(config: dict, points: list[Experiment]) -> Halving | None:
    """The halving plan of a sweep with `strategy: halving` (None otherwise). The finalists are
    experiments of the sweep's base config: which point each one holds is decided at run time
    (its run.json and experiment.json name it)."""
    sweep = config.get("sweep")
    if not sweep or sweep["strategy"] != "halving":
        return None
    for p in points:
        problems = halving_point_problems(p.config)
        if problems:
            raise ConfigError(f"sweep point {layout.point_of(p.name)}: {problems[0]}")
    rungs, keep = tuple(sweep["halving"]["rungs"]), sweep["halving"]["keep"]
    slots = tuple(halving_slots(len(points), keep, len(rungs)))
    base = sweep_base(config)
    finalists = tuple(
        layout.locate(layout.point_experiment(sweep["name"], layout.FINALIST.format(slot=k)), base)
        for k in range(slots[-1])
    )
    return Halving(sweep["name"], rungs, keep, slots, tuple(points), finalists)


def sweep_base(config: dict) -> dict:
    """What every point of a sweep starts from: the config without its `sweep` section; under
    halving, max_steps is the last rung (check_halving has checked it was -1 or equal)."""
    base = copy.deepcopy(config)
    sweep = base.pop("sweep")
    if sweep["strategy"] == "halving":
        base["training"]["max_steps"] = sweep["halving"]["rungs"][-1]
    return base
