"""The validation split as evaluation prompts (for choosing a sweep's winner by a generation metric).

Each formatted validation conversation becomes a prompt (its rendered prompt text) and a
reference (the assistant message it was trained to produce), in the columns evaluate_model
reads from the test split. Only sweeps with `select_by: {metric: ..., split: validation}` build it.
"""

import json
import logging

import pandas as pd

from workflow_scripts.files import write_parquet
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.validation_prompts")


def run(job: Job) -> int:
    validation_path, output_path = job.input.validation, job.output.prompts
    frame = pd.read_parquet(validation_path)
    if frame.empty:
        raise StageError(f"validation_prompts: {validation_path} has no rows; nothing to select by")
    rows = []
    for rec in frame.to_dict("records"):
        messages = json.loads(rec["messages"])
        rows.append(
            {
                "messages": json.dumps(messages[:-1], ensure_ascii=False),
                "prompt_text": rec["prompt_text"],
                "prompt_length": rec["prompt_length"],
                "query": "",
                "reference": messages[-1]["content"],
                "target": messages[-1]["content"],
                "meta": rec.get("meta") or "{}",
            }
        )
    write_parquet(output_path, rows)
    log.info("%d validation prompts", len(rows))
    return len(rows)


if "snakemake" in globals():
    snakemake_main(snakemake, run)
