# The data stages: download -> preprocess (messages + filters) -> format (chat template).


rule download_dataset:
    input:
        local_dataset_input,
    output:
        train=res("dataset/raw/train.parquet"),
        validation=res("dataset/raw/validation.parquet"),
        test=res("dataset/raw/test.parquet"),
        sources=res("dataset/raw/sources.json"),
    params:
        dataset=config["dataset"],
    log:
        log_of("download_dataset"),
    benchmark:
        bench_of("download_dataset")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/download_dataset.py"


rule preprocess_dataset:
    input:
        train=rules.download_dataset.output.train,
        validation=rules.download_dataset.output.validation,
        test=rules.download_dataset.output.test,
    output:
        train=res("dataset/preprocessed/train.jsonl"),
        validation=res("dataset/preprocessed/validation.jsonl"),
        test=res("dataset/preprocessed/test.jsonl"),
        report=res("dataset/preprocessed/report.json"),
    params:
        messages_format=config["messages_format"],
        filters=config["filters"],
    log:
        log_of("preprocess_dataset"),
    benchmark:
        bench_of("preprocess_dataset")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/preprocess_dataset.py"


rule format_dataset:
    input:
        train=rules.preprocess_dataset.output.train,
        validation=rules.preprocess_dataset.output.validation,
        test=rules.preprocess_dataset.output.test,
        model_dir=BASE_MODEL_DIR,
    output:
        train=res("dataset/formatted/train.parquet"),
        validation=res("dataset/formatted/validation.parquet"),
        test=res("dataset/formatted/test.parquet"),
        stats=res("dataset/formatted/stats.json"),
    params:
        format=training_format_params(),
    log:
        log_of("format_dataset"),
    benchmark:
        bench_of("format_dataset")
    threads: 1
    resources:
        **resources_for("data"),
    conda:
        ENV
    script:
        "../workflow_scripts/data/format_dataset.py"



