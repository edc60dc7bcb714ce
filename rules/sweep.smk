# Many experiments: the leaderboard of a sweep, and (when the winner is chosen by a generation
# metric) each point's evaluation on the validation split. The test split never picks the winner.


rule eval_validation:
    input:
        model_dir=rules.merge.output.deployment_dir,
        prompts=lambda w: f"{exp(w).formatted}/validation_prompts.parquet",
    output:
        evaluation=exp_path("evaluation/validation_evaluation.json"),
        predictions=exp_path("evaluation/validation_predictions.jsonl"),
    params:
        evaluation=eval_settings,
        label="validation",
    log:
        log_of("eval_validation"),
    benchmark:
        bench_of("eval_validation")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/evaluation/evaluate_model.py"


if SWEEP:
    SWEEP_DIR = f"results/sweeps/{SWEEP['name']}"
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
            records=[f for r in range(HALVING.last) for f in HALVING.records(r)] if HALVING else [],
            promotions=[HALVING.promotion(r) for r in range(HALVING.last)] if HALVING else [],
        output:
            json=f"{SWEEP_DIR}/leaderboard.json",
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
            best=f"{SWEEP_DIR}/best.json",
            **(
                {
                    "halving": f"{SWEEP_DIR}/halving.json",
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
            evaluation=config["evaluation"],
            general=config["general_ability"],  # tolerance / exclude_from_winning (rules/general.smk)
        log:
            f"{SWEEP_DIR}/logs/leaderboard.log",
        threads: 1
        resources:
            **resources_for("data"),
        conda:
            ENV
        script:
            "../workflow_scripts/evaluation/leaderboard.py"

    ALL_TARGETS.extend(rules.leaderboard.output)
