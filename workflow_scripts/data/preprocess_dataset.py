"""Stage 2: map columns into chat `messages` with the seed's templates, filter, count the drops.

Streams: each split is read, filtered and written (zstd parquet: `messages` as role/content
structs, `meta` as a JSON object) a batch at a time. Duplicate prompts are found by 128-bit
digests of the normalised prompt (16 bytes a train row), train first, so validation and test
rows that repeat a training prompt are dropped (``duplicate_of_train``)."""

import contextlib
import json
import logging
import math
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.checks import check_messages_format
from workflow_scripts.data.streams import DigestSet, ParquetSink, Progress, batches_of, digest
from workflow_scripts.data.templates import render_template
from workflow_scripts.errors import ConfigError
from workflow_scripts.files import write_json
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.preprocess_dataset")

SPLITS = ("train", "validation", "test")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def check_columns(columns: list[str], split: str, mf: dict) -> None:
    wanted = [(f"messages_format.training_columns.{k}", c) for k, c in mf["training_columns"].items()]
    wanted += [(f"messages_format.metadata_columns[{i}]", c) for i, c in enumerate(mf["metadata_columns"])]
    if split == "test":
        wanted += [(f"messages_format.evaluate_columns.{k}", c) for k, c in mf["evaluate_columns"].items()]
    for key, column in wanted:
        if column not in columns:
            raise StageError(
                f"{key}: column {column!r} is not in the {split} data; its columns are {columns}"
            )


def check_templates(mf: dict, filters: dict) -> None:
    try:
        check_messages_format(mf, filters)
    except ConfigError as exc:
        raise StageError(str(exc)) from None


def build_messages(templates: list[dict], values: dict[str, str]) -> list[dict]:
    return [{"role": m["role"], "content": render_template(m["content"], values)} for m in templates]


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMAS = {
    "train": pa.schema([("messages", MESSAGES), ("meta", pa.string())]),
    "test": pa.schema(
        [
            ("messages", MESSAGES),
            ("query", pa.string()),
            ("reference", pa.string()),
            ("target", pa.string()),
            ("meta", pa.string()),
        ]
    ),
}
SCHEMAS["validation"] = SCHEMAS["train"]


class Preprocessor:
    """One split's rows -> messages, batch by batch: filters, then deduplication by digest.

    A row's prompt key is its normalised user messages. ``seen`` holds the digests of the kept
    rows (a later row with the same key is ``duplicate_prompt``); ``train_prompts``, the train
    split's, marks validation/test rows that leak a training prompt (``duplicate_of_train``)."""

    def __init__(self, split: str, mf: dict, filters: dict, train_prompts: DigestSet | None = None):
        self.split, self.mf, self.filters, self.train_prompts = split, mf, filters, train_prompts
        self.templates = mf["messages_format"]["messages"]
        self.system_prompt = mf["messages_format"]["system_prompt"] or ""
        self.answer_re = re.compile(filters["answer_regex"]) if filters["answer_regex"] else None
        self.seen = DigestSet()
        self.dropped: Counter = Counter()
        self.rows_in = self.rows_kept = 0

    def _reason(self, values: dict, reference: str) -> str | None:
        filters = self.filters
        reason = None
        if filters["drop_empty"]:
            reason = next((f"empty:{n}" for n, v in values.items() if not v.strip()), None)
        for name, limit in (filters["min_chars"] or {}).items():
            reason = reason or (f"too_short:{name}" if len(values[name]) < limit else None)
        for name, limit in (filters["max_chars"] or {}).items():
            reason = reason or (f"too_long:{name}" if len(values[name]) > limit else None)
        if not reason and self.answer_re is not None and not self.answer_re.search(reference):
            reason = "answer_regex"
        return reason

    def batch(self, records: list[dict]) -> list[dict]:
        """The kept rows of a batch, in order; drops counted by reason."""
        mf, dedup = self.mf, self.filters["deduplicate_prompts"]
        ref_col = mf["evaluate_columns"]["response"]
        candidates = []  # (record, messages, reference, digest) of rows past the filters
        for record in records:
            values = {name: _text(record[col]) for name, col in mf["training_columns"].items()}
            reference = _text(record.get(ref_col)) if ref_col in record else ""
            reason = self._reason(values, reference)
            if reason:
                self.dropped[reason] += 1
                continue
            values["system_prompt"] = self.system_prompt
            messages = build_messages(self.templates, values)
            key = normalise("\n".join(m["content"] for m in messages if m["role"] == "user"))
            candidates.append((record, messages, reference, digest(key) if dedup else None))
        digests = [c[3] for c in candidates]
        in_seen = self.seen.contains(digests) if dedup else [False] * len(candidates)
        in_train = (
            self.train_prompts.contains(digests)
            if dedup and self.train_prompts is not None
            else [False] * len(candidates)
        )
        kept, kept_here = [], set()  # kept_here: this batch's kept digests, not yet in `seen`
        for (record, messages, reference, key), seen_before, leaked in zip(
            candidates, in_seen, in_train, strict=True
        ):
            if dedup and (seen_before or key in kept_here):
                self.dropped["duplicate_prompt"] += 1
                continue
            if dedup and leaked:
                self.dropped["duplicate_of_train"] += 1
                continue
            kept_here.add(key)
            kept.append(self._row(record, messages, reference))
        self.seen.add([k for k in kept_here if k is not None])
        self.rows_in += len(records)
        self.rows_kept += len(kept)
        return kept

    def _row(self, record: dict, messages: list[dict], reference: str) -> dict:
        meta = json.dumps({c: _text(record[c]) for c in self.mf["metadata_columns"]})
        if self.split != "test":
            return {"messages": messages, "meta": meta}
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {
            "messages": messages[:last_assistant],
            "query": _text(record[self.mf["evaluate_columns"]["query"]]),
            "reference": reference,
            "target": messages[last_assistant]["content"],
            "meta": meta,
        }

    def report(self) -> dict:
        if not self.rows_kept:
            raise StageError(
                f"preprocess_dataset: every row of the {self.split} split was filtered out "
                f"(reasons: {dict(self.dropped)}); check the `filters` section and the column mapping"
            )
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "dropped": dict(sorted(self.dropped.items())),
        }


def run(job: Job) -> dict:
    mf, filters = job.params.messages_format, job.params.filters
    check_templates(mf, filters)
    for s in SPLITS:  # every check before any output is written
        check_columns(pq.ParquetFile(job.input[s]).schema_arrow.names, s, mf)
    report, train_prompts = {}, None
    with contextlib.ExitStack() as outputs:  # every split kept, or none (an error in test keeps no train)
        for s in SPLITS:  # train first: validation and test are checked against its prompts
            step = Preprocessor(s, mf, filters, train_prompts)
            progress = Progress(f"preprocess_dataset: {s}")
            sink = outputs.enter_context(ParquetSink(job.output[s], SCHEMAS[s]))
            for records in batches_of(job.input[s]):
                sink.write(step.batch(records))
                progress.update(len(records))
            report[s] = step.report()
            progress.done()
            if s == "train":
                train_prompts = step.seen
            log.info(
                "%s: kept %d of %d rows, dropped %s", s, step.rows_kept, step.rows_in, report[s]["dropped"]
            )
    write_json(job.output.report, report)
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
