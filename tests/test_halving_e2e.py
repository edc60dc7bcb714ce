"""Successive halving as a static DAG: its load-time checks, its plan, and a real run on the tiny
model that is SIGKILLed in the middle of a rung, unlocked and finished."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SNAKEMAKE, smk, snakemake_env, write_config

from workflow_scripts import chat
from workflow_scripts.errors import ConfigError
from workflow_scripts.sweeps.plan import halving, halving_slots
from workflow_scripts.sweeps.points import expand
from workflow_scripts.training.checkpoints import checkpoint_is_complete


def halving_sweep(**halving_keys):
    return {
        "sweep": {
            "name": "h",
            "strategy": "halving",
            "grid": {"training.learning_rate": [0.001, 0.002], "peft.r": [4, 8]},
            "halving": {"rungs": [2, 6, 8], "keep": 0.5, **halving_keys},
        },
        "training": {"max_steps": 8},
    }


def plan_of(resolved_config, overrides):
    cfg = resolved_config(overrides)
    return halving(cfg, expand(cfg))


@pytest.mark.parametrize(
    ("n", "keep", "rungs", "slots"),
    [
        (8, 0.5, 3, [8, 4, 2]),
        (8, 0.34, 3, [8, 3, 2]),
        (8, 0.333, 3, [8, 3, 1]),
        (8, 1.0, 2, [8, 8]),
        (1, 0.5, 3, [1, 1, 1]),
        (10, 0.1, 2, [10, 1]),
    ],
)
def test_slots_per_rung_round_up_and_keep_one(n, keep, rungs, slots):
    assert halving_slots(n, keep, rungs) == slots


def test_the_plan_of_a_halving_sweep(resolved_config):
    plan = plan_of(resolved_config, halving_sweep())
    assert plan.slots == (4, 2, 1) and plan.rungs == (2, 6, 8)
    assert [f.name for f in plan.finalists] == ["sweeps/h/finalist-0"]
    # every point trains to the last rung's schedule and shares the data and base model
    assert {p.config["training"]["max_steps"] for p in plan.points} == {8}
    assert len({(p.formatted, p.base_model, p.base_eval) for p in plan.points}) == 1
    assert plan.finalists[0].formatted == plan.points[0].formatted
    assert plan.record(0, 1) == f"results/{plan.points[1].name}/halving/rung-0.json"
    assert plan.record(1, 1) == "results/sweeps/h/halving/rung-1/slot-1.json"
    assert plan.plan()["points"] == [p.name for p in plan.points]
    # a grid sweep has no plan; max_steps -1 takes the last rung
    cfg = halving_sweep()
    cfg["training"]["max_steps"] = -1
    assert plan_of(resolved_config, cfg).points[0].config["training"]["max_steps"] == 8
    grid = resolved_config({"sweep": {"name": "g", "grid": {"peft.r": [4, 8]}}})
    assert halving(grid, expand(grid)) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"halving": None}, "sweep.halving: required with sweep.strategy: halving"),
        (
            {"halving": {"rungs": [6, 2, 8], "keep": 0.5}},
            "sweep.halving.rungs: [6, 2, 8] must be strictly increasing",
        ),
        ({"halving": {"rungs": [2, 2], "keep": 0.5}}, "must be strictly increasing"),
        ({"halving": {"rungs": [2, 8], "keep": 0}}, "sweep.halving.keep"),
        ({"halving": {"rungs": [2, 8], "keep": 1.5}}, "sweep.halving.keep"),
        ({"halving": {"rungs": [8], "keep": 0.5}}, "sweep.halving.rungs"),
        ({"halving": {"rungs": [0, 8], "keep": 0.5}}, "sweep.halving.rungs"),
        (
            {"halving": {"rungs": [2, 6], "keep": 0.5}},
            "the last rung (6) is every point's max_steps, but training.max_steps is 8",
        ),
        ({"grid": {"model.revision": ["a", "b"]}}, "sweep.grid: model.revision: a halving sweep"),
        ({"grid": {"training.max_length": [256, 512]}}, "sweep.grid: training.max_length: a halving sweep"),
        ({"points": [{"training.max_steps": 4}]}, "sweep.points[0]: training.max_steps: a halving sweep"),
        (
            {"samples": {"n": 2, "space": {"evaluation.seed": {"choice": [1, 2]}}}},
            "sweep.samples.space: evaluation.seed",
        ),
        ({"points": [{"training.eval_strategy": "no"}]}, "training.eval_strategy: 'no'"),
        ({"points": [{"training.early_stopping_patience": 2}]}, "training.early_stopping_patience"),
        ({"points": [{"training.eval_strategy": "epoch"}]}, "training.eval_strategy: 'epoch'"),
        ({"points": [{"training.save_only_model": True}]}, "training.save_only_model: true"),
        ({"points": [{"training.load_best_model_at_end": True}]}, "training.load_best_model_at_end: true"),
        ({"points": [{"training.ignore_data_skip": True}]}, "training.ignore_data_skip: true"),
        ({"points": [{"training.save_strategy": "best"}]}, "training.save_strategy: 'best'"),
        ({"strategy": "grid"}, "sweep.halving: set, but sweep.strategy is grid"),
        (
            {"act_on": "learning_rate~0.003_r~4"},
            "sweep.act_on: 'learning_rate~0.003_r~4' is neither `best` nor a point",
        ),
    ],
)
def test_bad_halving_config_is_refused_at_load_naming_the_key(resolved_config, change, message):
    cfg = halving_sweep()
    cfg["sweep"].update(change)
    if cfg["sweep"].get("halving") is None:
        cfg["sweep"].pop("halving")
    with pytest.raises(ConfigError) as err:
        plan_of(resolved_config, cfg)
    assert message in str(err.value)


def test_act_on_takes_a_point_by_short_or_full_name(resolved_config):
    """`best`, a point's short name and its full name are all accepted at load and kept as given
    (the winner rule resolves the name at run time); which point is acted on changes nothing of
    the plan: the same points, slots and finalists as with the default, `best`."""
    default = plan_of(resolved_config, halving_sweep())
    point = "sweeps/h/learning_rate~0.002_r~8"
    assert point in [p.name for p in default.points]
    assert (default.slots, [f.name for f in default.finalists]) == ((4, 2, 1), ["sweeps/h/finalist-0"])
    for name in ("learning_rate~0.002_r~8", point, "best"):
        cfg = halving_sweep()
        cfg["sweep"]["act_on"] = name
        config = resolved_config(cfg)
        assert config["sweep"]["act_on"] == name
        assert halving(config, expand(config)) == default, name


def rule_counts(workdir: Path, configfile: Path) -> dict[str, int]:
    out = smk(workdir, "-n", "--configfile", str(configfile)).stdout
    counts: dict[str, int] = {}
    for rule in re.findall(r"^rule (\w+):", out, flags=re.M):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def test_dry_run_shows_every_rung_of_the_example(workflow_copy):
    """examples/sweep-halving.yaml: 8 points, rungs 4/12/36, keep 0.5 -> 8, 4 and 2 training jobs,
    2 finalists merged and evaluated; all visible before anything runs."""
    counts = rule_counts(workflow_copy, REPO / "examples" / "sweep-halving.yaml")
    assert {
        r: counts.get(r) for r in ("train_rung0", "promote", "train_rung", "train_finalist", "train")
    } == {
        "train_rung0": 8,
        "promote": 2,
        "train_rung": 4,
        "train_finalist": 2,
        "train": None,
    }
    assert counts["merge"] == counts["eval_finetuned"] == counts["compare"] == 2
    assert counts["leaderboard"] == 1


# --- a real halving sweep on the tiny model, killed mid-rung ---------------------------------------

TINY_HALVING = {
    "sweep": {
        "name": "h",
        "strategy": "halving",
        "grid": {"training.learning_rate": [0.001, 0.05], "peft.r": [2, 4]},
        "halving": {"rungs": [2, 6, 8], "keep": 0.5},
    },
    # a checkpoint every 2 steps: rung 1 (steps 2 -> 6) saves checkpoint-4 half-way
    "training": {
        "max_steps": 8,
        "eval_steps": 8,
        "save_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
    },
    "evaluation": {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "metrics": ["answer_accuracy"]},
    "resources": {"threads": 1},
}
SWEEP = Path("results/sweeps/h")


def run_until_mid_rung(wf: Path, cfg: Path, timeout: float = 600) -> str:
    """Run the sweep; SIGKILL the whole process group as soon as a point saves a checkpoint inside
    rung 1 (checkpoint-4: past the rung's start at 2, before its end at 6). The file that fired it."""
    proc = subprocess.Popen(
        [*SNAKEMAKE, "--cores", "2", "--configfile", str(cfg)],
        cwd=wf,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=snakemake_env(),
        start_new_session=True,
    )
    t0, fired = time.monotonic(), None
    try:
        while fired is None and proc.poll() is None and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
            fired = next((str(p) for p in (wf / SWEEP).glob("*/checkpoints/checkpoint-4")), None)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert fired, "no point reached the middle of rung 1"
    return fired


@pytest.mark.e2e
def test_halving_sweep_killed_mid_rung_finishes_and_reruns_as_a_no_op(tiny_formatted):
    wf, tiny = tiny_formatted  # data stages and base model done
    cfg = write_config(wf / "halving.yaml", {**yaml.safe_load(tiny.read_text()), **TINY_HALVING})
    fired = run_until_mid_rung(wf, cfg)
    assert fired
    # both rung-1 slots were running: each resumes from checkpoint-4 if the kill left it whole, else
    # from the rung's start
    resume_at = {
        f"{SWEEP.relative_to('results')}/{d.name}": 4
        if checkpoint_is_complete(d / "checkpoints" / "checkpoint-4")
        else 2
        for d in (wf / SWEEP).iterdir()
        if (d / "checkpoints").is_dir()
    }
    smk(wf, "--unlock", "--configfile", str(cfg))
    smk(wf, "--configfile", str(cfg))

    rung0 = {
        p.parent.parent.name: json.loads(p.read_text()) for p in (wf / SWEEP).glob("*/halving/rung-0.json")
    }
    assert len(rung0) == 4 and all(r["global_step"] == 2 and r["steps"] == 2 for r in rung0.values())

    # promotion after rung 0: the two lowest validation losses, best first
    promo0 = json.loads((wf / SWEEP / "halving" / "promotion-0.json").read_text())
    by_loss = sorted(rung0.values(), key=lambda r: r["eval_loss"])
    assert [s["point"] for s in promo0["survivors"]] == [r["point"] for r in by_loss[:2]]
    # rung 1: each slot continued its point from that point's rung-0 checkpoint to step 6
    slots = [json.loads((wf / SWEEP / "halving" / "rung-1" / f"slot-{k}.json").read_text()) for k in (0, 1)]
    assert [s["point"] for s in slots] == [s["point"] for s in promo0["survivors"]]
    assert all(s["global_step"] == 6 and s["steps"] == 4 and s["rung_start"] == 2 for s in slots)
    for s in slots:
        assert (s["resumed_from_step"], s["steps_trained"]) == (
            resume_at[s["point"]],
            6 - resume_at[s["point"]],
        )

    promo1 = json.loads((wf / SWEEP / "halving" / "promotion-1.json").read_text())
    winner_point = promo1["survivors"][0]["point"]
    run_info = json.loads((wf / SWEEP / "finalist-0" / "training" / "run.json").read_text())
    assert run_info["point"] == winner_point and run_info["global_step"] == 8
    index = json.loads((wf / SWEEP / "finalist-0" / "experiment.json").read_text())
    assert index["point"] == winner_point
    assert index["own"]["checkpoints"] == str(SWEEP / winner_point.rsplit("/", 1)[1] / "checkpoints")
    assert index["config"]["training"] == run_info["resolved_config"]["training"]

    summary = json.loads((wf / SWEEP / "halving.json").read_text())
    assert summary["steps_spent"] == 4 * 2 + 2 * 4 + 1 * 2
    assert summary["grid_steps"] == 4 * 8
    # trained by the current jobs: the slots' steps before the kill were trained by the killed ones
    assert summary["steps_trained"] == 4 * 2 + sum(6 - resume_at[s["point"]] for s in slots) + 2
    reached = {p["point"]: p["rung_reached"] for p in summary["points"]}
    assert sorted(reached.values()) == [0, 0, 1, 2] and reached[winner_point] == 2

    board = json.loads((wf / SWEEP / "leaderboard.json").read_text())
    assert len(board["points"]) == 4
    best = json.loads((wf / SWEEP / "best.json").read_text())
    assert best["experiment"] == winner_point
    assert best["deployment_model"] == str(SWEEP / "finalist-0" / "deployment_model")
    assert (wf / SWEEP / "rungs.png").read_bytes().startswith(b"\x89PNG")
    # the chat command on the sweep folder talks to the winner's deployment model
    assert chat.sweep_model(wf / SWEEP, None)[0] == wf / best["deployment_model"]

    again = smk(wf, "--configfile", str(cfg))
    assert "Nothing to be done" in again.stdout + again.stderr
