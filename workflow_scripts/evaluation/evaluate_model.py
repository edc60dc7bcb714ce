"""Stages 4 and 7: generate answers for the formatted test prompts and score them.

The prompts are the `prompt_text` column written by format_dataset: the same chat template
that rendered the training data, so base and fine-tuned models are asked exactly what the
fine-tuned model was trained on. The metrics `evaluation.metrics` names are scored as their
registration in workflow_scripts.evaluation.metrics says: ROUGE and BERTScore compare the final
answer (the text after ``</think>``) with the reference; answer accuracy parses and judges the
answers (`evaluation.answer_match`, see workflow_scripts.evaluation.answers), and each prediction
row records the parsed answer and reference and the rule that decided (`parsed_answer`,
`parsed_reference`, `answer_rule`).
"""

import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from workflow_scripts.evaluation.generate import GenerationSettings, generate
from workflow_scripts.evaluation.metrics import answer_matching, score, selected
from workflow_scripts.files import write_json, write_jsonl
from workflow_scripts.models.loading import (
    dtype_name,
    load_model,
    load_tokenizer,
    resolve_dtype,
    torch_device,
)
from workflow_scripts.stage import Job, StageError, set_threads, snakemake_main

log = logging.getLogger("snaketune.evaluate")


PROMPT_COLUMNS = ("prompt_text", "reference")  # required
OPTIONAL_COLUMNS = ("meta",)


def load_prompts(path: str, max_examples: int | None) -> pd.DataFrame:
    """The formatted prompts to answer (the test split, or the validation prompts of a sweep): the
    columns evaluation reads, read in record batches and no further than ``max_examples`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    names = source.schema_arrow.names
    for column in PROMPT_COLUMNS:
        if column not in names:
            raise StageError(
                f"evaluation: the prompts file {path} has no {column!r} column (re-run format_dataset)"
            )
    columns = [c for c in (*PROMPT_COLUMNS, *OPTIONAL_COLUMNS) if c in names]
    batches, rows = [], 0
    batch_size = min(max_examples, 1024) if max_examples else 1024
    for batch in source.iter_batches(batch_size=batch_size, columns=columns):
        batches.append(batch)
        rows += batch.num_rows
        if max_examples and rows >= max_examples:
            break
    if rows == 0:
        raise StageError(f"evaluation: the prompts file {path} is empty; nothing to evaluate")
    table = pa.Table.from_batches(batches)
    return (table.slice(0, max_examples) if max_examples else table).to_pandas()


def dtype_agreement(
    model_dir, tok, prompts: list[str], outputs: list[list[int]], settings, cfg, dtype, device
):
    """How far greedy outputs in a reduced-precision dtype agree with fp32 on the first
    `dtype_check_examples` prompts; None where generation ran in fp32, sampled, or the check is off."""
    n = min(cfg["dtype_check_examples"], len(prompts))
    if dtype == torch.float32 or settings.do_sample or n == 0:
        return None
    log.info("checking %s against float32 on %d prompts", dtype_name(dtype), n)
    reference = generate(
        load_model(model_dir, dtype=torch.float32, device=device), tok, prompts[:n], settings, progress=False
    )["token_ids"]
    shared = []
    for a, b in zip(outputs[:n], reference, strict=True):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        shared.append(k / max(len(a), len(b), 1))
    identical = sum(a == b for a, b in zip(outputs[:n], reference, strict=True))
    return {
        "reference": "float32",
        "examples": n,
        "identical": identical,
        "identical_rate": identical / n,
        # the share of each output's tokens before it first differs from fp32's, averaged
        "mean_agreeing_prefix": sum(shared) / n,
    }


def run(job: Job) -> dict:
    cfg, model_dir, label = job.params.evaluation, job.input.model_dir, job.params.label
    set_threads(job.threads)
    frame = load_prompts(job.input.prompts, cfg["max_examples"])
    for metric in selected(cfg["metrics"]):  # bad metric settings fail before generating, not after
        if metric.check:
            metric.check(cfg)
    device = torch_device()
    dtype = resolve_dtype(cfg["dtype"])
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=dtype, device=device)
    tok = load_tokenizer(model_dir)
    settings = GenerationSettings.from_config(cfg)
    log.info("evaluating %s on %d prompts with %s", label, len(frame), settings)
    prompts = frame["prompt_text"].tolist()
    gen = generate(model, tok, prompts, settings)
    agreement = dtype_agreement(model_dir, tok, prompts, gen["token_ids"], settings, cfg, dtype, device)
    predictions, references = gen["texts"], frame["reference"].tolist()
    metrics, per_example = score(predictions, references, cfg)
    metrics["mean_generated_tokens"] = gen["generated_tokens"] / len(frame)
    metrics["generation_tokens_per_s"] = gen["tokens_per_s"]
    manifest_path = Path(model_dir) / "manifest.json"
    result = {
        "model": label,
        "model_dir": str(model_dir),
        "model_manifest": json.loads(manifest_path.read_text()) if manifest_path.is_file() else None,
        "n_examples": len(frame),
        "metrics": metrics,
        "answer_accuracy": metrics.get("answer_accuracy"),
        "answer_matching": answer_matching(cfg) if "answer_accuracy" in cfg["metrics"] else None,
        "generation": {
            **settings.__dict__,
            "dtype": dtype_name(dtype),
            "dtype_setting": cfg["dtype"],
            "device": device,
            "path": gen["path"],
            "dtype_agreement": agreement,
        },
        "timings": {"generation_s": round(gen["seconds"], 2), "total_s": round(time.perf_counter() - t0, 2)},
    }
    rows = []
    metas = frame["meta"].tolist() if "meta" in frame.columns else ["{}"] * len(frame)
    for i in range(len(frame)):
        row = {
            "prompt": frame["prompt_text"].iloc[i],
            "reference": references[i],
            "prediction": predictions[i],
            "generated_tokens": len(gen["token_ids"][i]),
            "meta": json.loads(metas[i] or "{}"),
        }
        for key, values in per_example.items():
            row[key] = values[i]
        rows.append(row)
    write_jsonl(job.output.predictions, rows)
    write_json(job.output.evaluation, result)
    log.info("%s: %s", label, {k: v for k, v in metrics.items() if isinstance(v, float)})
    return result


if "snakemake" in globals():
    snakemake_main(snakemake, run)
