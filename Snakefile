# snaketune: LoRA fine-tuning of a language model as a Snakemake workflow.
# `snakemake -n` shows the plan; any artifact can be built alone (`snakemake <path>`, or
# `snakemake --until <rule>` for a stage and what it needs).
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)  # workflow_scripts, also without `pip install -e .`
from workflow_scripts import layout  # noqa: E402
from workflow_scripts.config import resolve  # noqa: E402
from workflow_scripts.errors import ConfigError  # noqa: E402
from workflow_scripts.sweeps import plan, points  # noqa: E402


configfile: "config.yaml"


report: "rules/report/workflow.rst"


try:
    resolve(config, workflow.basedir, validate, user=workflow.config_settings.overwrite_config)
    EXPERIMENT_LIST = points.expand(config)  # one, or one per sweep point, each validated
    # Successive halving: the points train in rungs (rules/halving.smk); the finalists are the
    # experiments that are merged and evaluated.
    HALVING = plan.halving(config, EXPERIMENT_LIST)
    if HALVING:
        EXPERIMENT_LIST = list(HALVING.finalists)
except ConfigError as exc:
    raise WorkflowError(f"Invalid configuration: {exc}") from None


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
