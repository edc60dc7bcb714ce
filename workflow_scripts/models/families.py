"""Model families: what snaketune must know about a kind of model, one object per family.

A family answers every question a stage has about a model class: which transformers class
loads it (and reloads the merged model), who owns the chat template (tokenizer or processor)
and in which message shape, which Linear layers LoRA may target, where the text config is,
whether attention has a sliding window, what the generation cache argument is called, what the
model card says of the deployment model (its Hub task, the code that loads it), whether it can be
exported to GGUF, and which chat template to install when a checkpoint has none. Stages ask ``family_of(model_dir | config)``; nothing else reads config.json or looks
at class names.

Adding a family: one ``ModelFamily(...)`` in FAMILIES (before the families it is a special case
of) and its tests (tests/test_families.py).
"""

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template installed when a checkpoint has none (`model.fallback_chat_template`)."""

    name: str
    jinja: str
    end_of_turn: str | None  # written after every message; generation stops there


TEMPLATES = {
    t.name: t
    for t in (
        ChatTemplate(
            "chatml",
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
            "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}",
            "<|im_end|>",
        ),
        # Gemma turns; content may be a string or typed parts (processors of multimodal models).
        ChatTemplate(
            "gemma",
            "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
            "else message['role'] %}{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
            "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}"
            "{{ message['content'] | trim }}{% else %}{% for part in message['content'] %}"
            "{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
            "{% endif %}",
            "<end_of_turn>",
        ),
        ChatTemplate(
            "plain",
            "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}",
            None,
        ),
    )
}


def _config_dict(config) -> dict:
    """The few config.json fields families are told apart by, from a folder, a dict or a config object."""
    if isinstance(config, str | Path):
        config = json.loads((Path(config) / "config.json").read_text())
    if isinstance(config, dict):
        return {
            "model_type": config.get("model_type"),
            "architectures": config.get("architectures") or [],
            "text_config": "text_config" in config,
        }
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None) or [],
        "text_config": "text_config" in (getattr(config, "sub_configs", None) or {}),
    }


def _image_text_to_text(cfg: dict) -> bool:
    return cfg["text_config"] or any(a.endswith("ForConditionalGeneration") for a in cfg["architectures"])


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model: its fields and methods are every answer a stage needs about it."""

    name: str
    detect: Callable[[dict], bool]  # on _config_dict(config): is the model of this family
    auto_class: str  # the transformers Auto class that loads the base, merged and reloaded model
    template_owner: str  # "processor" or "tokenizer": whose chat template formats prompts
    typed_content: bool  # messages carry content as typed parts [{"type": "text", "text": ...}]
    lora_scope: str | None  # LoRA only on Linear layers under this submodule (None: every one)
    fallback_template: str  # the TEMPLATES entry that matches the family's own turn format
    pipeline_tag: str  # the Hub's task of the deployment model (its model card's `pipeline_tag`)
    gguf_export: bool  # a text-only decoder: GGUF export applies (llama.cpp's converter must know its architecture)

    # ---------------------------------------------------------------- loading and saving
    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def load_template_owner(self, path: str | Path, **kwargs):
        """The processor or tokenizer whose chat template formats prompts (``kwargs``: gguf_file, ...)."""
        import transformers

        cls = transformers.AutoProcessor if self.template_owner == "processor" else transformers.AutoTokenizer
        return cls.from_pretrained(str(path), **kwargs)

    def usage_snippet(self, model_path: str) -> str:
        """Python code that loads the deployment model from ``model_path``, for its card."""
        owner = "AutoProcessor" if self.template_owner == "processor" else "AutoTokenizer"
        return (
            f"from transformers import {self.auto_class}, {owner}\n\n"
            f'model = {self.auto_class}.from_pretrained("{model_path}")\n'
            f'{self.template_owner} = {owner}.from_pretrained("{model_path}")'
        )

    # ---------------------------------------------------------------- chat
    def chat_messages(self, messages: list[dict]) -> list[dict]:
        """``messages`` ({role, content: str}) in the shape this family's template owner takes."""
        if not self.typed_content:
            return messages
        return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]

    # ---------------------------------------------------------------- architecture
    def lora_targets(self, model) -> list[str]:
        """Full names of the Linear layers LoRA may target: the LM head never, and only those
        under `lora_scope` (the language model of a multimodal model: vision/audio stay untouched)."""
        import torch

        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not name.endswith("lm_head")
            and (self.lora_scope is None or self.lora_scope in name)
        ]

    def text_config(self, config):
        """The config of the text decoder (the model's own config for a text-only model)."""
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def sliding_window(self, config) -> int | None:
        """The attention window when some layers attend only that far back, else None."""
        cfg = self.text_config(config)
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None) or []
        uses_it = "sliding_attention" in layer_types or getattr(cfg, "use_sliding_window", window is not None)
        return window if window and uses_it else None

    def cache_kwarg(self, model) -> str:
        """The forward argument that takes the KV cache: transformers renamed `past_key_values` to
        `cache` (the old name warns, then goes away)."""
        return "cache" if "cache" in _forward_parameters(model) else "past_key_values"

    def last_logits_kwargs(self, model) -> dict[str, Any]:
        """Forward arguments that compute logits for the last position only, where the model has them."""
        return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


