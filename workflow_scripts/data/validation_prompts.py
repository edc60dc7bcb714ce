"""The validation split as evaluation prompts (for choosing a sweep's winner by a generation metric).

Each formatted validation conversation becomes a prompt (its rendered prompt text) and a
reference (the assistant message it was trained to produce), in the columns evaluate_model
reads from the test split. Only sweeps with `select_by: {metric: ..., split: validation}` build it.
"""

import json
import logging

from workflow_scripts.data.formatting import TEST_SCHEMA
from workflow_scripts.data.streams import ParquetSink, batches_of
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.validation_prompts")


def as_prompt(rec: dict) -> dict:
    messages = json.loads(rec["messages"])
    return {
        "messages": json.dumps(messages[:-1], ensure_ascii=False),
        "prompt_text": rec["prompt_text"],
        "prompt_length": rec["prompt_length"],
        "query": "",
        "reference": messages[-1]["content"],
        "target": messages[-1]["content"],
        "meta": rec.get("meta") or "{}",
    }


def run(job: Job) -> int:
    validation_path, output_path = job.input.validation, job.output.prompts
    with ParquetSink(output_path, TEST_SCHEMA) as sink:  # batch by batch, like the test split
        for records in batches_of(validation_path):
            sink.write([as_prompt(rec) for rec in records])
        if not sink.rows:
            raise StageError(f"validation_prompts: {validation_path} has no rows; nothing to select by")
    log.info("%d validation prompts", sink.rows)
    return sink.rows


if "snakemake" in globals():
    snakemake_main(snakemake, run)
