"""Base vs fine-tuned: per-metric deltas with paired bootstrap 95% CIs, a table and plots.

Both evaluations must have judged answers the same way (`answer_matching` in their JSON); the
report records it and counts, per model, the answers with no number where one was expected
(`answer_rule` == no-number-in-prediction in the predictions files).
"""

import json
import logging
from collections import defaultdict

import numpy as np

from workflow_scripts.evaluation import general_compare, markdown
from workflow_scripts.evaluation.bootstrap import paired_delta
from workflow_scripts.evaluation.metrics import PAIRED, UNPAIRED
from workflow_scripts.files import atomic_path, read_jsonl, write_figure, write_json
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.compare")

NO_NUMBER = "no-number-in-prediction"  # answers.judge's rule for a prediction without a number


def compare(
    base_rows: list[dict], tuned_rows: list[dict], samples: int, seed: int, type_column: str | None
) -> dict:
    if len(base_rows) != len(tuned_rows) or any(
        b["prompt"] != t["prompt"] for b, t in zip(base_rows, tuned_rows, strict=True)
    ):
        raise StageError("compare: base and fine-tuned predictions are not on the same test prompts")
    metrics = {
        name: paired_delta(base_rows, tuned_rows, key, samples, seed)
        for key, name in PAIRED.items()
        if key in base_rows[0] and key in tuned_rows[0]
    }
    by_type = {}
    if type_column and "correct" in base_rows[0] and type_column in base_rows[0].get("meta", {}):
        groups = defaultdict(lambda: [0, 0, 0])
        for b, t in zip(base_rows, tuned_rows, strict=True):
            g = groups[b["meta"][type_column]]
            g[0] += 1
            g[1] += int(b["correct"])
            g[2] += int(t["correct"])
        by_type = {
            k: {"n": n, "base": cb / n, "finetuned": ct / n} for k, (n, cb, ct) in sorted(groups.items())
        }
    report = {"n_examples": len(base_rows), "metrics": metrics, "accuracy_by_type": by_type}
    if "answer_rule" in base_rows[0] and "answer_rule" in tuned_rows[0]:
        report["unparsed_answers"] = {
            "base": sum(r["answer_rule"] == NO_NUMBER for r in base_rows),
            "finetuned": sum(r["answer_rule"] == NO_NUMBER for r in tuned_rows),
        }
    return report


def answer_matching(base_eval: dict, tuned_eval: dict) -> dict | None:
    """The answer matching both evaluations used; an error when they differ."""
    base, tuned = base_eval.get("answer_matching"), tuned_eval.get("answer_matching")
    if base and tuned and base != tuned:
        raise StageError(
            f"compare: base answers were judged with {base} and fine-tuned answers with {tuned}; "
            "re-run both evaluations with the same evaluation.answer_match / answer_tolerance"
        )
    return base or tuned


def to_markdown(report: dict, base_eval: dict, tuned_eval: dict) -> str:
    lines = [
        "# Base vs fine-tuned",
        "",
        f"{report['n_examples']} test examples; deltas with paired bootstrap 95% confidence intervals.",
        "",
    ]
    lines += markdown.table(
        ["metric", "base", "fine-tuned", "delta", "95% CI"],
        "lrrrl",
        [
            [
                name,
                f"{m['base']:.3f}",
                f"{m['finetuned']:.3f}",
                f"{m['delta']:+.3f}" + (" *" if m["significant"] else ""),
                markdown.ci_text(m["ci95"]),
            ]
            for name, m in report["metrics"].items()
        ],
    )
    lines += ["", "`*`: the interval excludes zero.", ""]
    matching = report.get("answer_matching")
    if matching:
        how = (
            "rounded to the decimals the reference shows"
            if matching["mode"] == "precision"
            else f"within {matching['rel_tol']:g} relative"
        )
        lines.append(f"- answers judged by `{matching['mode']}`: numbers {how}")
    unparsed = report.get("unparsed_answers")
    if unparsed:
        lines.append(
            f"- answers with no number where one was expected: {unparsed['base']} (base), "
            f"{unparsed['finetuned']} (fine-tuned)"
        )
    for name in UNPAIRED:  # values without per-example scores: no CI
        b, t = base_eval["metrics"].get(name), tuned_eval["metrics"].get(name)
        if b is not None and t is not None:
            lines.append(f"- {name}: {b:.3f} -> {t:.3f}")
    if report["accuracy_by_type"]:
        lines += [
            "",
            "## Answer accuracy by question type",
            "",
            "| type | n | base | fine-tuned |",
            "|---|---:|---:|---:|",
        ]
        for k, v in report["accuracy_by_type"].items():
            lines.append(f"| {k} | {v['n']} | {v['base']:.2f} | {v['finetuned']:.2f} |")
    lines += [
        "",
        "## Generation",
        "",
        f"- mean generated tokens: {base_eval['metrics'].get('mean_generated_tokens', 0):.1f} (base), "
        f"{tuned_eval['metrics'].get('mean_generated_tokens', 0):.1f} (fine-tuned)",
        f"- generation tokens/s: {base_eval['metrics'].get('generation_tokens_per_s', 0):.1f} (base), "
        f"{tuned_eval['metrics'].get('generation_tokens_per_s', 0):.1f} (fine-tuned)",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, metrics_png: str, by_type_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["metrics"])
    base = [report["metrics"][n]["base"] for n in names]
    tuned = [report["metrics"][n]["finetuned"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, base, 0.4, label="base")
    ax.bar(x + 0.2, tuned, 0.4, label="fine-tuned")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_title("Base vs fine-tuned")
    ax.legend()
    write_figure(fig, metrics_png)

    fig, ax = plt.subplots(figsize=(7, 4))
    types = list(report["accuracy_by_type"])
    if types:
        x = np.arange(len(types))
        ax.bar(x - 0.2, [report["accuracy_by_type"][t]["base"] for t in types], 0.4, label="base")
        ax.bar(x + 0.2, [report["accuracy_by_type"][t]["finetuned"] for t in types], 0.4, label="fine-tuned")
        ax.set_xticks(x, types, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no question types in the test data", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Answer accuracy by question type")
    write_figure(fig, by_type_png)


def run(job: Job) -> dict:
    cfg = job.params.evaluation
    base_eval = json.loads(open(job.input.base).read())
    tuned_eval = json.loads(open(job.input.finetuned).read())
    matching = answer_matching(base_eval, tuned_eval)
    report = compare(
        read_jsonl(job.input.base_predictions),
        read_jsonl(job.input.finetuned_predictions),
        cfg["bootstrap_samples"],
        cfg["seed"],
        cfg["type_column"],
    )
    report["answer_matching"] = matching
    report["base_metrics"] = base_eval["metrics"]
    report["finetuned_metrics"] = tuned_eval["metrics"]
    markdown = to_markdown(report, base_eval, tuned_eval)
    if "general_base" in job.input:  # general_ability enabled: its cost beside the task's gain
        report["general_ability"], markdown = general_compare.section(job, report, markdown)
    plot(report, job.output.metrics_plot, job.output.by_type_plot)
    with atomic_path(job.output.markdown) as tmp:
        tmp.write_text(markdown)
    write_json(job.output.comparison, report)
    acc = report["metrics"].get("answer_accuracy")
    if acc:
        log.info(
            "answer accuracy %.3f -> %.3f, delta %+.3f CI %s",
            acc["base"],
            acc["finetuned"],
            acc["delta"],
            acc["ci95"],
        )
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
