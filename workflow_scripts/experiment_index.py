"""experiment.json: where every artifact of one experiment lives (its own and the shared ones),
with its resolved config, so one file answers "what went into this result"."""

from workflow_scripts.files import write_json
from workflow_scripts.stage import Job, snakemake_main


def run(job: Job) -> None:
    write_json(job.output.index, dict(job.params.artifacts))


if "snakemake" in globals():
    snakemake_main(snakemake, run)
