"""Many experiments in one DAG: sweep expansion, shared upstream jobs, incremental plans, leaderboard."""

import json
import re

import pytest
from helpers import smk, write_config

from workflow_scripts.errors import ConfigError
from workflow_scripts.sweeps import leaderboard
from workflow_scripts.sweeps.points import expand, point_names, point_overrides


def plan(workdir, *configfiles) -> dict[str, int]:
    """rule -> number of jobs `snakemake -n` plans."""
    out = smk(workdir, "-n", "--configfile", *map(str, configfiles)).stdout
    if "Nothing to be done" in out:
        return {}
    counts: dict[str, int] = {}
    for rule in re.findall(r"^rule (\w+):", out, flags=re.M):
        counts[rule] = counts.get(rule, 0) + 1
    counts.pop("all", None)
    return counts


TEXT_LOSS_TOLERANCE = 0.01
TINY_RUN = {
    "training": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4},
    "evaluation": {
        "max_examples": 6,
        "max_new_tokens": 6,
        "batch_size": 6,
        "metrics": ["answer_accuracy", "rouge"],
    },
    "resources": {"threads": 1},
    # A point flagged for lost general ability cannot win. Two steps on a tiny model move its text loss
    # by hundredths of a nat at most, so the tolerance is scaled down to match (default 0.1).
    "general_ability": {"exclude_from_winning": True, "tolerance": {"text_loss": TEXT_LOSS_TOLERANCE}},
}


HARMFUL_LR = 0.5  # two Adam steps at this rate raise the tiny model's text loss ~0.02 (lr 0.001: ~0.0002)


def grid_sweep(wf):
    """2x2: a sane learning rate and a deliberately harmful one (its points must be flagged)."""
    return write_config(
        wf / "sweep.yaml",
        {
            **TINY_RUN,
            "sweep": {
                "name": "grid",
                "grid": {"training.learning_rate": [0.001, HARMFUL_LR], "peft.r": [2, 4]},
            },
        },
    )


@pytest.fixture
def sweep_workflow(tiny_workflow):
    """A fresh tiny workflow (nothing run) and the 2x2 grid sweep."""
    wf, cfg = tiny_workflow
    return wf, cfg, grid_sweep(wf)


def test_points_are_named_from_what_they_vary(resolved_config):
    cfg = resolved_config(
        {
            "sweep": {
                "name": "s",
                "grid": {"training.learning_rate": [0.0001, 0.001], "peft.r": [8]},
                "points": [{"training.learning_rate": 0.0005, "peft.r": 4, "evaluation.seed": 3}],
            }
        }
    )
    names = [e.name for e in expand(cfg)]
    assert names == [
        "sweeps/s/learning_rate~0.0001_r~8",
        "sweeps/s/learning_rate~0.001_r~8",
        "sweeps/s/learning_rate~0.0005_r~4_seed~3",
    ]
    # every point is its own resolved config
    assert [e.config["training"]["learning_rate"] for e in expand(cfg)] == [0.0001, 0.001, 0.0005]
    assert all("sweep" not in e.config or e.config["sweep"] is None for e in expand(cfg))


def test_ambiguous_leaf_names_keep_their_section():
    overrides = point_overrides({"grid": {"training.seed": [1, 2], "evaluation.seed": [5, 6]}})
    assert point_names(overrides)[0] == "training_seed~1_evaluation_seed~5"
    repeated = point_overrides({"grid": {"peft.r": [4, 8]}, "points": [{"peft.r": 4}]})
    with pytest.raises(ConfigError, match="points 0 and 2 are both named 'r~4'"):
        point_names(repeated)


def test_a_bad_value_in_one_point_names_the_point_and_key(resolved_config):
    cfg = resolved_config({"sweep": {"name": "s", "grid": {"peft.r": [8, "big"]}}})
    with pytest.raises(ConfigError, match=r"sweep point 1 \(r~big\): config key peft.r"):
        expand(cfg)
    cfg = resolved_config({"sweep": {"name": "s", "grid": {"resources.threads": [1, 2]}}})
    with pytest.raises(ConfigError, match="'resources.threads' is not a key of training"):
        expand(cfg)


