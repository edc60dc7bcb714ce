"""Acting on a sweep's winner: which point export_gguf, push_to_hub and the chat command work on
(best.json's winner, or a point named by `sweep.act_on` / `--point`), one clear error for a point
that is unknown or was pruned, and the opt-in targets of a sweep planned on it."""

import json
import re
from pathlib import Path

import pytest
from helpers import REPO, build_tokenizer, save_lively_model, smk, write_config

from workflow_scripts import chat
from workflow_scripts.stage import Job, StageError
from workflow_scripts.sweeps import winner

GRID = [
    "sweeps/s/learning_rate~0.001_r~4",
    "sweeps/s/learning_rate~0.01_r~4",
    "sweeps/s/learning_rate~0.1_r~4",
]
BEST = {"experiment": GRID[1], "select_by": "eval_loss", "selection_value": 1.5}


def sweep_folder(root: Path, points: dict[str, str | None], best: str, halving=None) -> Path:
    """results/sweeps/s/ after a sweep: a folder per finished experiment (``points``: experiment
    folder -> the point its run.json records, None for a grid point), best.json, halving.json."""
    sweep = root / "results" / "sweeps" / "s"
    for folder, point in points.items():
        run_info = sweep / folder / "training" / "run.json"
        run_info.parent.mkdir(parents=True)
        run_info.write_text(json.dumps({"point": point} if point else {"global_step": 2}))
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "best.json").write_text(json.dumps({**BEST, "experiment": best}))
    finished = [
        {
            "experiment": point or f"sweeps/s/{folder}",
            "results_dir": f"results/sweeps/s/{folder}",
            "selection_value": 1.0,
        }
        for folder, point in points.items()
    ]
    pruned = [
        {"experiment": p["point"], "results_dir": f"results/{p['point']}", "selection_value": None}
        for p in halving or []
        if not p.get("finalist")
    ]
    (sweep / "leaderboard.json").write_text(json.dumps({"points": finished + pruned}))
    if halving:
        (sweep / "halving.json").write_text(json.dumps({"strategy": "halving", "points": halving}))
    return sweep


def candidates(sweep: Path) -> dict:
    """experiment -> candidate, as rules/publish.smk passes them (with the rule's inputs)."""
    return {
        f"sweeps/s/{d.name}": {"root": str(d), "input": {"deployment_dir": str(d / "deployment_model")}}
        for d in sorted(sweep.iterdir())
        if d.is_dir()
    }


@pytest.fixture
def grid(tmp_path):
    return sweep_folder(tmp_path / "grid", {n.rsplit("/", 1)[1]: None for n in GRID}, GRID[1])


# A halving sweep of four points: two finalists; 0.1 stopped at rung 0, 0.001 at rung 1.
HALVING_POINTS = [
    {"point": GRID[0], "rung_reached": 1, "steps_reached": 12, "scores": [2.1, 1.9, None], "finalist": None},
    {"point": GRID[1], "rung_reached": 2, "steps_reached": 36, "scores": [2.0, 1.7, 1.5], "finalist": "f"},
    {"point": GRID[2], "rung_reached": 0, "steps_reached": 4, "scores": [3.0, None, None], "finalist": None},
    {
        "point": "sweeps/s/learning_rate~0.01_r~8",
        "rung_reached": 2,
        "steps_reached": 36,
        "scores": [2, 1.8, 1.6],
    },
]


@pytest.fixture
def halved(tmp_path):
    finalists = {"finalist-0": GRID[1], "finalist-1": "sweeps/s/learning_rate~0.01_r~8"}
    return sweep_folder(tmp_path / "halved", finalists, GRID[1], HALVING_POINTS)


def test_best_is_the_winner_in_best_json(grid, halved):
    choice = winner.choose(grid / "best.json", "best", candidates(grid))
    assert (choice.experiment, choice.point) == (GRID[1], GRID[1])
    assert choice.candidate["root"] == str(grid / "learning_rate~0.01_r~4")
    # halving: the winner is a point name; the finalist folder holding it is found by its run.json
    choice = winner.choose(halved / "best.json", "best", candidates(halved))
    assert (choice.experiment, choice.point) == ("sweeps/s/finalist-0", GRID[1])
    record = choice.record("best", json.loads((halved / "best.json").read_text()))
    assert record["is_winner"] and record["results_dir"] == str(halved / "finalist-0")


