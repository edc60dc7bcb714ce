# The data stages: download -> preprocess (messages + filters) -> format (chat template).
# Shared: one job per distinct dataset / messages format / base model, whatever the experiments.


rule download_dataset:
    input:
        local_dataset_input,
    output:
        train=f"{SHARED}/data/{{data}}/train.parquet",
        validation=f"{SHARED}/data/{{data}}/validation.parquet",
        test=f"{SHARED}/data/{{data}}/test.parquet",
        sources=f"{SHARED}/data/{{data}}/sources.json",
    params:
        dataset=setting("dataset", DATA, "data"),
    log:
        log_of("download_dataset", "data"),
    benchmark:
        bench_of("download_dataset", "data")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/download_dataset.py"


rule preprocess_dataset:
    input:
        train=raw_of("train"),
        validation=raw_of("validation"),
        test=raw_of("test"),
    output:
        train=f"{SHARED}/preprocessed/{{prep}}/train.parquet",
        validation=f"{SHARED}/preprocessed/{{prep}}/validation.parquet",
        test=f"{SHARED}/preprocessed/{{prep}}/test.parquet",
        report=f"{SHARED}/preprocessed/{{prep}}/report.json",
    params:
        messages_format=setting("messages_format", PREPROCESSED, "prep"),
        filters=setting("filters", PREPROCESSED, "prep"),
    log:
        log_of("preprocess_dataset", "prep"),
    benchmark:
        bench_of("preprocess_dataset", "prep")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/preprocess_dataset.py"


rule format_dataset:
    input:
        train=preprocessed_of("train"),
        validation=preprocessed_of("validation"),
        test=preprocessed_of("test"),
        model_dir=lambda w: FORMATTED[w.fmt].base_model,
    output:
        train=f"{SHARED}/formatted/{{fmt}}/train.parquet",
        validation=f"{SHARED}/formatted/{{fmt}}/validation.parquet",
        test=f"{SHARED}/formatted/{{fmt}}/test.parquet",
        # what training memory-maps (workflow_scripts/data/tokens.py)
        train_tokens=f"{SHARED}/formatted/{{fmt}}/train.tokens.arrow",
        validation_tokens=f"{SHARED}/formatted/{{fmt}}/validation.tokens.arrow",
        stats=f"{SHARED}/formatted/{{fmt}}/stats.json",
    params:
        format=format_params,
    log:
        log_of("format_dataset", "fmt"),
    benchmark:
        bench_of("format_dataset", "fmt")
    # worker processes rendering and tokenizing batches (one each; workflow_scripts/data/formatting.py)
    threads: config["resources"]["threads"]
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/format_dataset.py"


rule validation_prompts:
    input:
        validation=f"{SHARED}/formatted/{{fmt}}/validation.parquet",
    output:
        prompts=f"{SHARED}/formatted/{{fmt}}/validation_prompts.parquet",
    log:
        log_of("validation_prompts", "fmt"),
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/validation_prompts.py"
