# Opt-in publishing; never part of `all`:  snakemake --cores 1 push_to_hub --config hub.repo_id=me/model


rule push_to_hub:
    input:
        deployment_dir=rules.merge.output.deployment_dir,
        base=rules.eval_base.output.evaluation,
        finetuned=rules.eval_finetuned.output.evaluation,
        comparison=rules.compare.output.comparison,
    output:
        report=res("hub/push_report.json"),
    params:
        hub=config["hub"],
    log:
        log_of("push_to_hub"),
    benchmark:
        bench_of("push_to_hub")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/models/push_to_hub.py"
