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
