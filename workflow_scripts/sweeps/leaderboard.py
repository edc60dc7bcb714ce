"""A sweep's leaderboard: every point's test metrics with bootstrap CIs, the winner picked on validation.

Set-up: read each point's training record, test predictions and (with `select_by: {metric: ...}`)
validation evaluation. Work: the selection value of each point (validation only, never test),
the winner, each metric's mean and 95% bootstrap CI on test, and each point's paired-bootstrap
test delta against the winner (is the winner actually better?). Save: leaderboard.{json,md,csv},
two plots, and best.json pointing at the winner's deployment model.

Successive halving (``params.halving``: the plan): the experiments are the sweep's finalists; each
row is named by the POINT it trained (its run.json "point"), and the points pruned at a rung follow
the finalists with their rung reached and no test metrics. Set-up also reads every rung record
(``input.records``) and promotion (``input.promotions``); save also writes halving.json (what the
sweep spent against a grid) and the rung plot.
"""

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from workflow_scripts import layout
from workflow_scripts.evaluation import general_compare
from workflow_scripts.evaluation.bootstrap import paired_bootstrap_ci, paired_delta
from workflow_scripts.evaluation.metrics import PAIRED, producer
from workflow_scripts.files import atomic_path, read_jsonl, write_figure, write_json
from workflow_scripts.stage import Job, StageError, snakemake_main
from workflow_scripts.sweeps import promote

log = logging.getLogger("snaketune.leaderboard")


def selection_value(select_by, run_info: dict, validation_eval: dict | None) -> tuple[float, bool]:
    """(value, higher_is_better) of one point; never computed from the test split."""
    if select_by == "eval_loss":
        value = run_info.get("final_eval_loss")
        if value is None:
            raise StageError(
                f"sweep.select_by: eval_loss: point {run_info.get('experiment')} has no validation loss "
                "(training.eval_strategy is 'no'?); select by a validation metric instead"
            )
        return float(value), False
    metric = select_by["metric"]
    if validation_eval is None or metric not in validation_eval["metrics"]:
        raise StageError(
            f"sweep.select_by.metric: {metric!r} is not in the validation evaluation "
            f"(evaluation.metrics must include {producer(metric)!r})"
        )
    return float(validation_eval["metrics"][metric]), True


def bootstrap_settings(evaluation: dict) -> dict:
    """The bootstrap a point's rows use: its own evaluation section's (as its compare did)."""
    return {"samples": evaluation["bootstrap_samples"], "seed": evaluation["seed"]}


def metric_table(predictions: list[dict], samples: int, seed: int) -> dict[str, dict]:
    """Mean and bootstrap 95% CI of each per-example metric on the test prompts."""
    out = {}
    zeros = [0.0] * len(predictions)
    for key, name in PAIRED.items():
        if predictions and key in predictions[0]:
            values = [float(r[key]) for r in predictions]
            mean, lo, hi = paired_bootstrap_ci(zeros, values, samples, seed)
            out[name] = {"mean": mean, "ci95": [lo, hi]}
    return out


def _point_of(p: dict, halving_points: dict[str, dict]) -> str:
    """The point a halving finalist trained: its run.json "point", which the halving summary knows."""
    point = p["run_info"].get("point")
    if point is None:
        raise StageError(
            f"leaderboard: {p['name']}'s training/run.json has no 'point' (a halving finalist names its point)"
        )
    if halving_points.get(point, {}).get("finalist") != p["name"]:
        raise StageError(
            f"leaderboard: {p['name']} trained point {point}, which the halving records do not make a finalist"
        )
    return point


def _pruned_rows(summary: dict) -> list[dict]:
    """Points a rung cut: deepest rung first, then by validation loss at that rung, then sweep order."""
    pruned = [q for q in summary["points"] if q["finalist"] is None]
    pruned.sort(key=lambda q: (-q["rung_reached"], q["scores"][q["rung_reached"]]))
    return [
        {
            "experiment": q["point"],
            "results_dir": layout.experiment_root(q["point"]),  # its checkpoints and rung records
            "selection_value": None,
            "test": {},
            "vs_base": {},
            "deployment_model": None,
            "general_ability": None,
            "selected": False,
            "vs_selected": {},
            "paired_with_selected": False,
            "rung_reached": q["rung_reached"],
            "rung_scores": q["scores"],
        }
        for q in pruned
    ]


