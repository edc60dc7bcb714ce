# Evaluation: the base model (shared by every experiment with the same test prompts and settings)
# and each experiment's deployment model answer the same formatted test prompts.


rule eval_base:
    input:
        model_dir=lambda w: BASE_EVALS[w.base_eval].base_model,
        prompts=lambda w: f"{BASE_EVALS[w.base_eval].formatted}/test.parquet",
    output:
        evaluation=f"{SHARED}/eval_base/{{base_eval}}/base_model_evaluation.json",
        predictions=f"{SHARED}/eval_base/{{base_eval}}/base_predictions.jsonl",
    params:
        evaluation=eval_settings,
        label="base",
    log:
        log_of("eval_base", "base_eval"),
    benchmark:
        bench_of("eval_base", "base_eval")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/evaluation/evaluate_model.py"


rule eval_finetuned:
    input:
        model_dir=rules.merge.output.deployment_dir,
        prompts=formatted_of("test"),
    output:
        evaluation=exp_path("evaluation/finetuned_model_evaluation.json"),
        predictions=exp_path("evaluation/finetuned_predictions.jsonl"),
    params:
        evaluation=eval_settings,
        label="finetuned",
    log:
        log_of("eval_finetuned"),
    benchmark:
        bench_of("eval_finetuned")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/evaluation/evaluate_model.py"


rule compare:
    input:
        unpack(general_inputs),  # general ability (rules/general.smk), when general_ability is on
        base=base_eval_of("base_model_evaluation.json"),
        finetuned=rules.eval_finetuned.output.evaluation,
        base_predictions=base_eval_of("base_predictions.jsonl"),
        finetuned_predictions=rules.eval_finetuned.output.predictions,
    output:
        comparison=exp_path("evaluation/comparison.json"),
        markdown=report(
            exp_path("evaluation/comparison.md"),
            caption="report/comparison.rst",
            category="Evaluation",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "table"},
        ),
        metrics_plot=report(
            exp_path("evaluation/metrics.png"),
            caption="report/metrics.rst",
            category="Evaluation",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "metrics"},
        ),
        by_type_plot=report(
            exp_path("evaluation/accuracy_by_type.png"),
            caption="report/by_type.rst",
            category="Evaluation",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "by type"},
        ),
    params:
        evaluation=setting("evaluation"),
        general=setting("general_ability"),
    log:
        log_of("compare"),
    benchmark:
        bench_of("compare")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/evaluation/compare.py"


# A sweep point's evaluation on the validation split, when the winner is chosen by a generation
# metric (sweep.select_by); the leaderboard (rules/sweep.smk) reads it.
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


rule experiment_index:
    input:
        comparison=rules.compare.output.comparison,
        run_info=exp_path("training/run.json"),  # a halving finalist: the point it holds
    output:
        index=exp_path(layout.EXPERIMENT_INDEX),
    params:
        artifacts=lambda w: exp(w).artifacts(),
    log:
        log_of("experiment_index"),
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/experiment_index.py"


ALL_TARGETS.extend(
    layout.experiment_path(name, path)
    for name in EXPERIMENTS
    for path in (
        "evaluation/comparison.json",
        "evaluation/comparison.md",
        "evaluation/metrics.png",
        "evaluation/accuracy_by_type.png",
        layout.EXPERIMENT_INDEX,
    )
)
