# Evaluation: the base model and the deployment model answer the same formatted test prompts.


rule eval_base:
    input:
        model_dir=rules.prepare_base_model.output.model_dir,
        test=rules.format_dataset.output.test,
    output:
        evaluation=res("evaluation/base_model_evaluation.json"),
        predictions=res("evaluation/base_predictions.jsonl"),
    params:
        evaluation=config["evaluation"],
        label="base",
    log:
        log_of("eval_base"),
    benchmark:
        bench_of("eval_base")
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
        test=rules.format_dataset.output.test,
    output:
        evaluation=res("evaluation/finetuned_model_evaluation.json"),
        predictions=res("evaluation/finetuned_predictions.jsonl"),
    params:
        evaluation=config["evaluation"],
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
        base=rules.eval_base.output.evaluation,
        finetuned=rules.eval_finetuned.output.evaluation,
        base_predictions=rules.eval_base.output.predictions,
        finetuned_predictions=rules.eval_finetuned.output.predictions,
    output:
        comparison=res("evaluation/comparison.json"),
        markdown=report(res("evaluation/comparison.md"), category="Evaluation", labels={"figure": "table"}),
        metrics_plot=report(res("evaluation/metrics.png"), category="Evaluation", labels={"figure": "metrics"}),
        by_type_plot=report(
            res("evaluation/accuracy_by_type.png"), category="Evaluation", labels={"figure": "by type"}
        ),
    params:
        evaluation=config["evaluation"],
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


ALL_TARGETS.extend(rules.compare.output)
