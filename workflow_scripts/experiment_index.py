"""experiment.json: where every artifact of one experiment lives (its own and the shared ones),
with its resolved config, so one file answers "what went into this result"."""

from workflow_scripts.common import snakemake_main, write_json


def run(artifacts: dict, index_path: str) -> None:
    write_json(index_path, artifacts)


def _from_snakemake(smk) -> None:
    run(dict(smk.params.artifacts), smk.output.index)


if "snakemake" in globals():
    snakemake_main(snakemake, _from_snakemake)
