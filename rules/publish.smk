# Opt-in publishing of the primary experiment (`experiment`, or a sweep's first point); never
# part of `all`:  snakemake --cores 1 push_to_hub --config 'hub={repo_id: me/model}'


rule push_to_hub:
    input:
        deployment_dir=res("deployment_model"),
        base=f"{PRIMARY.base_eval}/base_model_evaluation.json",
        finetuned=res("evaluation/finetuned_model_evaluation.json"),
        comparison=res("evaluation/comparison.json"),
    output:
        report=res("hub/push_report.json"),
    params:
        hub=config["hub"],
    log:
        primary_log_of("push_to_hub"),
    benchmark:
        primary_bench_of("push_to_hub")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/models/push_to_hub.py"