def build(
    points: list[dict],
    select_by,
    general: dict | None = None,
    halving_summary: dict | None = None,
) -> dict:
    """``points``: name, run_info, predictions, validation_eval (or None), comparison, deployment,
    bootstrap (the point's own evaluation.bootstrap_samples and seed: a sweep may vary them, and a
    row's intervals are computed as its own compare computed its deltas vs base).
    ``general``: the general_ability settings (whether flagged points may win).

    ``halving_summary`` (`promote.summary`, a successive-halving sweep): ``points`` are the finalists;
    a row's ``experiment`` is the point it trained and ``results_dir`` the finalist's folder; the
    pruned points follow the finalists (no test metrics). ``rung_reached``: the last rung a point
    trained to (the finalists: the last rung); None in a grid, which has no rungs."""
    if not points:
        raise StageError("leaderboard: no points")
    halving_points = {q["point"]: q for q in halving_summary["points"]} if halving_summary else {}
    rows = []
    higher = None
    for p in points:
        value, higher = selection_value(select_by, p["run_info"], p.get("validation_eval"))
        point = _point_of(p, halving_points) if halving_summary else p["name"]
        rows.append(
            {
                "experiment": point,
                "results_dir": layout.experiment_root(p["name"]),
                "rung_reached": halving_points[point]["rung_reached"] if halving_summary else None,
                "selection_value": value,
                "test": metric_table(p["predictions"], **p["bootstrap"]),
                "vs_base": {
                    k: {"delta": v["delta"], "ci95": v["ci95"]} for k, v in p["comparison"]["metrics"].items()
                },
                "deployment_model": p["deployment"],
                "general_ability": general_compare.leaderboard_cells(p["comparison"]),
            }
        )
    pick = max if higher else min
    # still chosen on validation; general_ability.exclude_from_winning only removes flagged points
    best = pick(general_compare.eligible(rows, general), key=lambda i: rows[i]["selection_value"])
    best_preds = points[best]["predictions"]
    prompts = [r["prompt"] for r in best_preds]
    for i, (row, p) in enumerate(zip(rows, points, strict=True)):
        row["selected"] = i == best
        row["vs_selected"] = {}
        # Paired deltas need the same test prompts (a sweep over data or evaluation settings
        # tests points on different prompts: their metrics are shown, not paired).
        row["paired_with_selected"] = [r["prompt"] for r in p["predictions"]] == prompts
        if i == best or not row["paired_with_selected"]:
            continue
        for key, name in PAIRED.items():
            if key in best_preds[0] and key in p["predictions"][0]:
                d = paired_delta(best_preds, p["predictions"], key, **p["bootstrap"])
                row["vs_selected"][name] = {k: d[k] for k in ("delta", "ci95", "significant")}
    order = sorted(range(len(rows)), key=lambda i: rows[i]["selection_value"], reverse=bool(higher))
    if halving_summary:
        for row in rows:
            row["rung_scores"] = halving_points[row["experiment"]]["scores"]
    board = {
        "strategy": "halving" if halving_summary else "grid",
        "select_by": select_by,
        "higher_is_better": bool(higher),
        "n_test_examples": len(prompts),  # of the selected point
        "selected": rows[best]["experiment"],
        "points": [rows[i] for i in order] + (_pruned_rows(halving_summary) if halving_summary else []),
        "general_ability": {
            "exclude_from_winning": bool(general and general.get("exclude_from_winning")),
            "flagged": [r["experiment"] for r in rows if (r["general_ability"] or {}).get("flagged")],
        },
    }
    if halving_summary:
        keys = ("rungs", "keep", "slots", "steps_spent", "grid_steps", "fraction_of_grid")
        board["halving"] = {k: halving_summary[k] for k in keys}
    return board


def finished(board: dict) -> list[dict]:
    """The rows that trained to the end (every row of a grid; a halving sweep's finalists)."""
    return [r for r in board["points"] if r["selection_value"] is not None]


def _rung_cell(board: dict, row: dict) -> str:
    rungs = board["halving"]["rungs"]
    reached = row["rung_reached"]
    if reached == len(rungs) - 1:
        return f"{reached} (step {rungs[reached]}, finished)"
    return f"{reached} (step {rungs[reached]}, val. loss {row['rung_scores'][reached]:.4f})"


