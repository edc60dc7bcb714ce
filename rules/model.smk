# The model stages: prepare_base_model (shared by every experiment on that model) -> train -> merge.


rule prepare_base_model:
    output:
        model_dir=directory("models/{model}"),
    params:
        model=setting("model", BASE_MODELS, "model"),
    log:
        log_of("prepare_base_model", "model"),
    benchmark:
        bench_of("prepare_base_model", "model")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model"),
    conda:
        ENV
    script:
        "../workflow_scripts/models/prepare_base_model.py"


rule train:
    input:
        # the memory-mapped token files (workflow_scripts/data/tokens.py)
        train=tokens_of("train"),
        validation=tokens_of("validation"),
        model_dir=base_model_of,
    output:
        **train_outputs(),
    params:
        training=setting("training"),
        peft=setting("peft"),
        wandb=setting("wandb"),
        experiment=lambda w: w.experiment,
        # > 1 launches one training process per GPU (accelerate launch)
        gpus=config["resources"]["gpu"],
        checkpoint_dir=checkpoints_of("experiment"),
    log:
        log_of("train"),
    benchmark:
        bench_of("train")
    wildcard_constraints:
        experiment=TRAINED_BY_TRAIN,
    threads: config["resources"]["threads"]
    resources:
        **train_resources(),
    conda:
        ENV
    script:
        "../workflow_scripts/training/train.py"


rule merge:
    input:
        model_dir=base_model_of,
        adapter_dir=rules.train.output.adapter_dir,
        run_info=rules.train.output.run_info,
        test=formatted_of("test"),
    output:
        deployment_dir=directory(exp_path("deployment_model")),
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
