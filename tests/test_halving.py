"""Successive halving's decisions and bookkeeping, without training: the promotion rule as a pure
function, halving.json's step count, the leaderboard of a halving sweep, the promote rule's script."""

import csv
import json
import math
from pathlib import Path

import pytest

from workflow_scripts.stage import Job, StageError
from workflow_scripts.sweeps import leaderboard
from workflow_scripts.sweeps import promote as halving
from workflow_scripts.sweeps.plan import halving_slots

SWEEP = "sweeps/s"
RUNGS = [4, 12, 36]
# validation loss of 8 points at each rung (sweep order); a point only has the rungs it reaches
LOSSES = {
    "lr~1": [2.0, 1.9, 1.8],
    "lr~2": [1.5, 1.2, 1.0],  # finalist, best at the end
    "lr~3": [1.6, 1.3, 1.1],  # finalist
    "lr~4": [1.4, 1.35, 1.3],  # best at rung 0, cut at rung 1
    "lr~5": [2.5, 2.4, 2.3],
    "lr~6": [1.7, 1.6, 1.5],  # kept at rung 0, cut at rung 1
    "lr~7": [3.0, 2.9, 2.8],
    "lr~8": [1.9, 1.8, 1.7],
}
POINTS = [f"{SWEEP}/{p}" for p in LOSSES]


def loss(point: str, rung: int) -> float:
    return LOSSES[point.rsplit("/", 1)[-1]][rung]


# --- the rule ----------------------------------------------------------------------------------


def test_lower_loss_wins_and_keep_counts_the_survivors():
    scores = [(p, loss(p, 0)) for p in POINTS]
    out = halving.promote(scores, 4, rung=0)
    assert out["survivors"] == [f"{SWEEP}/lr~{i}" for i in (4, 2, 3, 6)]
    assert [r["rank"] for r in out["ranking"]] == list(range(1, 9))
    assert [r["kept"] for r in out["ranking"]] == [True] * 4 + [False] * 4
    cut = out["cut"]
    assert cut["last_kept"] == f"{SWEEP}/lr~6" and cut["first_dropped"] == f"{SWEEP}/lr~8"
    assert cut["margin"] == pytest.approx(0.2) and cut["tied"] is False
    assert halving.promote(scores, 1)["survivors"] == [f"{SWEEP}/lr~4"]


def test_keep_all_drops_nobody():
    scores = [("a", 1.0), ("b", 0.5)]
    out = halving.promote(scores, 2)
    assert out["survivors"] == ["b", "a"] and all(r["kept"] for r in out["ranking"])
    assert out["cut"] == {"last_kept": "a", "first_dropped": None, "margin": None, "tied": False}


def test_exact_ties_go_to_the_earlier_point_in_sweep_order():
    scores = [("a", 1.0), ("b", 0.5), ("c", 0.5), ("d", 0.7)]
    out = halving.promote(scores, 1)
    assert out["survivors"] == ["b"]
    assert out["cut"] == {"last_kept": "b", "first_dropped": "c", "margin": 0.0, "tied": True}
    assert halving.promote(list(reversed(scores)), 1)["survivors"] == ["c"]  # order is the rule
    assert halving.promote(scores, 2)["survivors"] == ["b", "c"]


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf"), "1.0"])
def test_a_score_that_is_not_a_number_is_refused_naming_point_and_rung(bad):
    with pytest.raises(StageError, match=r"point b has no finite validation loss at rung 2"):
        halving.promote([("a", 1.0), ("b", bad)], 1, rung=2)


@pytest.mark.parametrize("keep", [0, 3, 1.5, True])
def test_keep_must_leave_one_to_all_points(keep):
    with pytest.raises(StageError, match="keep must be a whole number from 1 to 2"):
        halving.promote([("a", 1.0), ("b", 0.5)], keep)


def test_a_point_twice_is_refused():
    with pytest.raises(StageError, match="point a appears twice at rung 0"):
        halving.promote([("a", 1.0), ("a", 0.5)], 1, rung=0)