def _fmt_ci(entry: dict | None) -> str:
    if not entry:
        return "—"
    value = entry.get("mean", entry.get("delta"))
    lo, hi = entry["ci95"]
    return f"{value:+.3f} [{lo:+.3f}, {hi:+.3f}]" if "delta" in entry else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def metric_names(board: dict) -> list[str]:
    return [name for name in PAIRED.values() if any(name in r["test"] for r in board["points"])]


def to_markdown(board: dict, sweep_name: str) -> str:
    sel = board["select_by"]
    sel_text = (
        "final validation loss (lower wins)"
        if sel == "eval_loss"
        else f"validation {sel['metric']} (higher wins)"
    )
    names = metric_names(board)
    halving_info = board.get("halving")
    lines = [f"# Sweep `{sweep_name}`: {len(board['points'])} points", ""]
    if halving_info:
        rungs = "/".join(map(str, halving_info["rungs"]))
        lines += [
            f"Successive halving: rungs at steps {rungs}, keeping {halving_info['keep']} of the points at "
            f"each rung (slots {'/'.join(map(str, halving_info['slots']))}), ranked on validation loss at "
            "the rung (an exact tie goes to the earlier point in sweep order); the finalists are then "
            "selected as below. Pruned points have no test metrics.",
            "",
            f"steps spent: {halving_info['steps_spent']} of a grid's {halving_info['grid_steps']} "
            f"({100 * halving_info['fraction_of_grid']:.1f}%)",
            "",
        ]
    rung_head, rung_rule = ("rung reached | ", "---|") if halving_info else ("", "")
    lines += [
        f"Selected by **{sel_text}**; the test split is only reported, never used to choose. Test metrics on "
        f"{board['n_test_examples']} prompts: mean [95% bootstrap CI]. *Δ vs selected*: paired-bootstrap "
        "CI of the point's test answer accuracy minus the selected point's (a CI that contains 0 means "
        "the test set cannot tell the two apart).",
        "",
        f"| | point | selection | {rung_head}"
        + " | ".join(f"test {n}" for n in names)
        + " | Δ accuracy vs selected |",
        f"|---|---|---|{rung_rule}" + "---|" * len(names) + "---|",
    ]
    for r in board["points"]:
        mark = "**selected**" if r["selected"] else ""
        cells = [_fmt_ci(r["test"].get(n)) for n in names]
        vs = "—" if r["selected"] else _fmt_ci(r["vs_selected"].get("answer_accuracy"))
        vs = vs if r["paired_with_selected"] else "other test prompts"
        value = "—" if r["selection_value"] is None else f"{r['selection_value']:.4f}"
        rung = f"{_rung_cell(board, r)} | " if halving_info else ""
        if r["selection_value"] is None:
            vs = "pruned"
        lines.append(f"| {mark} | `{r['experiment']}` | {value} | {rung}" + " | ".join(cells) + f" | {vs} |")
    lines += general_compare.leaderboard_markdown({**board, "points": finished(board)})
    winner = next(r for r in board["points"] if r["selected"])
    lines += ["", f"Deployment model of the selected point: `{winner['deployment_model']}`"]
    return "\n".join(lines) + "\n"


def write_csv(board: dict, path: str) -> None:
    names = metric_names(board)
    halving_mode = "halving" in board
    header = ["experiment", "selected", "selection_value"]
    header += ["rung_reached", "results_dir"] if halving_mode else []
    for n in names:
        header += [f"test_{n}", f"test_{n}_ci_low", f"test_{n}_ci_high"]
    header += ["accuracy_vs_selected", "accuracy_vs_selected_ci_low", "accuracy_vs_selected_ci_high"]
    header += general_compare.csv_header(board)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in board["points"]:
            row = [r["experiment"], r["selected"], r["selection_value"]]
            row += [r["rung_reached"], r["results_dir"]] if halving_mode else []
            for n in names:
                m = r["test"].get(n)
                row += [m["mean"], *m["ci95"]] if m else ["", "", ""]
            v = r["vs_selected"].get("answer_accuracy")
            row += [v["delta"], *v["ci95"]] if v else ["", "", ""]
            row += general_compare.csv_values(board, r)
            w.writerow(row)