def test_shared_stages_once_and_one_job_per_point(sweep_workflow):
    wf, cfg, sweep = sweep_workflow
    counts = plan(wf, cfg, sweep)
    assert counts == {
        "download_dataset": 1,
        "preprocess_dataset": 1,
        "prepare_base_model": 1,
        "format_dataset": 1,
        "eval_base": 1,
        "general_base": 1,
        "train": 4,
        "merge": 4,
        "eval_finetuned": 4,
        "general_finetuned": 4,
        "compare": 4,
        "experiment_index": 4,
        "leaderboard": 1,
    }


def test_a_point_varying_the_format_gets_its_own_data_and_base_evaluation(sweep_workflow):
    wf, cfg, _ = sweep_workflow
    sweep = write_config(
        wf / "mf.yaml",
        {**TINY_RUN, "sweep": {"name": "mf", "grid": {"training.max_length": [256, 512], "peft.r": [2]}}},
    )
    counts = plan(wf, cfg, sweep)
    assert counts["download_dataset"] == 1 and counts["preprocess_dataset"] == 1
    assert counts["format_dataset"] == 2 and counts["eval_base"] == 2 and counts["train"] == 2


@pytest.mark.e2e
def test_sweep_runs_and_grows_incrementally(tiny_formatted):
    wf, cfg = tiny_formatted  # data stages and base model done (they are planned once, above)
    sweep = grid_sweep(wf)
    counts = plan(wf, cfg, sweep)
    done = {"download_dataset", "preprocess_dataset", "prepare_base_model", "format_dataset"}
    assert counts["train"] == 4 and not done & set(counts)
    smk(wf, "--configfile", str(cfg), str(sweep))
    board = json.loads((wf / "results" / "sweeps" / "grid" / "leaderboard.json").read_text())
    assert len(board["points"]) == 4 and sum(p["selected"] for p in board["points"]) == 1
    for p in board["points"]:
        lo, hi = p["test"]["answer_accuracy"]["ci95"]
        assert lo <= p["test"]["answer_accuracy"]["mean"] <= hi
    best = json.loads((wf / "results" / "sweeps" / "grid" / "best.json").read_text())
    assert best["experiment"] == board["selected"] and (wf / best["deployment_model"]).is_dir()
    assert (wf / "results" / "sweeps" / "grid" / "leaderboard.md").read_text().count("**selected**") == 1

    # the harmful learning rate costs general ability: both its points are flagged, neither wins
    def lr(point):
        index = json.loads((wf / "results" / point["experiment"] / "experiment.json").read_text())
        return index["config"]["training"]["learning_rate"]

    harmful = {p["experiment"] for p in board["points"] if lr(p) == HARMFUL_LR}
    flagged = board["general_ability"]["flagged"]
    assert len(harmful) == 2 and set(flagged) == harmful, flagged
    assert board["selected"] not in harmful
    for p in board["points"]:
        (m,) = p["general_ability"]["measures"].values()  # text_loss: a rise beyond the tolerance is flagged
        beyond = m["ci95"][0] > 0 and m["delta"] > TEXT_LOSS_TOLERANCE
        assert m["flagged"] == beyond == (p["experiment"] in harmful), (p["experiment"], m)
    index = json.loads((wf / "results" / best["experiment"] / "experiment.json").read_text())
    assert (wf / index["shared"]["formatted"] / "test.parquet").is_file()
    assert plan(wf, cfg, sweep) == {}, "a second run must be a no-op"

    grown = write_config(
        wf / "grown.yaml",
        {
            **TINY_RUN,
            "sweep": {
                "name": "grid",
                "grid": {"training.learning_rate": [0.001, HARMFUL_LR, 0.1], "peft.r": [2, 4]},
            },
        },
    )
    counts = plan(wf, cfg, grown)
    assert counts["train"] == 2 and counts["leaderboard"] == 1
    assert not {"download_dataset", "format_dataset", "eval_base", "prepare_base_model"} & set(counts)

    shrunk = write_config(
        wf / "shrunk.yaml",
        {
            **TINY_RUN,
            "sweep": {"name": "grid", "grid": {"training.learning_rate": [0.001], "peft.r": [2, 4]}},
        },
    )
    assert plan(wf, cfg, shrunk) == {"leaderboard": 1}

    # the single-experiment default on the same data shares the data and the base evaluation
    single = write_config(wf / "single.yaml", {**TINY_RUN, "experiment": "solo"})
    counts = plan(wf, cfg, single)
    assert counts["train"] == 1 and "format_dataset" not in counts and "eval_base" not in counts


