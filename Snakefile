# snaketune: LoRA fine-tuning of a language model as a Snakemake workflow.
# `snakemake -n` shows the plan; any artifact can be built alone (`snakemake <path>`, or
# `snakemake --until <rule>` for a stage and what it needs).
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)  # workflow_scripts, also without `pip install -e .`
from workflow_scripts import cluster, layout  # noqa: E402
from workflow_scripts.config import resolve  # noqa: E402
from workflow_scripts.errors import ConfigError  # noqa: E402
from workflow_scripts.sweeps import plan, points  # noqa: E402


configfile: "config.yaml"


report: "rules/report/workflow.rst"


try:
    resolve(config, workflow.basedir, validate, user=workflow.config_settings.overwrite_config)
    EXPERIMENT_LIST = points.expand(config)  # one, or one per sweep point, each validated
    # Nodes of one training (workflow_scripts/cluster.py): the same for every point; > 1 needs SLURM.
    NODES = cluster.sweep_nodes(EXPERIMENT_LIST)
    cluster.check_nodes(NODES, config["resources"].get("slurm_partition"))
    # Successive halving: the points train in rungs (rules/halving.smk); the finalists are the
    # experiments that are merged and evaluated.
    HALVING = plan.halving(config, EXPERIMENT_LIST)
    if HALVING:
        EXPERIMENT_LIST = list(HALVING.finalists)
except ConfigError as exc:
    raise WorkflowError(f"Invalid configuration: {exc}") from None


onstart:
    # Several nodes train only as a SLURM job: refused before the first job of any other executor.
    if NODES > 1 and "slurm" not in workflow.executor_plugin.name:
        raise WorkflowError(
            f"Invalid configuration: training.nodes: {NODES} nodes need SLURM: run with the SLURM executor "
            f"(--profile profiles/slurm); this run uses {workflow.executor_plugin.name!r}"
        )


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/halving.smk"
include: "rules/general.smk"
include: "rules/evaluate.smk"
include: "rules/publish.smk"
include: "rules/sweep.smk"


rule all:
    default_target: True
    input:
        ALL_TARGETS,
