# Opt-in targets on the primary experiment (`experiment`, or a sweep's first point); never part
# of `all`:
#   snakemake --cores 2 export_gguf                                   (after `make setup-export`)
#   snakemake --cores 1 push_to_hub --config 'hub={repo_id: me/model}'
from pathlib import PurePosixPath

from workflow_scripts.experiments import model_name

# The GGUF files' stem: `export.name`, else {model name}-{experiment}.
EXPORT_NAME = (
    PRIMARY.config["export"]["name"]
    or f"{model_name(PRIMARY.config['model'])}-{PurePosixPath(PRIMARY.name).name}"
)


rule export_gguf:
    input:
        deployment_dir=res("deployment_model"),
        test=f"{PRIMARY.formatted}/test.parquet",
    output:
        gguf=[res(f"export/{EXPORT_NAME}-{t}.gguf") for t in PRIMARY.config["export"]["outtypes"]],
        report=res("export/export_report.json"),
        modelfile=res("export/Modelfile"),
    params:
        export=PRIMARY.config["export"],
        name=EXPORT_NAME,
    log:
        primary_log_of("export_gguf"),
    benchmark:
        primary_bench_of("export_gguf")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model"),
    conda:
        "../envs/export.yaml"
    script:
        "../workflow_scripts/models/export_gguf.py"


rule push_to_hub:
    input:
        deployment_dir=res("deployment_model"),
        base_model_dir=PRIMARY.base_model,
        base=f"{PRIMARY.base_eval}/base_model_evaluation.json",
        finetuned=res("evaluation/finetuned_model_evaluation.json"),
        comparison=res("evaluation/comparison.json"),
    output:
        report=res("hub/push_report.json"),
        card=res("hub/README.md"),
    params:
        hub=config["hub"],
        dataset=PRIMARY.config["dataset"],
        # GGUF files are uploaded when export_gguf has run for this deployment model (checked by
        # the weights' hash in its report); exporting stays opt-in.
        export_report=res("export/export_report.json"),
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