def _point(name, val_loss, correct, val_metric=None):
    preds = [{"prompt": f"p{i}", "correct": c, "follows_format": True} for i, c in enumerate(correct)]
    return {
        "name": name,
        "run_info": {"experiment": name, "final_eval_loss": val_loss},
        "predictions": preds,
        "validation_eval": {"metrics": {"answer_accuracy": val_metric}} if val_metric is not None else None,
        "comparison": {"metrics": {}},
        "deployment": f"results/{name}/deployment_model",
        "bootstrap": {"samples": 500, "seed": 0},
    }


def test_the_winner_is_chosen_on_validation_never_on_test():
    # b has the best validation loss; c has the best test accuracy
    points = [
        _point("a", 1.2, [1, 0, 0, 0, 1, 0, 0, 0], val_metric=0.30),
        _point("b", 0.9, [1, 0, 1, 0, 0, 0, 1, 0], val_metric=0.20),
        _point("c", 1.0, [1, 1, 1, 1, 1, 1, 1, 0], val_metric=0.50),
    ]
    board = leaderboard.build(points, "eval_loss")
    assert board["selected"] == "b" and board["higher_is_better"] is False
    assert [p["experiment"] for p in board["points"]] == ["b", "c", "a"]
    c = next(p for p in board["points"] if p["experiment"] == "c")
    assert c["vs_selected"]["answer_accuracy"]["delta"] == pytest.approx(0.5)
    board = leaderboard.build(points, {"metric": "answer_accuracy", "split": "validation"})
    assert board["selected"] == "c" and board["higher_is_better"] is True
    md = leaderboard.to_markdown(board, "s")
    assert "validation answer_accuracy (higher wins)" in md and md.count("**selected**") == 1


def test_a_point_without_validation_loss_is_an_error():
    from workflow_scripts.stage import StageError

    with pytest.raises(StageError, match="has no validation loss"):
        leaderboard.build([_point("a", None, [1, 0])], "eval_loss")


def test_each_point_is_bootstrapped_with_its_own_evaluation_settings(resolved_config):
    """`evaluation` is sweepable and each point's compare uses its own bootstrap_samples and seed;
    the leaderboard did use the base config's for every row (a row's interval then disagreed with
    how its own compare was computed). Now each row uses its point's."""
    grid = {"evaluation.bootstrap_samples": [150, 400], "evaluation.seed": [1]}
    config = resolved_config({"sweep": {"name": "boot", "grid": grid}})
    points = expand(config)
    own = [leaderboard.bootstrap_settings(p.config["evaluation"]) for p in points]
    base = leaderboard.bootstrap_settings(config["evaluation"])
    assert [o["samples"] for o in own] == [150, 400] and all(o != base for o in own)

    # enough prompts that intervals drawn with other settings differ
    correct = [[(i * 7) % 3 == 0 for i in range(97)], [(i * 5) % 4 != 0 for i in range(97)]]
    rows = []
    for p, settings, c, loss in zip(points, own, correct, (1.0, 0.9), strict=True):
        row = _point(p.name, loss, c)
        row["bootstrap"] = settings
        rows.append(row)
    board = leaderboard.build(rows, "eval_loss")
    for row, p, settings in zip(rows, points, own, strict=True):
        shown = next(r for r in board["points"] if r["experiment"] == p.name)
        expected = leaderboard.metric_table(row["predictions"], **settings)
        assert shown["test"] == expected
        assert shown["test"] != leaderboard.metric_table(row["predictions"], **base)
    loser = next(r for r in board["points"] if not r["selected"])
    (settings,) = [s for p, s in zip(points, own, strict=True) if p.name == loser["experiment"]]
    delta = leaderboard.paired_delta(rows[1]["predictions"], rows[0]["predictions"], "correct", **settings)
    assert loser["vs_selected"]["answer_accuracy"]["ci95"] == delta["ci95"]
