# Many experiments: the leaderboard of a sweep (rows per point, the winner chosen on validation
# into best.json). The test split never picks the winner.

if SWEEP:
    SWEEP_DIR = layout.sweep_dir(SWEEP["name"])
    POINTS = list(EXPERIMENTS)
    BY_METRIC = SWEEP["select_by"] != "eval_loss"

    rule leaderboard:
        input:
            run_info=per_point("training/run.json"),
            metrics=per_point("training/metrics.csv"),
            predictions=per_point("evaluation/finetuned_predictions.jsonl"),
            comparison=per_point("evaluation/comparison.json"),
            deployment=per_point("deployment_model"),
            validation_eval=per_point("evaluation/validation_evaluation.json") if BY_METRIC else [],
            # halving: every rung's records (rung 0's points, then each middle rung's slots) and promotions
            records=HALVING.rung_records() if HALVING else [],
            promotions=HALVING.promotions() if HALVING else [],
        output:
            json=f"{SWEEP_DIR}/{layout.LEADERBOARD}",
            markdown=report(
                f"{SWEEP_DIR}/leaderboard.md",
                caption="report/leaderboard.rst",
                category="Sweep",
                labels={"figure": "leaderboard"},
            ),
            csv=f"{SWEEP_DIR}/leaderboard.csv",
            metrics_plot=report(
                f"{SWEEP_DIR}/leaderboard.png",
                caption="report/leaderboard_plot.rst",
                category="Sweep",
                labels={"figure": "test metrics"},
            ),
            curves_plot=report(
                f"{SWEEP_DIR}/validation_loss.png",
                caption="report/validation_loss.rst",
                category="Sweep",
                labels={"figure": "validation loss"},
            ),
            best=f"{SWEEP_DIR}/{layout.BEST}",
            **(
                {
                    "halving": f"{SWEEP_DIR}/{layout.HALVING_SUMMARY}",
                    "rungs_plot": report(
                        f"{SWEEP_DIR}/rungs.png",
                        caption="report/rungs.rst",
                        category="Sweep",
                        labels={"figure": "rungs"},
                    ),
                }
                if HALVING
                else {}
            ),
        params:
            points=POINTS,  # the experiments: every point, or a halving sweep's finalists
            halving=HALVING.plan() if HALVING else None,
            sweep=SWEEP,
            # each point's own (a sweep may vary evaluation): its rows' intervals, as its compare's
            evaluation=[e.config["evaluation"] for e in EXPERIMENTS.values()],
            general=PRIMARY.config["general_ability"],  # not sweepable: tolerance / exclude_from_winning
        log:
            f"{SWEEP_DIR}/logs/leaderboard.log",
        threads: 1
        resources:
            **resources_for("data"),
        conda:
            ENV
        script:
            "../workflow_scripts/sweeps/leaderboard.py"

    ALL_TARGETS.extend(rules.leaderboard.output)
