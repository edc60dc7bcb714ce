"""Model families: each family answers every question a stage asks about a model class.

Adding a family means one ModelFamily in workflow_scripts/models/families.py and a case here.
(Gemma-3n's whole train -> merge -> generate path runs in tests/test_gemma3n.py.)
"""

import json

import pytest
import torch
import yaml
from helpers import REPO, build_tiny_llama, tiny_gemma3_text

from workflow_scripts.models.families import (
    CAUSAL_LM,
    FAMILIES,
    GEMMA3_TEXT,
    GEMMA3N,
    TEMPLATES,
    ChatFormatter,
    family_of,
)


@pytest.mark.parametrize(
    "config, family",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, CAUSAL_LM),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, CAUSAL_LM),
        ({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}, GEMMA3_TEXT),
        ({"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"]}, GEMMA3N),
        ({"model_type": "gemma3n", "text_config": {}}, GEMMA3N),
        # an image-text-to-text checkpoint of the same shape goes the same way
        ({"model_type": "other", "architectures": ["OtherForConditionalGeneration"]}, GEMMA3N),
    ],
)
def test_family_of_config_dict_folder_and_object(tmp_path, config, family):
    assert family_of(config) is family
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert family_of(tmp_path) is family


def test_families_are_named_once():
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    assert FAMILIES[-1] is CAUSAL_LM  # the catch-all comes last


def test_family_of_config_objects():
    from transformers import Gemma3nConfig, Gemma3TextConfig, LlamaConfig

    assert family_of(LlamaConfig()) is CAUSAL_LM
    assert family_of(Gemma3TextConfig()) is GEMMA3_TEXT
    assert family_of(Gemma3nConfig()) is GEMMA3N


def test_classes_and_template_owners():
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    assert CAUSAL_LM.model_class() is AutoModelForCausalLM
    assert GEMMA3_TEXT.model_class() is AutoModelForCausalLM
    assert GEMMA3N.model_class() is AutoModelForImageTextToText
    assert {f.template_owner for f in (CAUSAL_LM, GEMMA3_TEXT)} == {"tokenizer"}
    assert GEMMA3N.template_owner == "processor"


def test_message_shape():
    messages = [{"role": "user", "content": "hi"}]
    assert CAUSAL_LM.chat_messages(messages) == messages
    assert GEMMA3N.chat_messages(messages) == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_usage_snippets_load_with_the_family_class():
    snippet = CAUSAL_LM.usage_snippet("me/model")
    assert 'AutoModelForCausalLM.from_pretrained("me/model")' in snippet
    assert 'AutoTokenizer.from_pretrained("me/model")' in snippet
    snippet = GEMMA3N.usage_snippet("me/model")
    assert "AutoModelForImageTextToText.from_pretrained" in snippet and "AutoProcessor" in snippet
    assert "AutoModelForCausalLM" not in snippet
    for family in FAMILIES:
        compile(family.usage_snippet("path/to/model"), family.name, "exec")  # valid Python


@pytest.mark.parametrize(
    "family, pipeline_tag, gguf_export",
    [
        (CAUSAL_LM, "text-generation", True),
        (GEMMA3_TEXT, "text-generation", True),
        (
            GEMMA3N,
            "image-text-to-text",
            False,
        ),  # vision/audio towers: llama.cpp's converter has no text-only path
    ],
)
def test_hub_task_and_gguf_export(family, pipeline_tag, gguf_export):
    assert family.pipeline_tag == pipeline_tag and family.gguf_export is gguf_export


def test_every_family_has_a_fallback_template_the_schema_accepts():
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["model"]["properties"]["fallback_chat_template"]["enum"]
    assert set(enum) == {*TEMPLATES, None}  # null: the family's own fallback_template
    assert {f.fallback_template for f in FAMILIES} <= set(TEMPLATES)


def test_lora_targets_skip_the_head_and_stay_in_scope():
    model = build_tiny_llama(64)
    targets = CAUSAL_LM.lora_targets(model)
    assert targets and not any(t.endswith("lm_head") for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # a family confined to the language model finds nothing outside it
    assert GEMMA3N.lora_targets(model) == []


def test_text_config_sliding_window_cache_and_logits():
    llama = build_tiny_llama(64)
    assert CAUSAL_LM.text_config(llama.config) is llama.config
    assert CAUSAL_LM.sliding_window(llama.config) is None
    gemma = tiny_gemma3_text()
    assert family_of(gemma.config) is GEMMA3_TEXT
    assert GEMMA3_TEXT.sliding_window(gemma.config) == 8
    from transformers import Gemma3nConfig

    mm = Gemma3nConfig()
    assert GEMMA3N.text_config(mm) is mm.text_config
    assert GEMMA3N.sliding_window(mm) == mm.text_config.sliding_window
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns)
    from importlib.metadata import version

    from packaging.version import Version
    from transformers import DynamicCache

    renamed = Version(version("transformers")) >= Version("5.24")
    for model, family in ((llama, CAUSAL_LM), (gemma, GEMMA3_TEXT)):
        assert family.cache_kwarg(model) == ("cache" if renamed else "past_key_values")
        assert family.last_logits_kwargs(model) == {"logits_to_keep": 1}
        # the cache given under that name is the one the model fills, and only the last logits come back
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            out = model(
                input_ids=ids,
                use_cache=True,
                **{family.cache_kwarg(model): cache},
                **family.last_logits_kwargs(model),
            )
        assert cache.get_seq_length() == 5 and out.logits.shape[1] == 1


def test_chat_formatter_renders_with_the_family_shape(tiny_model_dir):
    from workflow_scripts.models.loading import load_chat_formatter

    formatter = load_chat_formatter(tiny_model_dir)
    assert isinstance(formatter, ChatFormatter) and formatter.family is CAUSAL_LM
    assert formatter.tokenizer is formatter.owner
    text = formatter.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
