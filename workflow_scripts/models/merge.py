"""Stage 6: merge the LoRA adapter into a standalone deployment model, and prove it is equal.

The merged model is saved, loaded back from disk with the base model's own class (no PEFT),
and its logits on formatted test prompts are compared with base + adapter. The max absolute
difference goes into merge_report.json; above the tolerance the stage fails and leaves no
deployment_model/ behind (it is written to a temporary folder and renamed at the end).
"""

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.models.loading import load_chat_formatter, load_model
from workflow_scripts.models.model_card import merge_card
from workflow_scripts.data.streams import batches_of
from workflow_scripts.stage import Job, StageError, set_threads, snakemake_main

log = logging.getLogger("snaketune.merge")

TOLERANCE_FP32 = 1e-3
N_PROMPTS = 4


@torch.no_grad()
def prompt_logits(model, tok, prompts: list[str]) -> list[torch.Tensor]:
    model.eval()
    out = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        out.append(model(input_ids=ids, use_cache=False).logits[0].float().cpu())
    return out


def max_logit_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def run(job: Job) -> dict:
    from peft import PeftModel

    base_dir, adapter_dir, test_path = job.input.model_dir, job.input.adapter_dir, job.input.test
    set_threads(job.threads)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise StageError(f"merge: {adapter_dir} has no adapter_config.json (run the train rule first)")
    first = next(batches_of(test_path, columns=["prompt_text"], rows=N_PROMPTS), [])  # never the whole split
    prompts = [row["prompt_text"] for row in first]
    if not prompts:
        raise StageError(f"merge: no test prompts in {test_path} to verify the merge with")
    formatter = load_chat_formatter(base_dir)
    tok = formatter.tokenizer  # loaded once: a 262k-token vocabulary takes seconds
    dtype = torch.float32  # merge and verify in fp32: the tolerance is meaningful there
    adapted = PeftModel.from_pretrained(load_model(base_dir, dtype=dtype), adapter_dir)
    reference = prompt_logits(adapted, tok, prompts)
    merged = adapted.merge_and_unload()
    run_info = json.loads(Path(job.input.run_info).read_text())
    with atomic_path(job.output.deployment_dir, is_dir=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        formatter.save_pretrained(tmp)
        if formatter.owner is not formatter.tokenizer:
            tok.save_pretrained(tmp)  # beside a processor, the tokenizer's own files too
        del merged, adapted
        reloaded = load_model(tmp, dtype=dtype)  # the base model's class, from disk, no PEFT
        diff = max_logit_diff(reference, prompt_logits(reloaded, tok, prompts))
        report = {
            "max_logit_diff": diff,
            "tolerance": TOLERANCE_FP32,
            "dtype": "float32",
            "n_prompts": len(prompts),
            "model_class": type(reloaded).__name__,
            "passed": diff <= TOLERANCE_FP32,
        }
        log.info("merge check: max |logit diff| = %.3e (tolerance %g)", diff, TOLERANCE_FP32)
        if diff > TOLERANCE_FP32:
            raise StageError(
                f"merge: merged model differs from base + adapter (max logit diff {diff:.3e} > {TOLERANCE_FP32})"
            )
        write_json(tmp / "merge_report.json", report)
        (tmp / "README.md").write_text(merge_card(base_dir, adapter_dir, run_info, report, formatter.family))
    return report


if "snakemake" in globals():
    snakemake_main(snakemake, run)
