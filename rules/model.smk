# The model stages: prepare_base_model (shared across experiments) -> train -> merge.


rule prepare_base_model:
    output:
        model_dir=directory(BASE_MODEL_DIR),
    params:
        model=config["model"],
    log:
        f"{BASE_MODEL_DIR}.log",
    benchmark:
        f"{BASE_MODEL_DIR}.benchmark.tsv"
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model"),
    conda:
        ENV
    script:
        "../workflow_scripts/models/prepare_base_model.py"


rule train:
    input:
        train=rules.format_dataset.output.train,
        validation=rules.format_dataset.output.validation,
        model_dir=rules.prepare_base_model.output.model_dir,
    output:
        adapter_dir=directory(res("model")),
        metrics=res("training/metrics.csv"),
        loss_plot=report(res("training/loss.png"), category="Training"),
        run_info=res("training/run.json"),
    params:
        training=config["training"],
        peft=config["peft"],
        wandb=config["wandb"],
        experiment=EXPERIMENT,
        # > 1 launches one training process per GPU (accelerate launch)
        gpus=config["resources"]["gpu"],
        # Outside the outputs: Snakemake must not delete them when a run dies (resume reads them).
        checkpoint_dir=res("checkpoints"),
    log:
        log_of("train"),
    benchmark:
        bench_of("train")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("train", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/training/train.py"


rule merge:
    input:
        model_dir=rules.prepare_base_model.output.model_dir,
        adapter_dir=rules.train.output.adapter_dir,
        run_info=rules.train.output.run_info,
        test=rules.format_dataset.output.test,
    output:
        deployment_dir=directory(res("deployment_model")),
    log:
        log_of("merge"),
    benchmark:
        bench_of("merge")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/models/merge.py"