def test_slots_round_up_and_keep_at_least_one():
    assert halving_slots(8, 0.5, 3) == [8, 4, 2]
    assert halving_slots(8, 1 / 3, 3) == [8, 3, 1]  # 2.67 -> 3, 1 -> 1
    assert halving_slots(10, 0.3, 2) == [10, 3]  # 0.3 * 10 is 3.0000000000000004 in floats
    assert halving_slots(3, 0.1, 3) == [3, 1, 1]  # never none
    assert halving_slots(5, 1.0, 3) == [5, 5, 5]


# --- a whole sweep's files, built by hand with the rule --------------------------------------------


def simulate(keep: float = 0.5):
    """Rung records, promotions and finalist run.json of an 8-point sweep, decided by the rule."""
    slots = halving_slots(len(POINTS), keep, len(RUNGS))
    plan = {
        "rungs": RUNGS,
        "keep": keep,
        "slots": slots,
        "points": POINTS,
        "finalists": [f"{SWEEP}/finalist-{k}" for k in range(slots[-1])],
    }
    records, promotions, paths = [], [], []
    alive = POINTS
    for rung in range(len(RUNGS) - 1):
        start = RUNGS[rung - 1] if rung else 0
        rung_records = [
            {
                "point": p,
                "rung": rung,
                "slot": None if rung == 0 else k,
                "target_step": RUNGS[rung],
                "rung_start": start,
                "steps": RUNGS[rung] - start,
                "resumed_from_step": start,
                "steps_trained": RUNGS[rung] - start,
                "global_step": RUNGS[rung],
                "eval_loss": loss(p, rung),
            }
            for k, p in enumerate(alive)
        ]
        rung_paths = [
            f"results/{p}/halving/rung-0.json"
            if rung == 0
            else f"results/{SWEEP}/halving/rung-{rung}/slot-{k}.json"
            for k, p in enumerate(alive)
        ]
        promo = halving.promotion(rung_records, rung_paths, rung, slots[rung + 1], POINTS)
        records += rung_records
        paths += rung_paths
        promotions.append(promo)
        alive = [s["point"] for s in promo["survivors"]]
    run_infos = [
        {
            "experiment": name,
            "point": p,
            "final_eval_loss": loss(p, len(RUNGS) - 1),
            "global_step": RUNGS[-1],
            "halving": {
                "rung": len(RUNGS) - 1,
                "slot": k,
                "rung_start": RUNGS[-2],
                "steps": RUNGS[-1] - RUNGS[-2],
                "resumed_from_step": RUNGS[-2],
            },
        }
        for k, (name, p) in enumerate(zip(plan["finalists"], alive, strict=True))
    ]
    return plan, records, paths, promotions, run_infos


def test_promotions_chain_and_survivors_fill_slots_in_rank_order():
    _, _, _, promotions, run_infos = simulate()
    assert [s["point"] for s in promotions[0]["survivors"]] == [f"{SWEEP}/lr~{i}" for i in (4, 2, 3, 6)]
    assert promotions[0]["survivors"][0]["record"] == f"results/{SWEEP}/lr~4/halving/rung-0.json"
    # rung 1 records come in slot order (lr~4 first) but are ranked on loss, then sweep order
    assert promotions[1]["step"] == 12 and promotions[1]["keep"] == 2
    assert [s["point"] for s in promotions[1]["survivors"]] == [f"{SWEEP}/lr~2", f"{SWEEP}/lr~3"]
    assert promotions[1]["survivors"][0]["record"] == f"results/{SWEEP}/halving/rung-1/slot-1.json"
    assert [i["point"] for i in run_infos] == [f"{SWEEP}/lr~2", f"{SWEEP}/lr~3"]


