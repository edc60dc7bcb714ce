"""Loading models, tokenizers and chat formatters the same way in every stage.

The model's family (workflow_scripts.models.families) decides the class and the chat-template
owner, so training, merge and evaluation can never disagree about them; this module only adds
what is the same for every family: dtype, device and the pad token.
"""

import logging
from pathlib import Path

import torch

from workflow_scripts.models.families import ChatFormatter, family_of

log = logging.getLogger("snaketune.models")


def torch_device() -> str:
    """Where every stage computes: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None) -> torch.dtype:
    if name in (None, "auto"):
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def load_chat_formatter(model_dir: str | Path) -> ChatFormatter:
    """The model's chat template owner (processor or tokenizer, as its family says)."""
    family = family_of(model_dir)
    formatter = ChatFormatter(family, family.load_template_owner(model_dir))
    ensure_pad_token(formatter.tokenizer)
    return formatter
