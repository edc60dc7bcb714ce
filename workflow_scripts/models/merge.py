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

from workflow_scripts.common import StageError, atomic_path, set_threads, snakemake_main, write_json
from workflow_scripts.models.loading import is_multimodal, load_chat_formatter, load_model, load_tokenizer

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


def model_card(base_dir: str, adapter_dir: str, run_info: dict, report: dict) -> str:
    manifest_path = Path(base_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    training = (run_info.get("resolved_config") or {}).get("training", {})
    lora = {k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    base_id = manifest.get("model_id", "unknown")
    return f"""---
base_model: {base_id}
library_name: transformers
tags: [snaketune, lora, merged]
---
# Fine-tuned {base_id}

LoRA fine-tune of `{base_id}` produced by the snaketune workflow, with the adapter merged
into the weights (no PEFT needed to load it).

- **Base model:** `{base_id}` ({manifest.get("architecture", "?")}, {manifest.get("parameters", 0):,} parameters)
- **LoRA:** {json.dumps(lora)}
- **Training:** {run_info.get("global_step", "?")} steps, learning rate {training.get("learning_rate")},
  batch {training.get("per_device_train_batch_size")}, max length {training.get("max_length")};
  final train loss {run_info.get("train_loss")}, final validation loss {run_info.get("final_eval_loss")}
- **Chat template:** {manifest.get("chat_template", "model")} (the one used in training and evaluation)
- **Merge check:** max |logit(merged) - logit(base + adapter)| = {report["max_logit_diff"]:.2e}
  on {report["n_prompts"]} test prompts (tolerance {report["tolerance"]:g})

## Usage
```python
from transformers import AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained("path/to/deployment_model")
processor = AutoProcessor.from_pretrained("path/to/deployment_model")
```
"""


def run(base_dir: str, adapter_dir: str, test_path: str, run_json: str | None, out_dir: str, threads=None) -> dict:
    from peft import PeftModel

    set_threads(threads)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise StageError(f"merge: {adapter_dir} has no adapter_config.json (run the train rule first)")
    prompts = pd.read_parquet(test_path, columns=["prompt_text"])["prompt_text"].tolist()[:N_PROMPTS]
    if not prompts:
        raise StageError(f"merge: no test prompts in {test_path} to verify the merge with")
    tok = load_tokenizer(base_dir)
    dtype = torch.float32  # merge and verify in fp32: the tolerance is meaningful there
    adapted = PeftModel.from_pretrained(load_model(base_dir, dtype=dtype), adapter_dir)
    reference = prompt_logits(adapted, tok, prompts)
    merged = adapted.merge_and_unload()
    run_info = json.loads(Path(run_json).read_text()) if run_json and Path(run_json).is_file() else {}
    with atomic_path(out_dir, is_dir=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        formatter = load_chat_formatter(base_dir)
        formatter.save_pretrained(tmp)
        if is_multimodal(base_dir):
            tok.save_pretrained(tmp)
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
        (tmp / "README.md").write_text(model_card(base_dir, adapter_dir, run_info, report))
    return report


def _from_snakemake(smk) -> None:
    run(
        smk.input.model_dir,
        smk.input.adapter_dir,
        smk.input.test,
        smk.input.run_info,
        smk.output.deployment_dir,
        smk.threads,
    )


if "snakemake" in globals():
    snakemake_main(snakemake, _from_snakemake)
