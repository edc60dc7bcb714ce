"""Loading models, tokenizers and chat formatters the same way in every stage (and in the chat
command): from a model folder, or from a GGUF file through transformers' GGUF loader.

The model's family (workflow_scripts.models.families) decides the class and the chat-template
owner, so training, merge and evaluation can never disagree about them; this module only adds
what is the same for every family: dtype, device and the pad token.
"""

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import torch

from workflow_scripts.models.families import ChatFormatter, family_of

log = logging.getLogger("snaketune.models")


def torch_device() -> str:
    """Where every stage computes: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def bf16_speed(device: str) -> tuple[bool, float, float]:
    """(bf16 is fast, seconds of a 512x512 bf16 matmul, of an fp32 one) on `device`. CUDA with
    bf16 support is fast (not timed: 0.0, 0.0); a CPU is fast where its bf16 matmul beats fp32 by
    a fifth (AMX or AVX-512 BF16; on AVX2 alone bf16 is ~100x slower). Measured once per process."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(), 0.0, 0.0
    a32, b32 = torch.randn(512, 512), torch.randn(512, 512)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def timed(a, b) -> float:
        a @ b
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        return (time.perf_counter() - t) / 5

    sec16, sec32 = timed(a16, b16), timed(a32, b32)
    return sec16 < 0.8 * sec32, sec16, sec32


def bf16_is_fast(device: str) -> bool:
    """bf16 where the hardware runs it fast: CUDA with bf16, or a CPU whose bf16 matmul beats fp32."""
    return bf16_speed(device)[0]


def resolve_dtype(name: str | None, device: str | None = None) -> torch.dtype:
    """`auto`: bf16 where this device runs it fast (bf16_is_fast), else fp32; or the named dtype."""
    if name in (None, "auto"):
        return torch.bfloat16 if bf16_is_fast(device or torch_device()) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    model = family_of(model_dir).model_class().from_pretrained(str(model_dir), dtype=dtype)
    if device:
        model.to(device)
    return model


def ensure_pad_token(tok) -> None:
    """Batches need a pad token; a model without one pads with its end-of-sequence token."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def load_tokenizer(model_dir: str | Path):
    """The tokenizer (inside the processor for multimodal models), left-padding ready."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ensure_pad_token(tok)
    return tok


def load_chat_formatter(model_dir: str | Path, template_kwargs: dict | None = None) -> ChatFormatter:
    """The model's chat template owner (processor or tokenizer, as its family says), rendering
    with ``template_kwargs`` (`model.chat_template_kwargs`)."""
    family = family_of(model_dir)
    formatter = ChatFormatter(family, family.load_template_owner(model_dir), dict(template_kwargs or {}))
    ensure_pad_token(formatter.tokenizer)
    return formatter


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, each GGUF file is parsed once. transformers parses a file's metadata anew
    for its config, its weights and its tokenizer, and gguf-py parses every vocabulary entry in
    Python: about 2.5 s per parse of SmolLM2's 49k-token vocabulary on a 2-core Xeon, 9 parses per
    load. A parsed reader is only read from (its tensors are a read-only memory map)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, *mode):
        key = (os.path.realpath(path), *mode)
        if key not in readers:
            readers[key] = original(path, *mode)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from gguf when it loads a file
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, chat formatter) read back from a GGUF file by transformers' own loader (dequantised),
    as the family of the model it holds loads them."""
    from transformers import AutoConfig

    path = Path(path)
    folder, where = str(path.parent), {"gguf_file": path.name}
    with gguf_parsed_once():
        family = family_of(AutoConfig.from_pretrained(folder, **where))
        model = family.model_class().from_pretrained(folder, dtype=dtype, **where)
        formatter = ChatFormatter(family, family.load_template_owner(folder, **where))
    if device:
        model.to(device)
    ensure_pad_token(formatter.tokenizer)
    return model, formatter


def load_model_and_formatter(path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, chat formatter) of a model folder or a GGUF file."""
    if Path(path).is_file():
        return load_gguf(path, dtype, device)
    return load_model(path, dtype=dtype, device=device), load_chat_formatter(path)