@pytest.mark.parametrize("name", ["learning_rate~0.1_r~4", "sweeps/s/learning_rate~0.1_r~4"])
def test_a_named_point_short_or_full(grid, name):
    best = json.loads((grid / "best.json").read_text())
    choice = winner.choose(best, name, candidates(grid), sweep_dir=grid)
    assert choice.point == GRID[2] and choice.candidate["root"] == str(grid / "learning_rate~0.1_r~4")
    assert choice.record(name, best) == {
        "point": GRID[2],
        "experiment": GRID[2],
        "results_dir": str(grid / "learning_rate~0.1_r~4"),
        "act_on": name,
        "winner": GRID[1],
        "is_winner": False,
        "select_by": "eval_loss",
    }


def test_a_named_finalist_is_found_by_its_point(halved):
    choice = winner.choose(halved / "best.json", "learning_rate~0.01_r~8", candidates(halved))
    assert (choice.experiment, choice.point) == ("sweeps/s/finalist-1", "sweeps/s/learning_rate~0.01_r~8")


def test_an_unknown_point_names_the_key_and_the_close_names(grid):
    with pytest.raises(
        StageError,
        match=r"^sweep.act_on: 'learning_rate~0.01_r~5' is not a point of this sweep; "
        r"did you mean 'learning_rate~0.01_r~4'",
    ):
        winner.choose(grid / "best.json", "learning_rate~0.01_r~5", candidates(grid))
    # another sweep's full name is not this sweep's point; nothing close: the finished points are listed
    with pytest.raises(StageError, match=r"'sweeps/t/learning_rate~0.1_r~4' is not a point .*did you mean"):
        winner.choose(grid / "best.json", "sweeps/t/learning_rate~0.1_r~4", candidates(grid))
    with pytest.raises(
        StageError, match=r"'zzz' is not a point of this sweep; the finished points: learning_rate"
    ):
        winner.choose(grid / "best.json", "zzz", candidates(grid))


@pytest.mark.parametrize(
    "name, rung, steps",
    [("learning_rate~0.1_r~4", 0, 4), ("sweeps/s/learning_rate~0.001_r~4", 1, 12)],
)
def test_a_pruned_point_names_the_rung_it_stopped_at(halved, name, rung, steps):
    short = name.rsplit("/", 1)[-1]
    with pytest.raises(
        StageError,
        match=rf"^sweep.act_on: point '{short}' did not finish: successive halving stopped it at rung {rung} "
        rf"\({steps} steps\), so it has no fine-tuned model; the finished points: learning_rate~0.01_r~4, "
        r"learning_rate~0.01_r~8$",
    ):
        winner.choose(halved / "best.json", name, candidates(halved))


def test_a_winner_that_is_no_candidate_is_an_error(grid):
    (grid / "best.json").write_text(json.dumps({**BEST, "experiment": "sweeps/s/gone~1"}))
    with pytest.raises(
        StageError, match=r"best.json: its winner 'sweeps/s/gone~1' is none of the sweep's finished"
    ):
        winner.choose(grid / "best.json", "best", candidates(grid))


def test_subject_is_the_rules_own_inputs_for_one_run_and_the_chosen_candidates_for_a_sweep(grid):
    single = Job(input={"deployment_dir": "results/x/deployment_model"}, params={"dataset": {"id": "d"}})
    chosen = winner.subject(single)
    assert chosen.input is single.input and chosen.params is single.params and chosen.acted_on is None
    cands = {
        name: {**c, "params": {"dataset": {"id": f"data-{i}"}}}
        for i, (name, c) in enumerate(candidates(grid).items())
    }
    job = Job(
        input={"best": str(grid / "best.json"), "candidates": ["every", "candidate's", "files"]},
        params={"hub": {"repo_id": "me/m"}, "candidates": cands, "act_on": "best"},
    )
    chosen = winner.subject(job)
    assert chosen.input.deployment_dir == str(grid / "learning_rate~0.01_r~4" / "deployment_model")
    assert dict(chosen.params) == {"hub": {"repo_id": "me/m"}, "dataset": {"id": "data-1"}}
    assert chosen.acted_on["point"] == GRID[1] and chosen.acted_on["is_winner"]


# --- the chat command on a sweep folder ----------------------------------------------------------


