"""General ability before and after fine-tuning: the items, lm-eval on a local task, the paired CI,
load-time refusals, and the sweep flag."""

import json
import shutil

import pytest

from workflow_scripts.errors import ConfigError
from workflow_scripts.evaluation import general_ability, general_compare, general_items
from workflow_scripts.stage import Job, StageError
from workflow_scripts.sweeps.leaderboard import build, to_markdown, write_csv

QUESTIONS = [
    ("Which animal barks?", ["dog", "cat", "fish"], 0),
    ("Which colour is the sky on a clear day?", ["green", "blue", "red"], 1),
    ("How many legs does a spider have?", ["six", "four", "eight"], 2),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which is a fruit?", ["carrot", "apple", "potato"], 1),
    ("Which is frozen water?", ["steam", "rain", "ice"], 2),
    ("What is the opposite of hot?", ["cold", "loud", "tall"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus"], 1),
    ("What do you read?", ["a spoon", "a chair", "a book"], 2),
    ("Which month comes after May?", ["June", "April", "March"], 0),
]

TASK_YAML = """task: tiny_general_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path):
    """A local lm-eval multiple-choice task: a YAML in lm-eval's format and its data file."""
    folder = tmp_path / "tiny_task"
    folder.mkdir()
    (folder / "tiny_general_mc.yaml").write_text(TASK_YAML)
    with (folder / "items.jsonl").open("w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    return folder


@pytest.fixture(scope="module")
def worse_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model made deliberately worse: its (tied) embeddings scaled 40x, so its
    next-token distributions become sharp and wrong."""
    import torch
    from transformers import AutoModelForCausalLM

    dest = tmp_path_factory.mktemp("worse") / "model"
    shutil.copytree(tiny_model_dir, dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40.0)
    model.save_pretrained(dest)
    return dest


def settings(**overrides) -> dict:
    """general_ability as the jobs receive it: the schema's defaults, small sizes for a test."""
    from workflow_scripts.config import load_schema

    props = load_schema()["properties"]["general_ability"]["properties"]
    cfg = {k: v["default"] for k, v in props.items() if k not in ("text_loss", "tolerance")}
    cfg["text_loss"] = {k: v["default"] for k, v in props["text_loss"]["properties"].items()}
    cfg["tolerance"] = {k: v["default"] for k, v in props["tolerance"]["properties"].items()}
    cfg["text_loss"].update(passages=24, max_tokens=32)
    cfg.update(dtype="float32", batch_size=8)
    cfg.update(overrides)
    return cfg


def measure(model_dir, out, cfg, label):
    job = Job(
        input={"model_dir": str(model_dir)},
        output={
            "result": str(out / "general_ability.json"),
            "item_results": str(out / "general_items.jsonl"),
        },
        params={"general": cfg, "label": label},
    )
    general_ability.run(job)
    return job


def test_passages_are_a_fixed_selection_of_prose():
    first, again = general_items.text_passages(50), general_items.text_passages(50)
    assert first == again and len(first) == 50
    assert len({p["item"] for p in first}) == 50
    assert all(len(p["text"]) >= general_items.MIN_PASSAGE_CHARS for p in first)
    assert not any(p["text"].startswith(">>>") for p in first)
    every = general_items.text_passages(100_000)  # more than there are: all of them
    assert len(every) == len(general_items.prose_paragraphs())


def test_local_task_base_vs_worse_model_paired(local_task, tiny_model_dir, worse_model_dir, tmp_path):
    """A local lm-eval task runs end to end for both models; the paired CIs are computed; the
    deliberately worse model's text loss rises with a CI that excludes 0, and it is flagged."""
    cfg = settings(tasks=[str(local_task)])
    base = measure(tiny_model_dir, tmp_path / "base", cfg, "base")
    worse = measure(worse_model_dir, tmp_path / "worse", cfg, "finetuned")

    result = json.loads((tmp_path / "base" / "general_ability.json").read_text())
    assert result["measures"]["tiny_general_mc/acc"]["n"] == len(QUESTIONS)
    assert result["measures"]["text_loss"]["n"] == 24
    assert result["lm_eval"]["version"] and result["timings"]["text_loss_s_per_100_items"] > 0

    report = {"metrics": {"answer_accuracy": {"delta": 0.3, "ci95": [0.2, 0.4]}}}
    job = Job(
        input={
            "general_base": base.output.result,
            "general_base_items": base.output.item_results,
            "general_finetuned": worse.output.result,
            "general_finetuned_items": worse.output.item_results,
        },
        params={"general": cfg, "evaluation": {"bootstrap_samples": 1000, "seed": 0}},
    )
    general, markdown = general_compare.section(job, report, "# Base vs fine-tuned\n\nthe task table\n")

    mc = general["measures"]["tiny_general_mc/acc"]
    assert mc["n"] == len(QUESTIONS) and mc["ci95"][0] <= mc["delta"] <= mc["ci95"][1]
    loss = general["measures"]["text_loss"]
    assert loss["delta"] > 0 and loss["ci95"][0] > 0  # worse: the loss rose, measurably
    assert loss["flagged"] and general["flagged"] == ["text_loss"]
    assert general["sentence"].startswith("task answer_accuracy +0.300 [+0.200, +0.400]; general text loss +")
    assert "beyond the tolerance" in general["sentence"]
    assert (
        markdown.startswith("# Base vs fine-tuned\n\ntask answer_accuracy")
        and "| text_loss (nats/token)" in markdown
    )


def test_same_model_shows_no_change(tiny_model_dir, tmp_path):
    cfg = settings()
    a = measure(tiny_model_dir, tmp_path / "a", cfg, "base")
    b = measure(tiny_model_dir, tmp_path / "b", cfg, "finetuned")
    rows = [json.loads(line) for line in open(a.output.item_results)]
    general = general_compare.compare_general(
        json.loads(open(a.output.result).read()),
        json.loads(open(b.output.result).read()),
        rows,
        [json.loads(line) for line in open(b.output.item_results)],
        cfg,
        500,
        0,
    )
    loss = general["measures"]["text_loss"]
    assert loss["delta"] == pytest.approx(0, abs=1e-6) and loss["verdict"] == "no measurable change"
    with pytest.raises(Exception, match="not measured on the same items"):
        general_compare.compare_general(
            json.loads(open(a.output.result).read()),
            json.loads(open(b.output.result).read()),
            rows,
            rows[:-1],
            cfg,
            500,
            0,
        )

    # measured unlike each other: a delta would measure the setting, not the model
    a_json, b_json = json.loads(open(a.output.result).read()), json.loads(open(b.output.result).read())
    tuned_rows = [json.loads(line) for line in open(b.output.item_results)]
    for field, value in (("dtype", "bfloat16"), ("lm_eval", {"version": "0.0.1", "tasks": {}})):
        with pytest.raises(StageError, match="was measured with"):
            general_compare.compare_general(a_json, {**b_json, field: value}, rows, tuned_rows, cfg, 500, 0)
    with pytest.raises(StageError, match="measure different things"):
        other = {**b_json, "measures": {**b_json["measures"], "extra/acc": b_json["measures"]["text_loss"]}}
        general_compare.compare_general(a_json, other, rows, tuned_rows, cfg, 500, 0)
    with pytest.raises(StageError, match="twice"):
        general_compare.compare_general(a_json, b_json, rows, tuned_rows + tuned_rows[:1], cfg, 500, 0)


def test_lm_eval_samples_become_one_measure_per_metric_and_filter():
    results = {
        "higher_is_better": {"t": {"exact_match": True}},
        "samples": {
            "t": [
                {"doc_id": i, "doc_hash": "h", "filter": f, "metrics": ["exact_match"], "exact_match": v}
                for i, v in enumerate((1.0, 0.0))
                for f in ("strict-match", "flexible-extract")
            ]
        },
    }
    rows, info = general_ability.task_items(results, {"t": "spec"})
    assert sorted({r["measure"] for r in rows}) == [
        "t/exact_match,flexible-extract",
        "t/exact_match,strict-match",
    ]
    assert info["t"]["source"] == "spec" and all(m["higher_is_better"] for m in info["t"]["metrics"].values())
    results["higher_is_better"] = {"t": {"exact_match": None}}  # a custom metric without a direction
    with pytest.raises(StageError, match="does not say whether higher exact_match is better"):
        general_ability.task_items(results, {"t": "spec"})


def test_verdicts():
    def entry(delta, lo, hi, higher=True):
        return {"delta": delta, "ci95": [lo, hi], "higher_is_better": higher}

    assert general_compare.verdict(entry(-0.05, -0.08, -0.02), 0.02) == (
        "a measurable loss beyond the tolerance (0.02)",
        True,
    )
    assert general_compare.verdict(entry(-0.01, -0.015, -0.005), 0.02)[1] is False
    assert general_compare.verdict(entry(0.02, 0.01, 0.03, higher=False), 0.1)[0].startswith(
        "a small measurable loss"
    )
    assert general_compare.verdict(entry(-0.2, -0.3, -0.1, higher=False), 0.1)[0] == "a measurable gain"
    assert general_compare.verdict(entry(0.3, -0.1, 0.6, higher=False), 0.1) == (
        "no measurable change",
        False,
    )


def test_broken_local_tasks_are_one_line_naming_the_file(local_task):
    general_items.check_local_task(str(local_task))  # the good one passes

    (local_task / "items.jsonl").write_text(
        '{"question": "ok", "choices": ["a"], "answer": 0}\n{"question": \n'
    )
    with pytest.raises(ConfigError, match=r"items\.jsonl: line 2 is not valid JSON"):
        general_items.check_local_task(str(local_task))

    (local_task / "items.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"names the data file .*items\.jsonl, which does not exist"):
        general_items.check_local_task(str(local_task))

    (local_task / "tiny_general_mc.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match=r"tiny_general_mc\.yaml: not a readable lm-eval task YAML") as err:
        general_items.check_local_task(str(local_task))
    assert "\n" not in str(err.value)

    with pytest.raises(ConfigError, match="neither an lm-eval task name nor an existing path"):
        general_items.check_local_task(str(local_task / "missing"))


def test_task_names_are_checked_at_load(resolved_config, local_task):
    """An unknown name gets close names; a Hub task without Hub access is refused at load (the
    tests run with HF_HUB_OFFLINE=1); a local folder passes."""
    with pytest.raises(Exception, match=r"'arc_eazy' is not an lm-eval task.*did you mean arc_easy"):
        resolved_config({"general_ability": {"tasks": ["arc_eazy"]}})
    with pytest.raises(
        Exception, match=r"arc_easy.*downloads allenai/ai2_arc from the Hugging Face Hub, but HF_HUB_OFFLINE"
    ):
        resolved_config({"general_ability": {"tasks": ["arc_easy"]}})
    config = resolved_config({"general_ability": {"tasks": [str(local_task)]}})
    assert config["general_ability"]["tasks"] == [str(local_task)]


def test_layout_shares_the_base_measurement(resolved_config):
    from workflow_scripts.layout import locate as layout

    config = resolved_config()
    a = layout("a", config)
    config["general_ability"]["tolerance"]["text_loss"] = 0.5  # compare-only: same base job
    assert layout("b", config).general_base == a.general_base
    assert a.general_base.startswith("results/shared/general_base/")
    config["general_ability"]["text_loss"]["passages"] = 10
    assert layout("c", config).general_base != a.general_base
    config["general_ability"]["enabled"] = False
    assert layout("d", config).general_base is None


def _point(name, eval_loss, general_delta, lo, hi, flagged):
    preds = [{"prompt": f"p{i}", "correct": i % 2} for i in range(8)]
    comparison = {
        "metrics": {"answer_accuracy": {"delta": 0.1, "ci95": [0.0, 0.2]}},
        "general_ability": {
            "measures": {
                "text_loss": {
                    "delta": general_delta,
                    "ci95": [lo, hi],
                    "unit": "nats/token",
                    "higher_is_better": False,
                    "verdict": "x",
                    "flagged": flagged,
                }
            },
            "flagged": ["text_loss"] if flagged else [],
        },
    }
    return {
        "name": f"sweeps/s/{name}",
        "run_info": {"final_eval_loss": eval_loss},
        "predictions": preds,
        "comparison": comparison,
        "deployment": f"results/sweeps/s/{name}/deployment_model",
        "bootstrap": {"samples": 200, "seed": 0},
    }


def test_sweep_flags_a_harmful_point_and_can_exclude_it(tmp_path):
    """A very high learning rate wins on validation loss but wrecks general text: it is flagged,
    and with exclude_from_winning the next point on validation wins."""
    points = [
        _point("learning_rate~0.0003", 0.30, 0.01, -0.01, 0.03, False),
        _point("learning_rate~0.05", 0.20, 1.8, 1.5, 2.1, True),
    ]
    board = build(points, "eval_loss", {"exclude_from_winning": False})
    assert board["selected"] == "sweeps/s/learning_rate~0.05"
    assert board["general_ability"]["flagged"] == ["sweeps/s/learning_rate~0.05"]
    row = next(r for r in board["points"] if r["selected"])
    assert row["general_ability"]["measures"]["text_loss"]["ci95"] == [1.5, 2.1]
    text = to_markdown(board, "s")
    assert "## General ability" in text and "+1.800 [+1.500, +2.100] **flagged**" in text

    board = build(points, "eval_loss", {"exclude_from_winning": True})
    assert board["selected"] == "sweeps/s/learning_rate~0.0003"
    write_csv(board, tmp_path / "board.csv")
    header = (tmp_path / "board.csv").read_text().splitlines()[0]
    assert header.endswith(
        "general_text_loss_delta,general_text_loss_ci_low,general_text_loss_ci_high,general_flagged"
    )

    with pytest.raises(Exception, match="every point loses general ability"):
        build([points[1]], "eval_loss", {"exclude_from_winning": True})
