"""Successive halving: which points a rung keeps, and what the whole sweep cost.

`promote` is the rule of a rung, a pure function: lower validation loss wins, and an exact tie is
broken by sweep order (the earlier point goes first), so the decision never depends on the order the
rung's jobs finished or on the test split. A score that is not a finite number is an error, never a
silent last place. `summary` builds `halving.json` (each point's rung reached and validation loss at
every rung, `steps_spent` against `grid_steps`); `plot` draws the rungs.

As the `promote` rule's script: set-up reads every rung record (input `records`) and checks they
belong to this rung (params `rung`, `points`) before ranking; work ranks them (params `keep`: the
slots of the next rung); save writes `promotion` atomically: the ranking, the survivors in slot order
of the next rung (= rank order), and the cut (its margin, and whether a tie was broken by order).
"""

import json
import logging
import math
from pathlib import Path

from workflow_scripts.files import write_figure, write_json
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.halving")


def _score(point: str, value, rung) -> float:
    where = f" at rung {rung}" if rung is not None else ""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StageError(
            f"promote: point {point} has no finite validation loss{where} ({value!r}); "
            "a point cannot be ranked without one (did its training diverge?)"
        )
    return float(value)


def promote(scores: list[tuple[str, float]], keep: int, rung: int | None = None) -> dict:
    """Rank one rung. ``scores``: (point, validation loss) in sweep order; ``keep``: how many go on.

    Returns ``{"keep", "ranking": [{"point", "eval_loss", "rank", "kept"}] (best first, rank from 1),
    "survivors": [point, ...] (rank order), "cut": {"last_kept", "first_dropped", "margin", "tied"}}``.
    ``margin`` is the first dropped point's loss minus the last kept one's; ``tied``: the two were
    exactly equal and sweep order decided."""
    if not scores:
        raise StageError(f"promote: no points to rank at rung {rung}")
    names = [p for p, _ in scores]
    twice = sorted({p for p in names if names.count(p) > 1})
    if twice:
        raise StageError(f"promote: point {twice[0]} appears twice at rung {rung}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= len(scores):
        raise StageError(
            f"promote: keep must be a whole number from 1 to {len(scores)} (the points ranked), got {keep!r}"
        )
    values = [_score(p, v, rung) for p, v in scores]
    # sorted() is stable: equal losses keep sweep order
    order = sorted(range(len(scores)), key=lambda i: values[i])
    ranking = [
        {"point": names[i], "eval_loss": values[i], "rank": r + 1, "kept": r < keep}
        for r, i in enumerate(order)
    ]
    last = ranking[keep - 1]
    first_dropped = ranking[keep] if keep < len(ranking) else None
    margin = first_dropped["eval_loss"] - last["eval_loss"] if first_dropped else None
    return {
        "keep": keep,
        "ranking": ranking,
        "survivors": [r["point"] for r in ranking[:keep]],
        "cut": {
            "last_kept": last["point"],
            "first_dropped": first_dropped["point"] if first_dropped else None,
            "margin": margin,
            "tied": margin == 0.0,
        },
    }


def _field(record: dict, key: str, where: str):
    if key not in record:
        raise StageError(f"{where}: rung record has no {key!r}")
    return record[key]


def check_records(records: list[dict], paths: list[str], rung: int, points: list[str]) -> None:
    """Every record is of this rung, of a point of the sweep, each point once, all at one step."""
    seen: dict[str, str] = {}
    steps = set()
    for record, path in zip(records, paths, strict=True):
        point = _field(record, "point", path)
        if _field(record, "rung", path) != rung:
            raise StageError(f"{path}: rung record of rung {record['rung']} given to promote rung {rung}")
        if point not in points:
            raise StageError(f"{path}: point {point} is not a point of this sweep (params points)")
        if point in seen:
            raise StageError(f"{path}: point {point} appears twice at rung {rung} (also in {seen[point]})")
        seen[point] = path
        steps.add(_field(record, "target_step", path))
    if len(steps) > 1:
        raise StageError(f"promote: rung {rung} records stop at different steps {sorted(steps)}")


def promotion(records: list[dict], paths: list[str], rung: int, keep: int, points: list[str]) -> dict:
    """The promotion file of a rung from its records (in any order) and their paths."""
    if not records:
        raise StageError(f"promote: input records is empty for rung {rung}")
    check_records(records, paths, rung, points)
    by_point = {r["point"]: (r, p) for r, p in zip(records, paths, strict=True)}
    in_sweep_order = [p for p in points if p in by_point]  # ties are broken by sweep order, not slot order
    ranked = promote([(p, by_point[p][0].get("eval_loss")) for p in in_sweep_order], keep, rung)
    ranking = [{**r, "record": by_point[r["point"]][1]} for r in ranked["ranking"]]
    return {
        "rung": rung,
        "step": records[0]["target_step"],
        "keep": keep,
        "ranking": [{k: r[k] for k in ("point", "record", "eval_loss", "rank", "kept")} for r in ranking],
        "survivors": [{"point": r["point"], "record": r["record"]} for r in ranking if r["kept"]],
        "cut": ranked["cut"],
    }


def summary(
    plan: dict, records: list[dict], finalist_run_infos: list[dict], promotions: list[dict] | None = None
) -> dict:
    """halving.json: the rungs, each point's rung reached and validation loss at every rung (None where
    it did not get), and the steps the sweep spent against what the same points cost as a grid.

    ``plan``: {"rungs", "keep", "slots", "points" (sweep order), "finalists"}; ``records``: the rung
    records of every rung but the last; ``finalist_run_infos``: each finalist's training/run.json, in
    the order of plan["finalists"]; ``promotions`` (optional): the promotion files, for the cuts."""
    rungs, points, finalists = list(plan["rungs"]), list(plan["points"]), list(plan["finalists"])
    last = len(rungs) - 1
    if len(plan["slots"]) != len(rungs) or plan["slots"][-1] != len(finalists):
        raise StageError(
            f"halving plan: slots {plan['slots']} must give one count per rung {rungs}, the last the "
            f"number of finalists ({len(finalists)})"
        )
    if len(finalist_run_infos) != len(finalists):
        raise StageError(
            f"halving: {len(finalist_run_infos)} finalist run.json files for {len(finalists)} finalists"
        )
    scores = {p: [None] * len(rungs) for p in points}
    reached = dict.fromkeys(points, -1)
    finalist_of = dict.fromkeys(points)
    steps_spent = steps_trained = 0
    for record in records:
        for key in ("point", "rung", "eval_loss", "steps", "steps_trained"):
            if key not in record:
                raise StageError(f"halving: a rung record (of point {record.get('point')}) has no {key!r}")
        point, rung = record["point"], record["rung"]
        if point not in scores:
            raise StageError(f"halving: a rung record names point {point}, which is not in the sweep")
        if not 0 <= rung < last:
            raise StageError(
                f"halving: point {point} has a rung record of rung {rung} (rungs 0..{last - 1} have records)"
            )
        if scores[point][rung] is not None:
            raise StageError(f"halving: point {point} has two records of rung {rung}")
        scores[point][rung] = record["eval_loss"]
        reached[point] = max(reached[point], rung)
        steps_spent += int(record["steps"])
        steps_trained += int(record["steps_trained"])
    for name, info in zip(finalists, finalist_run_infos, strict=True):
        point = info.get("point")
        if point not in scores:
            raise StageError(
                f"halving: {name}'s training/run.json names point {point!r}, which is not in the sweep"
            )
        if finalist_of[point] is not None:
            raise StageError(f"halving: point {point} is both {finalist_of[point]} and {name}")
        if "halving" not in info:
            raise StageError(
                f"halving: {name}'s training/run.json has no 'halving' (steps of the final rung)"
            )
        scores[point][last] = info.get("final_eval_loss")
        reached[point] = last
        finalist_of[point] = name
        steps_spent += int(info["halving"]["steps"])
        steps_trained += int(info["global_step"]) - int(info["halving"]["resumed_from_step"])
    missing = [p for p in points if reached[p] < 0]
    if missing:
        raise StageError(f"halving: point {missing[0]} has no rung-0 record")
    grid_steps = len(points) * rungs[-1]
    out = {
        "strategy": "halving",
        "rungs": rungs,
        "keep": plan["keep"],
        "slots": list(plan["slots"]),
        "points": [
            {
                "point": p,
                "rung_reached": reached[p],
                "steps_reached": rungs[reached[p]],
                "scores": scores[p],
                "finalist": finalist_of[p],
            }
            for p in points
        ],
        # every point's training up to the rung it reached, once: what the plan cost
        "steps_spent": steps_spent,
        # what the current jobs computed: less where a job found its checkpoint already trained
        # (a re-run), more where a rung's checkpoint was gone and steps were trained again
        "steps_trained": steps_trained,
        "grid_steps": grid_steps,
        "fraction_of_grid": round(steps_spent / grid_steps, 4),
    }
    if promotions is not None:
        if len(promotions) != last:
            raise StageError(
                f"halving: {len(promotions)} promotion files for {last} promotions (rungs 0..{last - 1})"
            )
        survivors = [s["point"] for s in promotions[-1]["survivors"]] if promotions else points
        trained = [info["point"] for info in finalist_run_infos]
        if survivors != trained:
            raise StageError(
                f"halving: the finalists trained {trained}, but promotion-{last - 1} promoted {survivors} "
                "(a stale finalist? re-run the finalists)"
            )
        out["cuts"] = [
            {"rung": pr["rung"], "step": pr["step"], "keep": pr["keep"], **pr["cut"]} for pr in promotions
        ]
    return out


def plot(halving: dict, selected: str | None, path: str) -> None:
    """Validation loss of every point at each rung step it reached; finalists coloured, the selected
    point thick, pruned points thin grey lines that stop where they were cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = halving["rungs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cut_labels = []  # (step, loss, name) where each pruned point stopped
    for p in halving["points"]:
        xy = [(rungs[i], s) for i, s in enumerate(p["scores"]) if s is not None]
        if not xy:
            continue
        x, y = zip(*xy, strict=True)
        short = p["point"].rsplit("/", 1)[-1]
        if p["finalist"] is None:
            ax.plot(x, y, marker="o", ms=3, lw=0.8, color="0.6", alpha=0.8)
            cut_labels.append((x[-1], y[-1], short))
        else:
            chosen = p["point"] == selected
            ax.plot(
                x, y, marker="o", lw=2.8 if chosen else 1.4, label=short + (" (selected)" if chosen else "")
            )
    # the names of points cut at one rung, stacked so that close losses do not print over each other
    low, high = ax.get_ylim()
    gap = 0.035 * (high - low)
    for step in rungs:
        placed = None
        for _, loss, name in sorted(c for c in cut_labels if c[0] == step):
            placed = loss if placed is None else max(loss, placed + gap)
            ax.text(step, placed, f"  {name}", fontsize=6, color="0.4", va="center")
    for step in rungs:
        ax.axvline(step, color="0.85", lw=0.8, zorder=0)
    ax.set_xticks(rungs)
    ax.set_xlabel("training step (rung)")
    ax.set_ylabel("validation loss")
    ax.set_title(
        f"successive halving: {halving['steps_spent']} of a grid's {halving['grid_steps']} steps "
        f"({100 * halving['fraction_of_grid']:.0f}%); grey: pruned",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    write_figure(fig, path)


def _read_record(path: str) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: cannot read the rung record ({exc})") from None
    if not isinstance(record, dict):
        raise StageError(f"{path}: a rung record must be a JSON object")
    return record


def check_slots(records: list[dict], paths: list[str], previous: dict) -> None:
    """A middle rung's slot k holds the point the previous promotion put there (a stale slot file,
    restored or touched, is refused rather than ranked)."""
    survivors = [s["point"] for s in previous["survivors"]]
    if len(records) != len(survivors):
        raise StageError(
            f"promote: {len(records)} slot records for the {len(survivors)} points promotion-"
            f"{previous['rung']} promoted"
        )
    for path, record, point in zip(paths, records, survivors, strict=True):
        if record["point"] != point:
            raise StageError(
                f"promote: {path} holds {record['point']}, but promotion-{previous['rung']} put {point} in "
                "that slot; re-run the rung's slots"
            )


def run(job: Job) -> dict:
    """The `promote` rule: rank rung ``params.rung``'s records, keep ``params.keep``; past rung 0,
    the slots must hold the points the previous promotion (input ``previous``) put there."""
    paths = job.input.records
    paths = [paths] if isinstance(paths, str) else list(paths)
    records = [_read_record(p) for p in paths]
    result = promotion(records, paths, int(job.params.rung), job.params.keep, list(job.params.points))
    previous = job.input.previous
    previous = [previous] if isinstance(previous, str) else list(previous)
    if previous:
        check_slots(records, paths, json.loads(Path(previous[0]).read_text()))
    write_json(job.output.promotion, result)
    cut = result["cut"]
    log.info(
        "rung %d (step %s): kept %d of %d; cut between %s and %s (margin %s%s)",
        result["rung"],
        result["step"],
        result["keep"],
        len(records),
        cut["last_kept"],
        cut["first_dropped"],
        cut["margin"],
        ", tie broken by sweep order" if cut["tied"] else "",
    )
    return result


if "snakemake" in globals():
    snakemake_main(snakemake, run)