def test_summary_counts_the_steps_spent_against_a_grid():
    plan, records, _, promotions, run_infos = simulate()
    out = halving.summary(plan, records, run_infos, promotions)
    # 8 points x 4 steps + 4 x (12 - 4) + 2 x (36 - 12) = 32 + 32 + 48; the grid: 8 x 36
    assert (out["steps_spent"], out["grid_steps"]) == (112, 288)
    assert out["fraction_of_grid"] == pytest.approx(112 / 288, abs=1e-4)
    assert out["steps_trained"] == 112  # a clean run: every job trained its rung's steps
    # a re-run whose first finalist found its checkpoint at step 36 and a rung-0 job killed after
    # step 2 of 4 (re-run from checkpoint-2): the jobs trained 24 + 2 steps fewer than the plan
    rerun_infos = [
        {**run_infos[0], "halving": {**run_infos[0]["halving"], "resumed_from_step": 36}},
        run_infos[1],
    ]
    rerun_records = [{**records[0], "resumed_from_step": 2, "steps_trained": 2}, *records[1:]]
    rerun = halving.summary(plan, rerun_records, rerun_infos, promotions)
    assert (rerun["steps_spent"], rerun["steps_trained"]) == (112, 112 - 24 - 2)
    by_point = {p["point"]: p for p in out["points"]}
    assert [p["point"] for p in out["points"]] == POINTS  # sweep order
    assert by_point[f"{SWEEP}/lr~2"] == {
        "point": f"{SWEEP}/lr~2",
        "rung_reached": 2,
        "steps_reached": 36,
        "scores": [1.5, 1.2, 1.0],
        "finalist": f"{SWEEP}/finalist-0",
    }
    assert by_point[f"{SWEEP}/lr~4"]["rung_reached"] == 1 and by_point[f"{SWEEP}/lr~4"]["scores"] == [
        1.4,
        1.35,
        None,
    ]
    assert (
        by_point[f"{SWEEP}/lr~7"]["scores"] == [3.0, None, None]
        and by_point[f"{SWEEP}/lr~7"]["finalist"] is None
    )
    assert [c["keep"] for c in out["cuts"]] == [4, 2] and out["cuts"][1]["last_kept"] == f"{SWEEP}/lr~3"

    with pytest.raises(StageError, match=r"finalists trained .* but promotion-1 promoted"):
        halving.summary(plan, records, list(reversed(run_infos)), promotions)
    no_steps = {k: v for k, v in run_infos[0].items() if k != "halving"}
    with pytest.raises(StageError, match="finalist-0's training/run.json has no 'halving'"):
        halving.summary(plan, records, [no_steps, run_infos[1]], promotions)
    with pytest.raises(StageError, match=r"point sweeps/s/lr~1 has no rung-0 record"):
        halving.summary(plan, records[1:], run_infos, promotions)


# --- the leaderboard of a halving sweep ------------------------------------------------------------


def _finalist(info: dict, correct: list[int]) -> dict:
    return {
        "name": info["experiment"],
        "run_info": info,
        "predictions": [{"prompt": f"p{i}", "correct": c} for i, c in enumerate(correct)],
        "validation_eval": None,
        "comparison": {"metrics": {}},
        "deployment": f"results/{info['experiment']}/deployment_model",
        "bootstrap": {"samples": 200, "seed": 0},
    }


def test_leaderboard_lists_finalists_by_point_then_pruned_points_with_their_rung(tmp_path):
    plan, records, _, promotions, run_infos = simulate()
    summary = halving.summary(plan, records, run_infos, promotions)
    finalists = [_finalist(run_infos[0], [1, 0, 1, 1]), _finalist(run_infos[1], [1, 1, 1, 1])]
    board = leaderboard.build(finalists, "eval_loss", None, summary)
    assert board["strategy"] == "halving" and board["selected"] == f"{SWEEP}/lr~2"
    rows = board["points"]
    assert [r["experiment"] for r in rows] == [f"{SWEEP}/lr~{i}" for i in (2, 3, 4, 6, 8, 1, 5, 7)]
    assert rows[0]["results_dir"] == f"results/{SWEEP}/finalist-0" and rows[0]["selected"]
    assert rows[0]["deployment_model"] == f"results/{SWEEP}/finalist-0/deployment_model"
    assert [r["rung_reached"] for r in rows] == [2, 2, 1, 1, 0, 0, 0, 0]
    assert rows[1]["vs_selected"]["answer_accuracy"]["delta"] == pytest.approx(0.25)
    pruned = rows[2]
    assert (
        pruned["test"] == {}
        and pruned["selection_value"] is None
        and pruned["results_dir"] == f"results/{SWEEP}/lr~4"
    )
    assert pruned["rung_scores"] == [1.4, 1.35, None]

    md = leaderboard.to_markdown(board, "s")
    assert "steps spent: 112 of a grid's 288 (38.9%)" in md
    assert "| | point | selection | rung reached | test answer_accuracy |" in md
    assert f"|  | `{SWEEP}/lr~4` | — | 1 (step 12, val. loss 1.3500) | — | pruned |" in md
    assert f"| **selected** | `{SWEEP}/lr~2` | 1.0000 | 2 (step 36, finished) |" in md
    leaderboard.write_csv(board, tmp_path / "board.csv")
    table = list(csv.DictReader((tmp_path / "board.csv").open()))
    assert [r["rung_reached"] for r in table] == ["2", "2", "1", "1", "0", "0", "0", "0"]
    assert table[2]["selection_value"] == "" and table[2]["test_answer_accuracy"] == ""

    # a finalist whose run.json does not name its point cannot be placed
    broken = [_finalist({k: v for k, v in run_infos[0].items() if k != "point"}, [1]), finalists[1]]
    with pytest.raises(StageError, match="finalist-0's training/run.json has no 'point'"):
        leaderboard.build(broken, "eval_loss", None, summary)


