"""Stage 3: render conversations with the base model's chat template and tokenize them.

The prompt is rendered with ``add_generation_prompt=True`` and the completion is the rest
of the rendered conversation, so the tokens a model is trained on after the prompt are
exactly the tokens it must generate at evaluation (which reads the same ``prompt_text``).
``input_ids = prompt_ids + completion_ids`` (int32); the loss covers ``input_ids[prompt_length:]``
(the collator makes the labels).

Streams: each split is read a batch at a time; each batch is rendered (each chat once, its
prompt once) and tokenized in one batched call, by ``threads`` worker processes (formatting.py).
Batches are written in order as they come back: the split's parquet (for people and evaluation)
and, for train/validation, the token file training memory-maps (tokens.py). Token-length
statistics are kept as counts, exact at any size.
"""

import contextlib
import json
import logging
from collections import deque
from pathlib import Path

import pyarrow.parquet as pq

from workflow_scripts.data import formatting
from workflow_scripts.data.formatting import TEST_SCHEMA, TRAIN_SCHEMA, Workers
from workflow_scripts.data.streams import LengthCounts, ParquetSink, Progress, batches_of
from workflow_scripts.data.tokens import TokensWriter
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.format_dataset")


def format_split(workers: Workers, split: str, job: Job, fmt: dict, outputs: contextlib.ExitStack) -> dict:
    """Format one split into its outputs (kept when ``outputs`` closes without an error); its statistics."""
    lengths, rows_in = LengthCounts(), 0
    counts = dict.fromkeys(("over_max_length", "dropped", "truncated"), 0)
    progress = Progress(f"format_dataset: {split}")
    schema = TEST_SCHEMA if split == "test" else TRAIN_SCHEMA
    tokens_path = job.output.get(f"{split}_tokens")
    sink = outputs.enter_context(ParquetSink(job.output[split], schema))
    tokens = None
    if tokens_path:
        tokens = TokensWriter(outputs.enter_context(atomic_path(tokens_path)))
        outputs.callback(tokens.close)  # closed before its atomic rename (callbacks run last-in first)
    for rows, (batch, batch_lengths, batch_counts) in _paired(
        batches_of(job.input[split]), lambda rows: workers.map((split, r) for r in rows)
    ):
        rows_in += rows
        sink.write(batch)
        lengths.add(batch_lengths)
        for k, v in batch_counts.items():
            counts[k] += v
        if tokens:
            tokens.write(batch.column("input_ids"), batch.column("prompt_length"))
        progress.update(rows)
    if split == "test":
        if not rows_in:
            raise StageError(f"format_dataset: the test split {job.input.test} is empty")
        stats = {"rows": sink.rows, "prompt_tokens": lengths.summary()}
    else:
        stats = {**counts, "tokens": lengths.summary(), "rows": sink.rows}
        if not sink.rows:
            raise StageError(
                f"training.max_length: all {rows_in} {split} rows are longer than {fmt['max_length']} "
                f"tokens ({stats['tokens']}); raise training.max_length or set training.overlength: truncate"
            )
    progress.done()
    return stats


def _paired(batches, mapper):
    """(rows in the batch, the mapper's result for it), batches read lazily as the mapper asks."""
    sizes = deque()

    def counted():
        for rows in batches:
            sizes.append(len(rows))
            yield rows

    for result in mapper(counted()):
        yield sizes.popleft(), result


def run(job: Job) -> dict:
    fmt, model_dir = job.params.format, str(job.input.model_dir)
    manifest_path = Path(model_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    stats = {"max_length": fmt["max_length"], "overlength": fmt["overlength"]}
    stats["chat_template"] = manifest.get("chat_template", "model")
    if fmt.get("chat_template_kwargs"):  # the template's options: chat and export render with them too
        stats["chat_template_kwargs"] = fmt["chat_template_kwargs"]
    probe = next(batches_of(job.input.train, rows=formatting.PROBE_ROWS), [])
    rows = sum(pq.ParquetFile(job.input[s]).metadata.num_rows for s in ("train", "validation", "test"))
    workers = Workers(max(1, int(job.threads)), model_dir, fmt, probe, rows)
    log.info("format_dataset: %s", workers.mode)
    try:
        with contextlib.ExitStack() as outputs:  # every output kept, or none
            for split in ("train", "validation", "test"):
                stats[split] = format_split(workers, split, job, fmt, outputs)
    finally:
        workers.close()
    write_json(job.output.stats, stats)
    log.info("formatted: %s", {s: stats[s]["rows"] for s in ("train", "validation", "test")})
    return stats


if "snakemake" in globals():
    snakemake_main(snakemake, run)
