"""Stage 2: map columns into chat `messages` with the seed's templates, filter, count the drops."""

import logging
import math
import re
from collections import Counter

import pandas as pd

from workflow_scripts.config import ConfigError, check_messages_format
from workflow_scripts.data.templates import render_template
from workflow_scripts.files import write_json, write_jsonl
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.preprocess_dataset")

SPLITS = ("train", "validation", "test")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def check_columns(frame: pd.DataFrame, split: str, mf: dict) -> None:
    columns = list(frame.columns)
    wanted = [(f"messages_format.training_columns.{k}", c) for k, c in mf["training_columns"].items()]
    wanted += [(f"messages_format.metadata_columns[{i}]", c) for i, c in enumerate(mf["metadata_columns"])]
    if split == "test":
        wanted += [(f"messages_format.evaluate_columns.{k}", c) for k, c in mf["evaluate_columns"].items()]
    for key, column in wanted:
        if column not in frame.columns:
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


def preprocess_split(
    frame: pd.DataFrame,
    split: str,
    mf: dict,
    filters: dict,
    seen_train_prompts: set[str] | None = None,
) -> tuple[list[dict], dict, set[str]]:
    """(rows kept, report of the drops by reason, normalised user prompts kept)."""
    templates = mf["messages_format"]["messages"]
    system_prompt = mf["messages_format"]["system_prompt"] or ""
    answer_re = re.compile(filters["answer_regex"]) if filters["answer_regex"] else None
    ref_col = mf["evaluate_columns"]["response"]
    dropped: Counter = Counter()
    seen: set[str] = set()
    rows = []
    for record in frame.to_dict("records"):
        values = {name: _text(record[col]) for name, col in mf["training_columns"].items()}
        reason = None
        if filters["drop_empty"]:
            reason = next((f"empty:{n}" for n, v in values.items() if not v.strip()), None)
        for name, limit in (filters["min_chars"] or {}).items():
            reason = reason or (f"too_short:{name}" if len(values[name]) < limit else None)
        for name, limit in (filters["max_chars"] or {}).items():
            reason = reason or (f"too_long:{name}" if len(values[name]) > limit else None)
        reference = _text(record.get(ref_col)) if ref_col in record else ""
        if not reason and answer_re is not None and not answer_re.search(reference):
            reason = "answer_regex"
        values["system_prompt"] = system_prompt
        messages = build_messages(templates, values)
        prompt_key = normalise("\n".join(m["content"] for m in messages if m["role"] == "user"))
        if not reason and filters["deduplicate_prompts"]:
            if prompt_key in seen:
                reason = "duplicate_prompt"
            elif seen_train_prompts is not None and prompt_key in seen_train_prompts:
                reason = "duplicate_of_train"
        if reason:
            dropped[reason] += 1
            continue
        seen.add(prompt_key)
        meta = {c: _text(record[c]) for c in mf["metadata_columns"]}
        if split == "test":
            last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append(
                {
                    "messages": messages[:last_assistant],
                    "query": _text(record[mf["evaluate_columns"]["query"]]),
                    "reference": reference,
                    "target": messages[last_assistant]["content"],
                    "meta": meta,
                }
            )
        else:
            rows.append({"messages": messages, "meta": meta})
    report = {"rows_in": len(frame), "rows_kept": len(rows), "dropped": dict(sorted(dropped.items()))}
    if not rows:
        raise StageError(
            f"preprocess_dataset: every row of the {split} split was filtered out "
            f"(reasons: {dict(dropped)}); check the `filters` section and the column mapping"
        )
    return rows, report, seen


def run(job: Job) -> dict:
    mf, filters = job.params.messages_format, job.params.filters
    check_templates(mf, filters)
    frames = {s: pd.read_parquet(job.input[s]) for s in SPLITS}
    for s in SPLITS:  # every check before any output is written
        check_columns(frames[s], s, mf)
    results, report, train_prompts = {}, {}, None
    for s in SPLITS:
        rows, report[s], seen = preprocess_split(frames[s], s, mf, filters, train_prompts)
        if s == "train":
            train_prompts = seen
        results[s] = rows
        log.info(
            "%s: kept %d of %d rows, dropped %s", s, len(rows), report[s]["rows_in"], report[s]["dropped"]
        )
    for s in SPLITS:
        write_jsonl(job.output[s], results[s])
    write_json(job.output.report, report)
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
