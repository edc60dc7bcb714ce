# Successive halving (sweep.strategy: halving), a static DAG: every point trains to the first rung
# (train_rung0), `promote` ranks a rung on validation loss and names the points that fill the next
# rung's slots, each slot continues its point from that point's own checkpoint (train_rung), and the
# last rung's slots are the finalists: experiments that train_finalist finishes and the usual stages
# merge and evaluate. How many slots each rung has is fixed by the config, so `snakemake -n` shows
# every job before anything runs; which point a slot holds is read from the promotion at run time.
# The plan, its files and each rung job's parameters: workflow_scripts/sweeps/plan.py.

if HALVING:
    HALVING_POINTS = Registry("sweep point", ((p.name, p) for p in HALVING.points))
    # Every point of a halving sweep shares the data and base model (plan.check_halving).
    HALVING_DATA = HALVING.finalists[0]

    rule train_rung0:
        input:
            # the memory-mapped token files (workflow_scripts/data/tokens.py)
            train=f"{HALVING_DATA.formatted}/train.tokens.arrow",
            validation=f"{HALVING_DATA.formatted}/validation.tokens.arrow",
            model_dir=HALVING_DATA.base_model,
        output:
            record=HALVING.RUNG0_RECORD,
        params:
            halving=rung_job("rung0"),
            training=setting("training", HALVING_POINTS, "point"),
            peft=setting("peft", HALVING_POINTS, "point"),
            wandb=setting("wandb", HALVING_POINTS, "point"),
            experiment=lambda w: w.point,
            gpus=config["resources"]["gpu"],
            checkpoint_dir=checkpoints_of("point"),
        log:
            layout.experiment_path("{point}", "logs/train_rung0.log"),
        benchmark:
            layout.experiment_path("{point}", "benchmarks/train_rung0.tsv")
        wildcard_constraints:
            point=experiment_name_re(config),
        threads: config["resources"]["threads"]
        resources:
            **train_resources(),
        conda:
            ENV
        script:
            "../workflow_scripts/training/train.py"

    rule promote:
        input:
            records=lambda w: HALVING.records_of(w.rung),
            previous=lambda w: HALVING.checked_against(w.rung),
        output:
            promotion=HALVING.promotion_file,
        params:
            rung=lambda w: int(w.rung),
            keep=lambda w: HALVING.kept_after(w.rung),
            points=[p.name for p in HALVING.points],
        log:
            f"{HALVING.folder}/logs/promote-{{rung}}.log",
        wildcard_constraints:
            rung=r"\d+",
        threads: 1
        resources:
            **resources_for("data"),
        conda:
            ENV
        script:
            "../workflow_scripts/sweeps/promote.py"

    rule train_rung:
        input:
            train=rules.train_rung0.input.train,
            validation=rules.train_rung0.input.validation,
            model_dir=rules.train_rung0.input.model_dir,
            promotion=lambda w: HALVING.filled_by(w.rung),
        output:
            record=HALVING.slot_record,
        params:
            halving=rung_job("slot"),
            # the point's training/peft and checkpoint folder come from its record (the promotion names it)
            training=None,
            peft=None,
            wandb=HALVING_DATA.config["wandb"],  # not sweepable: every point's
            experiment=None,
            gpus=config["resources"]["gpu"],
            checkpoint_dir=None,
        log:
            f"{HALVING.folder}/logs/{layout.SLOT_JOB}.log",
        benchmark:
            f"{HALVING.folder}/benchmarks/{layout.SLOT_JOB}.tsv"
        wildcard_constraints:
            rung=r"\d+",
            slot=r"\d+",
        threads: config["resources"]["threads"]
        resources:
            **train_resources(),
        conda:
            ENV
        script:
            "../workflow_scripts/training/train.py"

    rule train_finalist:
        input:
            train=rules.train_rung0.input.train,
            validation=rules.train_rung0.input.validation,
            model_dir=rules.train_rung0.input.model_dir,
            promotion=HALVING.final_promotion,
        output:
            **train_outputs(),
        params:
            halving=rung_job("finalist"),
            training=None,
            peft=None,
            wandb=setting("wandb"),
            experiment=lambda w: w.experiment,
            gpus=config["resources"]["gpu"],
            checkpoint_dir=None,
        log:
            log_of("train"),
        benchmark:
            bench_of("train")
        wildcard_constraints:
            experiment=HALVING.finalist_re,
        threads: config["resources"]["threads"]
        resources:
            **train_resources(),
        conda:
            ENV
        script:
            "../workflow_scripts/training/train.py"