def test_grid_rows_have_no_rung_and_their_own_folder():
    board = leaderboard.build(
        [_finalist({"experiment": "sweeps/g/a", "final_eval_loss": 1.0}, [1, 0])], "eval_loss"
    )
    (row,) = board["points"]
    assert board["strategy"] == "grid" and "halving" not in board
    assert row["rung_reached"] is None and row["results_dir"] == "results/sweeps/g/a"
    assert "rung reached" not in leaderboard.to_markdown(board, "g")


def test_leaderboard_stage_writes_halving_json_rung_plot_and_best(tmp_path):
    plan, records, paths, promotions, run_infos = simulate()
    files = {"run_info": [], "metrics": [], "predictions": [], "comparison": [], "deployment": []}
    for k, info in enumerate(run_infos):
        d = tmp_path / info["experiment"]
        (d / "training").mkdir(parents=True)
        (d / "training/run.json").write_text(json.dumps(info))
        (d / "training/metrics.csv").write_text(
            f"step,loss,eval_loss\n12,,{loss(info['point'], 1)}\n36,,{info['final_eval_loss']}\n"
        )
        (d / "predictions.jsonl").write_text(
            "".join(json.dumps({"prompt": f"p{i}", "correct": (i + k) % 2}) + "\n" for i in range(4))
        )
        (d / "comparison.json").write_text(json.dumps({"metrics": {}}))
        for key, path in zip(
            files,
            [
                "training/run.json",
                "training/metrics.csv",
                "predictions.jsonl",
                "comparison.json",
                "deployment_model",
            ],
            strict=True,
        ):
            files[key].append(str(d / path))
    record_files = []
    for record, path in zip(records, paths, strict=True):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(record))
        record_files.append(str(tmp_path / path))
    promotion_files = []
    for r, promo in enumerate(promotions):
        promotion_files.append(str(tmp_path / f"promotion-{r}.json"))
        (tmp_path / f"promotion-{r}.json").write_text(json.dumps(promo))
    out = {
        name: str(tmp_path / "out" / name)
        for name in (
            "json",
            "markdown",
            "csv",
            "metrics_plot",
            "curves_plot",
            "best",
            "halving",
            "rungs_plot",
        )
    }
    job = Job(
        input={**files, "validation_eval": [], "records": record_files, "promotions": promotion_files},
        output=out,
        params={
            "points": plan["finalists"],
            "halving": plan,
            "sweep": {"name": "s", "select_by": "eval_loss"},
            "evaluation": [{"bootstrap_samples": 100, "seed": 0}] * len(plan["finalists"]),
            "general": None,
        },
    )
    leaderboard.run(job)
    best = json.loads(open(out["best"]).read())
    assert best["experiment"] == f"{SWEEP}/lr~2" and best["strategy"] == "halving"
    assert best["results_dir"] == f"results/{SWEEP}/finalist-0"
    assert best["deployment_model"].endswith("finalist-0/deployment_model")
    written = json.loads(open(out["halving"]).read())
    assert (
        written["steps_spent"] == 112
        and written["grid_steps"] == 288
        and written["selected"] == f"{SWEEP}/lr~2"
    )
    assert open(out["rungs_plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "steps spent: 112 of a grid's 288" in open(out["markdown"]).read()


# --- the promote rule's script -------------------------------------------------------------------


def _promote_job(tmp_path, records: list[dict], rung: int = 1, keep: int = 2, previous=None) -> Job:
    """The promote job of ``records`` (slot order); ``previous``: the promotion that filled the slots."""
    paths = []
    for k, record in enumerate(records):
        path = tmp_path / f"rung-{rung}" / f"slot-{k}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        paths.append(str(path))
    previous_files = []
    if previous is not None:
        previous_files = [str(tmp_path / f"promotion-{rung - 1}.json")]
        Path(previous_files[0]).write_text(json.dumps(previous))
    return Job(
        input={"records": paths, "previous": previous_files},
        output={"promotion": str(tmp_path / f"promotion-{rung}.json")},
        params={"rung": rung, "keep": keep, "points": POINTS},
    )


def _record(point: str, eval_loss, rung: int = 1) -> dict:
    return {
        "point": f"{SWEEP}/{point}",
        "rung": rung,
        "slot": 0,
        "target_step": 12,
        "steps": 8,
        "eval_loss": eval_loss,
    }


def test_promote_script_ranks_the_rung_files(tmp_path):
    # slot order (lr~6, lr~3, lr~2) is not sweep order: the tie of lr~3 and lr~6 goes to lr~3
    job = _promote_job(tmp_path, [_record("lr~6", 1.3), _record("lr~3", 1.3), _record("lr~2", 1.2)])
    result = halving.run(job)
    written = json.loads((tmp_path / "promotion-1.json").read_text())
    assert written == result and written["rung"] == 1 and written["step"] == 12 and written["keep"] == 2
    assert [s["point"] for s in written["survivors"]] == [f"{SWEEP}/lr~2", f"{SWEEP}/lr~3"]
    assert written["survivors"][1]["record"] == str(tmp_path / "rung-1" / "slot-1.json")
    assert written["cut"]["tied"] is True and written["cut"]["first_dropped"] == f"{SWEEP}/lr~6"
    assert [set(r) for r in written["ranking"]] == [{"point", "record", "eval_loss", "rank", "kept"}] * 3


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [_record("lr~2", 1.0, rung=0), _record("lr~3", 1.1)],
            r"slot-0.json: rung record of rung 0 given to promote rung 1",
        ),
        (
            [_record("lr~2", 1.0), _record("lr~99", 1.1)],
            r"slot-1.json: point sweeps/s/lr~99 is not a point of this sweep",
        ),
        (
            [_record("lr~2", 1.0), _record("lr~2", 1.1)],
            r"slot-1.json: point sweeps/s/lr~2 appears twice at rung 1",
        ),
        (
            [_record("lr~2", 1.0), _record("lr~3", math.nan)],
            r"point sweeps/s/lr~3 has no finite validation loss at rung 1",
        ),
        (
            [_record("lr~2", 1.0), {"point": f"{SWEEP}/lr~3", "rung": 1}],
            r"slot-1.json: rung record has no 'target_step'",
        ),
    ],
)
def test_promote_script_refuses_inconsistent_records_writing_nothing(tmp_path, records, message):
    job = _promote_job(tmp_path, records, keep=1)
    with pytest.raises(StageError, match=message):
        halving.run(job)
    assert not (tmp_path / "promotion-1.json").exists()


def test_promote_refuses_a_slot_holding_another_point_than_the_promotion_put_there(tmp_path):
    """A stale slot file (restored, touched) is refused, not ranked: slot k must hold survivor k."""
    previous = {"rung": 0, "survivors": [{"point": f"{SWEEP}/lr~2"}, {"point": f"{SWEEP}/lr~3"}]}
    fine = _promote_job(tmp_path, [_record("lr~2", 1.0), _record("lr~3", 1.1)], keep=1, previous=previous)
    assert [s["point"] for s in halving.run(fine)["survivors"]] == [f"{SWEEP}/lr~2"]
    swapped = _promote_job(tmp_path, [_record("lr~3", 1.1), _record("lr~2", 1.0)], keep=1, previous=previous)
    (tmp_path / "promotion-1.json").unlink()
    with pytest.raises(
        StageError, match=r"slot-0.json holds sweeps/s/lr~3, but promotion-0 put sweeps/s/lr~2"
    ):
        halving.run(swapped)
    assert not (tmp_path / "promotion-1.json").exists()