def test_chat_on_a_sweep_folder_talks_to_the_winner_or_the_named_point(halved, capsys):
    # a folder an earlier plan of the sweep left (a grid run under the same name): not a candidate
    stale = halved / GRID[2].rsplit("/", 1)[1] / "training" / "run.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"global_step": 36}))
    with pytest.raises(chat.ChatError, match="did not finish: successive halving stopped it at rung 0"):
        chat.sweep_model(halved, GRID[2].rsplit("/", 1)[1])
    assert chat.sweep_model(halved, None) == (
        halved / "finalist-0" / "deployment_model",
        f"point {GRID[1]} (the winner in best.json)",
    )
    assert chat.sweep_model(halved, "learning_rate~0.01_r~8")[0] == halved / "finalist-1" / "deployment_model"
    save_lively_model(halved / "finalist-0" / "deployment_model", build_tokenizer())
    assert chat.main([str(halved), "--prompt", "What was the revenue?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["{sweep}", "--point", "learning_rate~0.1_r~4"],
            "--point: point 'learning_rate~0.1_r~4' did not finish",
        ),
        (["{sweep}", "--point", "learning_rate~0.01_r~9"], "did you mean 'learning_rate~0.01_r~8'"),
        (["{sweep}/finalist-0", "--point", "x"], "--point: {sweep}/finalist-0 is not a sweep folder"),
        (["{empty}"], "{empty}: no best.json: the sweep has not finished"),
        (["{sweep}/../unfinished-board"], "no leaderboard.json: the sweep has not finished"),
    ],
)
def test_chat_errors_on_a_sweep_are_one_line(halved, capsys, args, message):
    empty = halved.parent / "unfinished"
    empty.mkdir()
    no_board = halved.parent / "unfinished-board"  # best.json without the leaderboard it comes with
    no_board.mkdir()
    (no_board / "best.json").write_text(json.dumps(BEST))
    names = {"sweep": halved, "empty": empty}
    assert chat.main([a.format(**names) for a in args] + ["--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("snaketune-chat: error: ") and err.count("\n") == 1 and message.format(**names) in err
    )


# --- the opt-in targets of a sweep, planned ------------------------------------------------------


def test_export_and_push_of_a_sweep_plan_every_candidate_and_write_in_the_sweep_folder(tiny_workflow):
    wf, cfg = tiny_workflow
    sweep = write_config(
        wf / "sweep.yaml",
        {"sweep": {"name": "grid", "grid": {"peft.r": [2, 4]}, "act_on": "r~4"}},
    )
    out = smk(wf, "-n", "export_gguf", "push_to_hub", "--configfile", str(cfg), str(sweep)).stdout
    for path in (
        "export/tiny-grid-q8_0.gguf",
        "export/export_report.json",
        "export/Modelfile",
        "hub/README.md",
        "hub/push_report.json",
    ):
        assert f"results/sweeps/grid/{path}" in out, path
    assert "r~2/export" not in out and "r~4/export" not in out and "r~4/hub" not in out
    # both points are built (which one is acted on is known once best.json is), then the leaderboard
    counts = {
        rule: out.count(f"rule {rule}:")
        for rule in ("merge", "compare", "leaderboard", "export_gguf", "push_to_hub")
    }
    assert counts == {"merge": 2, "compare": 2, "leaderboard": 1, "export_gguf": 1, "push_to_hub": 1}


def test_export_of_a_halving_sweep_plans_its_finalists(tiny_workflow):
    wf, cfg = tiny_workflow
    sweep = write_config(
        wf / "halving.yaml",
        {
            "training": {"max_steps": 8},
            "sweep": {
                "name": "hv",
                "strategy": "halving",
                "halving": {"rungs": [2, 4, 8], "keep": 0.5},
                "grid": {"peft.r": [2, 4, 8, 16]},
            },
        },
    )
    out = smk(wf, "-n", "export_gguf", "--configfile", str(cfg), str(sweep)).stdout
    assert "results/sweeps/hv/export/tiny-hv-q8_0.gguf" in out
    # slots 4, 2, 1: one finalist is merged and exported; pruned points never are
    counts = {
        rule: out.count(f"rule {rule}:") for rule in ("train_rung0", "merge", "leaderboard", "export_gguf")
    }
    assert counts == {"train_rung0": 4, "merge": 1, "leaderboard": 1, "export_gguf": 1}
    assert "results/sweeps/hv/finalist-0/deployment_model" in out


def test_the_scripts_read_the_inputs_the_rules_give_each_candidate():
    """export_inputs / push_inputs (rules/common.smk, for rules/publish.smk) name what the scripts
    read of the point acted on (`chosen.input.<name>`): the same names for a single run and for
    every candidate."""
    rules = (REPO / "rules" / "common.smk").read_text()
    for function, script in (("export_inputs", "export_gguf"), ("push_inputs", "push_to_hub")):
        body = re.search(rf"def {function}\(e\):\n((?:    .*\n)+)", rules).group(1)
        declared = set(re.findall(r'"(\w+)":', body))
        read = set(
            re.findall(r"\bchosen\.input\.(\w+)", (REPO / f"workflow_scripts/models/{script}.py").read_text())
        )
        assert read and read <= declared, (script, read - declared)
