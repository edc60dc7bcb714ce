"""The metric registry (workflow_scripts.evaluation.metrics): the schema names what it registers, each
metric returns what its registration says, and compare and the leaderboard report every metric."""

import pytest
from helpers import with_defaults

from workflow_scripts.config import load_schema
from workflow_scripts.evaluation import compare as compare_stage
from workflow_scripts.evaluation.metrics import METRICS, METRICS_DIR, PAIRED, UNPAIRED, VALUES, score
from workflow_scripts.stage import StageError
from workflow_scripts.sweeps import leaderboard


def test_schema_enums_name_the_registered_metrics():
    schema = load_schema()["properties"]
    names = schema["evaluation"]["properties"]["metrics"]
    assert set(names["items"]["enum"]) == set(METRICS), (
        f"schemas/config.schema.yaml evaluation.metrics enum: set it to [{', '.join(METRICS)}]"
    )
    assert set(names["default"]) <= set(METRICS)
    select = schema["sweep"]["properties"]["select_by"]["oneOf"][1]["properties"]["metric"]
    assert set(select["enum"]) == set(VALUES), (
        f"schemas/config.schema.yaml sweep.select_by.metric enum: set it to [{', '.join(VALUES)}]"
    )
    for m in METRICS.values():
        assert (METRICS_DIR / m.name / f"{m.name}.py").is_file(), f"metric {m.name} has no evaluate module"
        assert set(m.paired.values()) <= set(m.values), f"metric {m.name} pairs a value it does not register"
    keys = [k for m in METRICS.values() for k in m.per_example]
    assert len(keys) == len(set(keys)), "two metrics write the same per-example key"


# base answers, then fine-tuned answers, to the same two questions
PREDICTIONS = [
    "<think>look</think>\nThe answer is 3.",
    "<think>no idea</think>\nNo.",
    "<think>table row 2</think>\nThe answer is 7.",
    "<think>x is larger</think>\nYes.",
]
REFERENCES = ["<think>a</think>\nThe answer is 7.", "<think>b</think>\nYes."] * 2


@pytest.fixture(scope="module")
def scored():
    """Every registered metric on the four answers (the real evaluate modules and BERTScore model)."""
    cfg = with_defaults("evaluation", {"metrics": list(METRICS)})
    return score(PREDICTIONS, REFERENCES, cfg)


def test_every_metric_returns_what_it_registers(scored):
    metrics, per_example = scored
    assert set(VALUES) <= set(metrics)
    assert list(per_example) == [k for m in METRICS.values() for k in m.per_example]
    assert all(len(v) == len(PREDICTIONS) for v in per_example.values())
    assert metrics["answer_accuracy"] == 0.5 and per_example["correct"] == [False, False, True, True]
    for key, value in PAIRED.items():  # the paired per-example scores average to the corpus value
        assert sum(map(float, per_example[key])) / len(PREDICTIONS) == pytest.approx(metrics[value])


def test_score_names_an_unregistered_metric():
    with pytest.raises(StageError, match=r"evaluation.metrics: \['bleu'\] not registered"):
        score(PREDICTIONS, REFERENCES, {"metrics": ["rouge", "bleu"]})


def test_compare_and_leaderboard_report_every_metric(scored, tmp_path):
    metrics, per_example = scored
    rows = [
        {"prompt": f"q{i % 2}", **{k: v[i] for k, v in per_example.items()}} for i in range(len(PREDICTIONS))
    ]
    base, tuned = rows[:2], rows[2:]
    evaluation = {"metrics": metrics}
    report = compare_stage.compare(base, tuned, samples=200, seed=0, type_column=None)
    assert list(report["metrics"]) == list(PAIRED.values())
    assert report["metrics"]["answer_accuracy"]["delta"] == 1.0
    md = compare_stage.to_markdown(report, evaluation, evaluation)
    for name in PAIRED.values():
        assert f"| {name} |" in md
    for name in UNPAIRED:
        assert f"- {name}: " in md

    def point(name, loss, predictions):
        return {
            "name": name,
            "run_info": {"experiment": name, "final_eval_loss": loss},
            "predictions": predictions,
            "validation_eval": None,
            "comparison": report,
            "deployment": f"results/{name}/deployment_model",
            "bootstrap": {"samples": 200, "seed": 0},
        }

    board = leaderboard.build([point("a", 1.0, base), point("b", 0.5, tuned)], "eval_loss")
    a = next(p for p in board["points"] if p["experiment"] == "a")
    assert set(a["test"]) == set(a["vs_selected"]) == set(a["vs_base"]) == set(PAIRED.values())
    assert leaderboard.metric_names(board) == list(PAIRED.values())
    md = leaderboard.to_markdown(board, "s")
    leaderboard.write_csv(board, str(tmp_path / "board.csv"))
    header = (tmp_path / "board.csv").read_text().splitlines()[0].split(",")
    for name in PAIRED.values():
        assert f"test {name}" in md and f"test_{name}" in header


def test_selecting_by_a_value_the_validation_run_lacks_names_its_metric():
    point = {"experiment": "a"}
    with pytest.raises(StageError, match=r"'bertscore_f1' is not in .* must include 'bertscore'"):
        leaderboard.selection_value({"metric": "bertscore_f1"}, point, {"metrics": {"answer_accuracy": 0.5}})
