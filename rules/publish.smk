# Opt-in targets, never part of `all`: on the experiment, or after a sweep on the winner in its
# best.json or the point `sweep.act_on` names (workflow_scripts/sweeps/winner.py picks it at run time;
# their paths and inputs: rules/common.smk):
#   snakemake --cores 2 export_gguf                                   (after `make setup-export`)
#   snakemake --cores 1 push_to_hub --config 'hub={repo_id: me/model}'
EXPORT_NAME = export_name()


rule export_gguf:
    input:
        unpack(publish_input(exportable_inputs)),
    output:
        gguf=[pub(f"export/{EXPORT_NAME}-{t}.gguf") for t in PRIMARY.config["export"]["outtypes"]],
        report=pub("export/export_report.json"),
        modelfile=pub("export/Modelfile"),
    params:
        export=PRIMARY.config["export"],
        name=EXPORT_NAME,
        **publish_params(export_inputs),
    log:
        pub("logs/export_gguf.log"),
    benchmark:
        pub("benchmarks/export_gguf.tsv")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model"),
    conda:
        "../envs/export.yaml"
    script:
        "../workflow_scripts/models/export_gguf.py"


rule push_to_hub:
    input:
        unpack(publish_input(push_inputs)),
    output:
        report=pub("hub/push_report.json"),
        card=pub("hub/README.md"),
    params:
        hub=PRIMARY.config["hub"],
        # GGUF files are uploaded when export_gguf has run for this deployment model (checked by
        # the weights' hash in its report); exporting stays opt-in.
        export_report=rules.export_gguf.output.report,
        **publish_params(push_inputs, push_settings),
    log:
        pub("logs/push_to_hub.log"),
    benchmark:
        pub("benchmarks/push_to_hub.tsv")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/models/push_to_hub.py"
