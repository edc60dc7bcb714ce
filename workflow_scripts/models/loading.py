"""Loading models, tokenizers and processors the same way in every stage.

One place decides the model class (causal LM, or an image-text-to-text class such as
Gemma-3n) and the chat-template owner (processor or tokenizer), so training, merge and
evaluation can never disagree about them.
"""


import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("snaketune.models")

FALLBACK_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
        "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    # Gemma turns; content may be a string or typed parts (processors of multimodal models).
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else message['role'] %}{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}"
        "{{ message['content'] | trim }}{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    ),
}
# The end-of-turn string each fallback template writes after a message.
FALLBACK_EOT = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>", "plain": None}


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def is_multimodal(model_dir: str | Path) -> bool:
    """True for image-text-to-text models (Gemma-3n): they need AutoProcessor and their own class."""
    cfg = read_config(model_dir)
    archs = cfg.get("architectures") or []
    return any(a.endswith("ForConditionalGeneration") for a in archs) or "text_config" in cfg


def model_class(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(model_dir) else AutoModelForCausalLM


def resolve_dtype(name: str | None) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
    cls = model_class(model_dir)
    model = cls.from_pretrained(str(model_dir), dtype=dtype)
    if device:
        model.to(device)
    return model


def load_tokenizer(model_dir: str | Path):
    """The tokenizer (inside the processor for multimodal models), left-padding ready."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_chat_formatter(model_dir: str | Path):
    """The object whose chat template formats prompts: the processor if the model has one."""
    if is_multimodal(model_dir):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(model_dir))
    return load_tokenizer(model_dir)


def apply_chat_template(formatter, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render messages; multimodal processors take content as typed parts."""
    from transformers import ProcessorMixin

    if isinstance(formatter, ProcessorMixin):
        messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    return formatter.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def device_for(gpu: int | None = None) -> str:
    if torch.cuda.is_available() and gpu != 0:
        return "cuda"
    return "cpu"