def plot(board: dict, curves: dict[str, list[tuple[int, float]]], metrics_png: str, curves_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(board)
    points = finished(board)  # pruned points have no test metrics
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 0.5 * len(points) + 2))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=False):
        for y, r in enumerate(points):
            m = r["test"].get(name)
            if m:
                lo, hi = m["ci95"]
                ax.errorbar(
                    m["mean"],
                    y,
                    xerr=[[m["mean"] - lo], [hi - m["mean"]]],
                    fmt="o",
                    capsize=3,
                    color="tab:red" if r["selected"] else "tab:blue",
                )
        ax.set_yticks(range(len(points)), [r["experiment"].rsplit("/", 1)[-1] for r in points], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"test {name}")
        ax.grid(axis="x", alpha=0.3)
    write_figure(fig, metrics_png)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        if curve:
            steps, losses = zip(*curve, strict=True)
            selected = name == board["selected"]
            ax.plot(
                steps,
                losses,
                marker="o",
                lw=2.5 if selected else 1,
                label=name.rsplit("/", 1)[-1] + (" (selected)" if selected else ""),
            )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    write_figure(fig, curves_png)


def eval_curve(metrics_csv: str) -> list[tuple[int, float]]:
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    return [
        (int(r["step"]), float(r["eval_loss"]))
        for r in rows
        if r.get("eval_loss") not in (None, "", "nan") and not math.isnan(float(r["eval_loss"]))
    ]


def _read_json_list(paths) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in ([paths] if isinstance(paths, str) else paths)]


def read_halving(job: Job, names: list[str], run_infos: list[dict]) -> dict:
    """halving.json's summary from the plan (params.halving), the rung records and promotions."""
    plan = job.params.halving
    if list(plan["finalists"]) != names:
        raise StageError(
            f"leaderboard: params points {names} are not the halving plan's finalists {plan['finalists']}"
        )
    records = _read_json_list(job.input.records)
    promotions = _read_json_list(job.input.promotions)
    return promote.summary(plan, records, run_infos, promotions)


def run(job: Job) -> dict:
    """The rule's inputs are lists with one entry per point, in the order of ``params.points`` (under
    halving: the finalists)."""
    names = list(job.params.points)
    loaded, curves = [], {}
    for i, name in enumerate(names):
        validation = job.input.validation_eval[i] if job.input.validation_eval else None
        loaded.append(
            {
                "name": name,
                "run_info": json.loads(Path(job.input.run_info[i]).read_text()),
                "predictions": read_jsonl(job.input.predictions[i]),
                "comparison": json.loads(Path(job.input.comparison[i]).read_text()),
                "validation_eval": json.loads(Path(validation).read_text()) if validation else None,
                "deployment": job.input.deployment[i],
                "bootstrap": bootstrap_settings(job.params.evaluation[i]),
            }
        )
        curves[name] = eval_curve(job.input.metrics[i])
    summary = None
    if job.params.get("halving"):
        summary = read_halving(job, names, [p["run_info"] for p in loaded])
        curves = {p["run_info"]["point"]: curves[p["name"]] for p in loaded}  # rows are named by point
    sweep = job.params.sweep
    board = build(loaded, sweep["select_by"], job.params.general, summary)
    out = job.output
    write_json(out.json, board)
    with atomic_path(out.markdown) as tmp:
        tmp.write_text(to_markdown(board, sweep["name"]))
    write_csv(board, out.csv)
    plot(board, curves, out.metrics_plot, out.curves_plot)
    if summary:
        write_json(out.halving, {**summary, "selected": board["selected"]})
        promote.plot(summary, board["selected"], out.rungs_plot)
    winner = next(r for r in board["points"] if r["selected"])
    write_json(
        out.best,
        {
            "experiment": winner["experiment"],  # under halving: the winning point, not its finalist slot
            "results_dir": winner["results_dir"],
            "strategy": board["strategy"],
            "deployment_model": winner["deployment_model"],
            "select_by": board["select_by"],
            "selection_value": winner["selection_value"],
        },
    )
    log.info("selected %s (%s = %.4f)", winner["experiment"], board["select_by"], winner["selection_value"])
    return board


if "snakemake" in globals():
    snakemake_main(snakemake, run)
