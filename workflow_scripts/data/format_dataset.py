"""Stage 3: render conversations with the base model's chat template and tokenize them.

The prompt is rendered with ``add_generation_prompt=True`` and the completion is the rest
of the rendered conversation, so the tokens a model is trained on after the prompt are
exactly the tokens it must generate at evaluation (which reads the same ``prompt_text``).
``input_ids = prompt_ids + completion_ids``; the loss covers ``input_ids[prompt_length:]``.
"""

import json
import logging
from pathlib import Path

import numpy as np

from workflow_scripts.files import read_jsonl, write_json, write_parquet
from workflow_scripts.models.families import ChatFormatter
from workflow_scripts.models.loading import load_chat_formatter, load_tokenizer
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.format_dataset")


def render_example(formatter: ChatFormatter, messages: list[dict]) -> tuple[str, str]:
    """(prompt_text, completion_text) of a conversation whose last message is the assistant's."""
    prompt = formatter.render(messages[:-1], add_generation_prompt=True)
    full = formatter.render(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise StageError(
            "format_dataset: the chat template renders the prompt differently inside the full conversation "
            f"(prompt {prompt[-80:]!r} is not a prefix of the conversation); training and evaluation would "
            "see different prompts. Use a prefix-consistent template (model.fallback_chat_template)."
        )
    return prompt, full[len(prompt) :]


def tokenize(tok, text: str) -> list[int]:
    # The chat template already writes any BOS; adding special tokens would double it.
    return tok(text, add_special_tokens=False)["input_ids"]


def percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {
        "count": int(arr.size),
        "mean": round(float(arr.mean()), 1),
        **{f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)},
        "max": int(arr.max()),
    }


def format_train_split(
    rows: list[dict], formatter: ChatFormatter, tok, max_length: int, overlength: str
) -> tuple[list, dict]:
    out, lengths = [], []
    stats = {"over_max_length": 0, "dropped": 0, "truncated": 0}
    for row in rows:
        messages = row["messages"]
        prompt, completion = render_example(formatter, messages)
        prompt_ids, completion_ids = tokenize(tok, prompt), tokenize(tok, completion)
        n = len(prompt_ids) + len(completion_ids)
        lengths.append(n)
        if n > max_length:
            stats["over_max_length"] += 1
            # A prompt that alone fills max_length leaves no token to learn from: always drop it.
            if overlength == "drop" or len(prompt_ids) >= max_length:
                stats["dropped"] += 1
                continue
            completion_ids = completion_ids[: max_length - len(prompt_ids)]
            stats["truncated"] += 1
        out.append(
            {
                "messages": json.dumps(messages, ensure_ascii=False),
                "prompt_text": prompt,
                "completion_text": completion,
                "input_ids": prompt_ids + completion_ids,
                "prompt_length": len(prompt_ids),
                "meta": json.dumps(row.get("meta") or {}),
            }
        )
    stats["tokens"] = percentiles(lengths)
    stats["rows"] = len(out)
    return out, stats


def format_test_split(rows: list[dict], formatter: ChatFormatter, tok) -> tuple[list, dict]:
    out, lengths = [], []
    for row in rows:
        prompt = formatter.render(row["messages"], add_generation_prompt=True)
        n = len(tokenize(tok, prompt))
        lengths.append(n)
        out.append(
            {
                "messages": json.dumps(row["messages"], ensure_ascii=False),
                "prompt_text": prompt,
                "prompt_length": n,
                "query": row.get("query", ""),
                "reference": row["reference"],
                "target": row.get("target", ""),
                "meta": json.dumps(row.get("meta") or {}),
            }
        )
    return out, {"rows": len(out), "prompt_tokens": percentiles(lengths)}


def run(job: Job) -> dict:
    fmt, model_dir = job.params.format, job.input.model_dir
    formatter = load_chat_formatter(model_dir)
    tok = load_tokenizer(model_dir)
    manifest_path = Path(model_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    results, stats = {}, {"max_length": fmt["max_length"], "overlength": fmt["overlength"]}
    stats["chat_template"] = manifest.get("chat_template", "model")
    for split in ("train", "validation"):
        rows = read_jsonl(job.input[split])
        results[split], stats[split] = format_train_split(
            rows, formatter, tok, fmt["max_length"], fmt["overlength"]
        )
        if not results[split]:
            raise StageError(
                f"training.max_length: all {len(rows)} {split} rows are longer than {fmt['max_length']} tokens "
                f"({stats[split]['tokens']}); raise training.max_length or set training.overlength: truncate"
            )
    rows = read_jsonl(job.input.test)
    if not rows:
        raise StageError(f"format_dataset: the test split {job.input.test} is empty")
    results["test"], stats["test"] = format_test_split(rows, formatter, tok)
    for split, rows in results.items():
        write_parquet(job.output[split], rows)
    write_json(job.output.stats, stats)
    log.info("formatted: %s", {s: len(r) for s, r in results.items()})
    return stats


if "snakemake" in globals():
    snakemake_main(snakemake, run)