# Gemma-3n, and other image-text-to-text checkpoints of its shape (a `language_model` submodule,
# a processor that owns the chat template and takes typed message parts).
GEMMA3N = ModelFamily(
    name="gemma3n",
    detect=lambda cfg: cfg["model_type"] == "gemma3n" or _image_text_to_text(cfg),
    auto_class="AutoModelForImageTextToText",
    template_owner="processor",
    typed_content=True,
    lora_scope="language_model",
    fallback_template="gemma",
    pipeline_tag="image-text-to-text",
    gguf_export=False,
)
# Gemma-3 text models (270M, 1B): causal LMs with local (sliding-window) and global layers.
GEMMA3_TEXT = ModelFamily(
    name="gemma3-text",
    detect=lambda cfg: cfg["model_type"] == "gemma3_text",
    auto_class="AutoModelForCausalLM",
    template_owner="tokenizer",
    typed_content=False,
    lora_scope=None,
    fallback_template="gemma",
    pipeline_tag="text-generation",
    gguf_export=True,
)
# Any other causal LM (SmolLM2, Llama, Qwen, ...).
CAUSAL_LM = ModelFamily(
    name="causal-lm",
    detect=lambda cfg: True,
    auto_class="AutoModelForCausalLM",
    template_owner="tokenizer",
    typed_content=False,
    lora_scope=None,
    fallback_template="chatml",
    pipeline_tag="text-generation",
    gguf_export=True,
)
FAMILIES = (GEMMA3N, GEMMA3_TEXT, CAUSAL_LM)  # the first that detects the model is its family


def family_of(config) -> ModelFamily:
    """The family of a model: from its folder, its config.json as a dict, or its config object."""
    cfg = _config_dict(config)
    return next(f for f in FAMILIES if f.detect(cfg))


@dataclass(frozen=True)
class ChatFormatter:
    """A model's chat template owner (tokenizer or processor) with its family's message shape, and
    the options every render passes to the template (`model.chat_template_kwargs`, e.g. Qwen3's
    ``enable_thinking``)."""

    family: ModelFamily
    owner: Any
    template_kwargs: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        """The tokenizer (a processor's own, or the owner itself)."""
        return self.owner.tokenizer if self.family.template_owner == "processor" else self.owner

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.owner.apply_chat_template(
            self.family.chat_messages(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )

    def save_pretrained(self, path: str | Path) -> None:
        self.owner.save_pretrained(str(path))

    def portable(self) -> "TemplateRenderer | None":
        """The same rendering without the owner (a small picklable object whose process needs
        neither torch nor the tokenizer), or None where the owner is a processor. Callers check
        it against `render` on their data before relying on it (format_dataset does)."""
        if self.family.template_owner != "tokenizer" or not hasattr(self.owner, "get_chat_template"):
            return None
        return TemplateRenderer(
            self.family.name,
            self.owner.get_chat_template(None, None),
            {**self.owner.special_tokens_map, **self.template_kwargs},
        )


@dataclass(frozen=True)
class TemplateRenderer:
    """A tokenizer's chat template as its `apply_chat_template(tokenize=False)` renders it: the
    template and the special-token variables it is given, rendered by transformers' own
    `render_jinja_template` (importing it loads neither torch nor a tokenizer)."""

    family_name: str
    chat_template: str
    template_kwargs: dict

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

        family = next(f for f in FAMILIES if f.name == self.family_name)
        rendered, _ = render_jinja_template(
            conversations=[_normalize_chat_messages(family.chat_messages(messages))],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )
        return rendered[0]
