# General ability: what fine-tuning cost outside its task. The base model is measured once per
# distinct base model and general_ability settings (shared, like eval_base), each deployment model
# once per experiment; compare pairs the two item by item (workflow_scripts/evaluation/general_*.py).

rule general_base:
    input:
        model_dir=lambda w: GENERAL_BASES[w.general_base].base_model,
        task_files=lambda w: general_task_files(GENERAL_BASES[w.general_base]),
    output:
        result=f"{SHARED}/general_base/{{general_base}}/general_ability.json",
        item_results=f"{SHARED}/general_base/{{general_base}}/general_items.jsonl",
    params:
        general=lambda w: general_settings(GENERAL_BASES[w.general_base].config),
        label="base",
    log:
        log_of("general_base", "general_base"),
    benchmark:
        bench_of("general_base", "general_base")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/evaluation/general_ability.py"


rule general_finetuned:
    input:
        model_dir=rules.merge.output.deployment_dir,
        task_files=lambda w: general_task_files(exp(w)),
    output:
        result=exp_path("evaluation/general_ability.json"),
        item_results=exp_path("evaluation/general_items.jsonl"),
    params:
        general=lambda w: general_settings(exp(w).config),
        label="finetuned",
    log:
        log_of("general_finetuned"),
    benchmark:
        bench_of("general_finetuned")
    threads: config["resources"]["threads"]
    resources:
        **resources_for("model", gpu=True),
    conda:
        ENV
    script:
        "../workflow_scripts/evaluation/general_ability.py"
