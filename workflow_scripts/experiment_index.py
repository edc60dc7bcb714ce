"""experiment.json: where every artifact of one experiment lives (its own and the shared ones),
with its resolved config, so one file answers "what went into this result".

A halving sweep's finalist is an experiment of the sweep's base config whose point is chosen at run
time: its training record names the point, and its training and peft sections are that point's."""

import copy
import json
from pathlib import Path

from workflow_scripts.files import write_json
from workflow_scripts.stage import Job, snakemake_main


def run(job: Job) -> None:
    index = copy.deepcopy(dict(job.params.artifacts))
    run_info = json.loads(Path(job.input.run_info).read_text())
    if "point" in run_info:
        index["point"] = run_info["point"]
        index["own"]["checkpoints"] = run_info["checkpoint_dir"]  # the point's, shared by its rungs
        for section in ("training", "peft"):
            index["config"][section] = run_info["resolved_config"][section]
    write_json(job.output.index, index)


if "snakemake" in globals():
    snakemake_main(snakemake, run)
