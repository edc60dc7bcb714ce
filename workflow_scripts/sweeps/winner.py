"""Which point of a finished sweep the opt-in targets act on: the winner in best.json, or the point
`sweep.act_on` (or the chat command's `--point`) names.

The candidates are the sweep's experiments, each a dict with at least its folder (``root``): a
grid's points, or a halving sweep's finalists (folders ``finalist-{k}`` whose point is decided at
run time). A candidate's point name is its ``training/run.json`` "point" when the run recorded one
(a halving finalist), else its experiment name. A name is the point's short name
(``learning_rate~0.001_r~4``) or its full one (``sweeps/S/learning_rate~0.001_r~4``). A point that
did not finish (pruned by successive halving) is one error naming the key and the rung it stopped
at (``halving.json``, next to best.json); a misspelt one gets the close names.

Pure Python (no Snakemake): export_gguf and push_to_hub call `subject` with their job, the chat
command calls `choose` with the finished points of the sweep's leaderboard.json.
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from workflow_scripts import layout
from workflow_scripts.layout import point_of as short_name
from workflow_scripts.stage import Job, Named, StageError

RUN_INFO = "training/run.json"  # under a candidate's root: its "point" (halving finalists)


def point_of(experiment: str, candidate: dict) -> str:
    """The point a candidate holds: its run.json "point", else its experiment name."""
    run_info = Path(candidate["root"]) / RUN_INFO
    if run_info.is_file():
        point = json.loads(run_info.read_text()).get("point")
        if point:
            return point
    return experiment


@dataclass(frozen=True)
class Choice:
    """The candidate acted on: its experiment (the candidates' key), its point name, its entries."""

    experiment: str
    point: str
    candidate: dict = field(repr=False)

    def record(self, act_on: str, best: dict) -> dict:
        """What a report says about it."""
        return {
            "point": self.point,
            "experiment": self.experiment,
            "results_dir": self.candidate["root"],
            "act_on": act_on,
            "winner": best["experiment"],
            "is_winner": self.point == best["experiment"],
            "select_by": best["select_by"],
        }


def _read_best(best) -> tuple[dict, Path | None]:
    if isinstance(best, dict):
        return best, None
    path = Path(best)
    if not path.is_file():
        raise StageError(f"{path}: no such file (the sweep's leaderboard writes it)")
    return json.loads(path.read_text()), path.parent


def _halving_points(sweep_dir: Path | None) -> list[dict] | None:
    """halving.json's points (each with the rung it reached), None when the sweep did not halve."""
    path = sweep_dir / layout.HALVING_SUMMARY if sweep_dir else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text()).get("points") or []


def choose(best, act_on: str, candidates: dict, key: str = "sweep.act_on", sweep_dir=None) -> Choice:
    """The candidate to act on. ``best``: best.json's path (its folder holds halving.json) or its
    content (then ``sweep_dir`` says where halving.json is); ``act_on``: `best` or a point's short or
    full name; ``candidates``: experiment name -> {"root": folder, ...}; ``key`` names the setting
    in errors (`sweep.act_on`, or the chat command's `--point`)."""
    best, folder = _read_best(best)
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else folder
    if not candidates:
        raise StageError("no finished point of the sweep to act on (no candidates)")
    held = [(point_of(e, c), e) for e, c in candidates.items()]
    points = [p for p, _ in held]
    wanted = best["experiment"] if act_on == "best" else act_on
    matches = [(p, e) for p, e in held if p == wanted or ("/" not in wanted and short_name(p) == wanted)]
    if len(matches) == 1:
        ((point, experiment),) = matches
        return Choice(experiment, point, candidates[experiment])
    if len(matches) > 1:  # two experiments hold the same point: a broken sweep, never guessed
        raise StageError(f"{key}: point {wanted!r} is held by {', '.join(e for _, e in matches)}")
    if act_on == "best":
        raise StageError(
            f"{sweep_dir / layout.BEST if sweep_dir else layout.BEST}: its winner {wanted!r} is none of the "
            f"sweep's finished points ({', '.join(sorted(points))}); re-run the leaderboard"
        )
    finished = ", ".join(short_name(p) for p in points)
    halved = _halving_points(sweep_dir)
    known = [p["point"] for p in halved] if halved is not None else list(points)
    entry = next((p for p in halved or [] if wanted in (p["point"], short_name(p["point"]))), None)
    if entry is not None and entry.get("finalist"):
        raise StageError(
            f"{key}: point {short_name(entry['point'])!r} is {entry['finalist']}, which has not finished"
        )
    if entry is not None:
        raise StageError(
            f"{key}: point {short_name(entry['point'])!r} did not finish: successive halving stopped it at "
            f"rung {entry['rung_reached']} ({entry.get('steps_reached', '?')} steps), so it has no fine-tuned "
            f"model; the finished points: {finished}"
        )
    close = difflib.get_close_matches(short_name(wanted), [short_name(p) for p in known], n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(repr(c) for c in close)}?"
        if close
        else f"; the finished points: {finished}"
    )
    raise StageError(f"{key}: {act_on!r} is not a point of this sweep{hint}")


@dataclass(frozen=True)
class Subject:
    """What a publishing stage works on, under the names of its single-run rule: ``input`` and
    ``params``, and ``acted_on`` (the sweep point's record for its report; None for a single run)."""

    input: Named
    params: Named
    acted_on: dict | None = None


def subject(job: Job) -> Subject:
    """A single run: the rule's own inputs and params. A sweep (params ``candidates`` and ``act_on``,
    input ``best``): the chosen candidate's ``input`` and ``params`` (each candidate holds them under
    the single-run rule's names), over the rule's shared params."""
    candidates = job.params.get("candidates")
    if candidates is None:
        return Subject(job.input, job.params, None)
    act_on = job.params.act_on
    best, sweep_dir = _read_best(job.input.best)
    choice = choose(best, act_on, candidates, sweep_dir=sweep_dir)
    shared = {k: v for k, v in job.params.items() if k not in ("candidates", "act_on")}
    return Subject(
        Named(choice.candidate["input"], "input"),
        Named({**shared, **choice.candidate.get("params", {})}, "params"),
        choice.record(act_on, best),
    )
