"""General ability base vs fine-tuned: per measure, the paired delta with its bootstrap 95% CI over
the items both models saw, a verdict, and a flag when a measurable loss exceeds the tolerance.

A measure's delta is fine-tuned minus base in its own unit (a loss rising is a positive delta,
an accuracy falling a negative one); `worse` says whether the CI lies wholly on the side that
means the model got worse, and `flagged` whether, beyond that, the delta exceeds
`general_ability.tolerance` (text_loss for the text loss, tasks for lm-eval metrics).
"""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from workflow_scripts.evaluation import markdown
from workflow_scripts.evaluation.bootstrap import paired_bootstrap_ci
from workflow_scripts.files import read_jsonl
from workflow_scripts.stage import StageError


def _by_measure(rows: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["item"] in out[r["measure"]]:
            raise StageError(f"compare: general-ability measure {r['measure']} has item {r['item']} twice")
        out[r["measure"]][r["item"]] = r
    return out


def _same_setting(base: dict, tuned: dict, what: str, value) -> None:
    """Both models measured alike: a difference (the base result is shared and kept) would be
    measured as a change of the model."""
    b, t = value(base), value(tuned)
    if b != t:
        raise StageError(
            f"compare: the base model's general ability was measured with {what} {b}, the fine-tuned "
            f"model's with {t}, so the delta would measure that too; re-run it (snakemake --forcerun "
            "general_base), and pin general_ability.dtype where machines differ"
        )


def verdict(entry: dict, tolerance: float) -> tuple[str, bool]:
    """(what the change is, in words; flagged)."""
    lo, hi = entry["ci95"]
    harm = -entry["delta"] if entry["higher_is_better"] else entry["delta"]
    worse = (hi < 0) if entry["higher_is_better"] else (lo > 0)
    better = (lo > 0) if entry["higher_is_better"] else (hi < 0)
    if worse and harm > tolerance:
        return f"a measurable loss beyond the tolerance ({tolerance:g})", True
    if worse:
        return f"a small measurable loss (within the tolerance {tolerance:g})", False
    if better:
        return "a measurable gain", False
    return "no measurable change", False


def compare_general(
    base: dict,
    tuned: dict,
    base_rows: list[dict],
    tuned_rows: list[dict],
    settings: dict,
    samples: int,
    seed: int,
) -> dict:
    """The general-ability section of comparison.json. ``base``/``tuned``: the two
    general_ability.json; ``*_rows``: their per-item rows; ``settings``: general_ability."""
    if (
        base.get("text_loss")
        and tuned.get("text_loss")
        and base["text_loss"]["python"] != tuned["text_loss"]["python"]
    ):
        raise StageError(
            f"compare: the general text passages of the base model come from Python {base['text_loss']['python']}, "
            f"the fine-tuned model's from Python {tuned['text_loss']['python']}: re-run general_base"
        )
    _same_setting(base, tuned, "dtype", lambda r: r.get("dtype"))
    _same_setting(base, tuned, "lm-eval", lambda r: (r.get("lm_eval") or {}).get("version"))
    b_items, t_items = _by_measure(base_rows), _by_measure(tuned_rows)
    if set(base["measures"]) != set(tuned["measures"]):
        raise StageError(
            "compare: base and fine-tuned general-ability results measure different things "
            f"({sorted(base['measures'])} vs {sorted(tuned['measures'])}): re-run general_finetuned"
        )
    measures = {}
    for name, meta in base["measures"].items():
        b, t = b_items[name], t_items[name]
        if set(b) != set(t) or any(b[i]["hash"] != t[i]["hash"] for i in b):
            raise StageError(
                f"compare: general-ability measure {name}: base and fine-tuned were not measured on the same items"
            )
        keys = sorted(b)
        base_values = [b[i]["value"] for i in keys]
        tuned_values = [t[i]["value"] for i in keys]
        delta, lo, hi = paired_bootstrap_ci(base_values, tuned_values, samples, seed)
        entry = {
            "label": meta["label"],
            "kind": meta["kind"],
            "unit": meta["unit"],
            "source": meta["source"],
            "higher_is_better": meta["higher_is_better"],
            "n": len(keys),
            "base": float(np.mean(base_values)),
            "finetuned": float(np.mean(tuned_values)),
            "delta": delta,
            "ci95": [lo, hi],
            "significant": bool(lo > 0 or hi < 0),
        }
        tolerance = settings["tolerance"]["text_loss" if meta["kind"] == "loss" else "tasks"]
        entry["verdict"], entry["flagged"] = verdict(entry, tolerance)
        entry["tolerance"] = tolerance
        measures[name] = entry
    return {
        "measures": measures,
        "flagged": sorted(n for n, m in measures.items() if m["flagged"]),
        "lm_eval_version": (base.get("lm_eval") or {}).get("version"),
    }


def _change(m: dict) -> str:
    return f"{m['delta']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]"


def sentence(task_name: str, task: dict | None, general: dict) -> str:
    """One plain sentence: the task gain beside each general-ability change."""
    parts = [f"task {task_name} {_change(task)}"] if task else []
    for m in general["measures"].values():
        unit = f" {m['unit']}" if m["kind"] == "loss" else ""
        parts.append(f"{m['label']} {_change(m)}{unit}: {m['verdict']}")
    return "; ".join(parts) + "."


def to_markdown(general: dict) -> list[str]:
    """The general-ability section of comparison.md."""
    lines = [
        "## General ability (what fine-tuning cost outside the task)",
        "",
        "Both models on the same items; delta = fine-tuned - base, paired bootstrap 95% CI over the items.",
        "",
    ]
    lines += markdown.table(
        ["measure", "better", "n", "base", "fine-tuned", "delta", "95% CI", "verdict"],
        "llrrrrll",
        [
            [
                f"{name} ({m['unit']})",
                "higher" if m["higher_is_better"] else "lower",
                str(m["n"]),
                f"{m['base']:.3f}",
                f"{m['finetuned']:.3f}",
                f"{m['delta']:+.3f}",
                markdown.ci_text(m["ci95"]),
                m["verdict"] + (" **flagged**" if m["flagged"] else ""),
            ]
            for name, m in general["measures"].items()
        ],
    )
    lines += [""]
    for name, m in general["measures"].items():
        lines.append(f"- `{name}`: {m['source']}")
    if "text_loss" in general["measures"]:
        lines.append(
            "- the text loss is a loss on general English prose (about Python), not a benchmark score: "
            "it rises when the model drifts away from general text"
        )
    return lines + [""]


def leaderboard_cells(comparison: dict) -> dict | None:
    """A sweep point's general-ability delta and CI per measure, and its flag, from its comparison."""
    general = comparison.get("general_ability")
    if not general:
        return None
    return {
        "measures": {
            name: {k: m[k] for k in ("delta", "ci95", "unit", "higher_is_better", "verdict", "flagged")}
            for name, m in general["measures"].items()
        },
        "flagged": bool(general["flagged"]),
    }


def eligible(rows: list[dict], settings: dict | None) -> list[int]:
    """Indices of the leaderboard rows that may win: all of them, or, with
    `general_ability.exclude_from_winning`, those not flagged (an error when none is left)."""
    if not settings or not settings.get("exclude_from_winning"):
        return list(range(len(rows)))
    keep = [i for i, r in enumerate(rows) if not (r.get("general_ability") or {}).get("flagged")]
    if not keep:
        raise StageError(
            "leaderboard: every point loses general ability beyond general_ability.tolerance and "
            "general_ability.exclude_from_winning is on, so no point may win; raise the tolerance or "
            "set exclude_from_winning: false to see the ranking"
        )
    return keep


def _measure_names(board: dict) -> list[str]:
    names = {}
    for r in board["points"]:
        names.update(dict.fromkeys((r.get("general_ability") or {}).get("measures", {})))
    return list(names)


def leaderboard_markdown(board: dict) -> list[str]:
    """The leaderboard's general-ability table: each point's delta vs its base model per measure."""
    names = _measure_names(board)
    if not names:
        return []
    excluded = board.get("general_ability", {}).get("exclude_from_winning")
    lines = [
        "",
        "## General ability (what fine-tuning cost outside the task)",
        "",
        "Each point's fine-tuned minus base model on the same general items, paired bootstrap 95% CI. "
        "**flagged**: a measurable loss beyond general_ability.tolerance"
        + (
            "; flagged points were not allowed to win."
            if excluded
            else "; flagged points may still win (exclude_from_winning: false)."
        ),
        "",
        "| point | " + " | ".join(f"Δ {n}" for n in names) + " | flagged |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for r in board["points"]:
        g = r.get("general_ability") or {"measures": {}, "flagged": False}
        cells = []
        for n in names:
            m = g["measures"].get(n)
            cells.append(_change(m) + (" **flagged**" if m["flagged"] else "") if m else "—")
        mark = " (selected)" if r["selected"] else ""
        lines.append(
            f"| `{r['experiment']}`{mark} | " + " | ".join(cells) + f" | {'yes' if g['flagged'] else 'no'} |"
        )
    return lines


def csv_header(board: dict) -> list[str]:
    header = []
    for n in _measure_names(board):
        header += [f"general_{n}_delta", f"general_{n}_ci_low", f"general_{n}_ci_high"]
    return header + (["general_flagged"] if header else [])


def csv_values(board: dict, row: dict) -> list:
    names = _measure_names(board)
    if not names:
        return []
    g = row.get("general_ability") or {"measures": {}, "flagged": ""}
    out = []
    for n in names:
        m = g["measures"].get(n)
        out += [m["delta"], *m["ci95"]] if m else ["", "", ""]
    return out + [g["flagged"]]


def section(job, report: dict, markdown: str) -> tuple[dict, str]:
    """For the compare stage: the general-ability section from the rule's general_* inputs, and
    comparison.md with the one-sentence verdict under its title and the section's table."""
    evaluation = job.params.evaluation
    general = compare_general(
        json.loads(Path(job.input.general_base).read_text()),
        json.loads(Path(job.input.general_finetuned).read_text()),
        read_jsonl(job.input.general_base_items),
        read_jsonl(job.input.general_finetuned_items),
        job.params.general,
        evaluation["bootstrap_samples"],
        evaluation["seed"],
    )
    task_name = (
        "answer_accuracy" if "answer_accuracy" in report["metrics"] else next(iter(report["metrics"]), None)
    )
    general["sentence"] = sentence(task_name, report["metrics"].get(task_name), general)
    title, _, rest = markdown.partition("\n")
    markdown = "\n".join([title, "", general["sentence"], rest.rstrip("\n"), "", *to_markdown(general)])
    return general, markdown
