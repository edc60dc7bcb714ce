"""Gemma-3n's class path: multimodal model + processor through train -> merge -> generate.

The full Gemma3nForConditionalGeneration builds its vision tower through timm/torchvision,
which do not load against the CPU torch build here; the test swaps that one tower for a tiny
module (the text stack, audio tower, embedders, processor and class are the real ones). On a
machine with timm + torchvision (a GPU box) the same code paths run unpatched.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import merge_job, train_bpe_tokenizer, train_job, with_defaults, write_formatted

from workflow_scripts.models.families import GEMMA3N, TEMPLATES, family_of

MM_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}


class TinyVisionTower(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(4, config.hidden_size)


@pytest.fixture
def tiny_vision_tower(monkeypatch):
    from transformers.models.gemma3n import modeling_gemma3n

    original = modeling_gemma3n.AutoModel.from_config

    def from_config(config, *args, **kwargs):
        if getattr(config, "model_type", "") == "gemma3n_vision":
            return TinyVisionTower(config)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(modeling_gemma3n.AutoModel, "from_config", staticmethod(from_config))


def gemma_tokenizer():
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *MM_TOKENS.values()]
    return train_bpe_tokenizer(
        specials,
        pad_token="<pad>",
        eos_token="<end_of_turn>",
        bos_token="<bos>",
        extra_special_tokens=MM_TOKENS,
    )


@pytest.fixture
def gemma3n_dir(tmp_path, tiny_vision_tower) -> Path:
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
    )
    from transformers.models.gemma3n import Gemma3nAudioFeatureExtractor, Gemma3nProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = gemma_tokenizer()
    vocab = len(tok)
    text = Gemma3nTextConfig(
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=64,
        laurel_rank=8,
        altup_num_inputs=2,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0],
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    audio = Gemma3nAudioConfig(
        hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=2, sscp_conv_channel_size=[8, 8]
    )
    cfg = Gemma3nConfig(
        text_config=text.to_dict(),
        vision_config=Gemma3nVisionConfig(hidden_size=32).to_dict(),
        audio_config=audio.to_dict(),
    )
    torch.manual_seed(0)
    model = Gemma3nForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path / "gemma3n"
    model.save_pretrained(path)
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessorPil(),
        tokenizer=tok,
        chat_template=TEMPLATES["gemma"].jinja,
    )
    processor.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "manifest.json").write_text(json.dumps({"model_id": "tiny-gemma3n", "chat_template": "model"}))
    return path


def settings_of(**values):
    from workflow_scripts.evaluation.generate import GenerationSettings

    return GenerationSettings.from_config(with_defaults("evaluation", values))


def formatted_splits(tmp_path, model_dir) -> dict[str, str]:
    from workflow_scripts.models.loading import load_chat_formatter, load_tokenizer

    return write_formatted(tmp_path, load_chat_formatter(model_dir), load_tokenizer(model_dir), 20, 8)


def test_gemma3n_chat_template_goes_through_the_processor(gemma3n_dir):
    from transformers import ProcessorMixin

    from workflow_scripts.models.loading import load_chat_formatter

    assert family_of(gemma3n_dir) is GEMMA3N
    formatter = load_chat_formatter(gemma3n_dir)
    assert isinstance(formatter.owner, ProcessorMixin)
    text = formatter.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3n_labels_only_loss_applies_softcapping(gemma3n_dir, tmp_path):
    from workflow_scripts.data.tokens import open_tokens
    from workflow_scripts.models.loading import load_model, load_tokenizer
    from workflow_scripts.training.data import Collator
    from workflow_scripts.training.trainer import labels_only_loss

    splits = formatted_splits(tmp_path, gemma3n_dir)
    model = load_model(gemma3n_dir)
    assert model.config.get_text_config().final_logit_softcapping
    batch = Collator(load_tokenizer(gemma3n_dir).pad_token_id)(
        list(open_tokens(splits["train_tokens"]).select(range(3)))
    )
    loss, _ = labels_only_loss(model, dict(batch))
    full = model(**batch, use_cache=False).loss
    assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=1e-4)


def test_gemma3n_train_merge_generate(gemma3n_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from workflow_scripts.evaluation.generate import generate
    from workflow_scripts.models import merge
    from workflow_scripts.models.loading import load_model, load_tokenizer
    from workflow_scripts.training import train as train_stage

    splits = formatted_splits(tmp_path, gemma3n_dir)
    out = tmp_path / "out"
    training = {
        "max_length": 4096,
        "overlength": "drop",
        "learning_rate": 0.01,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_steps": 4,
        "report_to": ["none"],
    }
    peft = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    trained = train_job(out, splits, gemma3n_dir, training, peft)
    train_stage.run(trained)
    with safe_open(str(out / "model" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("language_model" in k for k in keys), "LoRA must touch the language model only"
    assert not any("vision_tower" in k or "audio_tower" in k for k in keys)

    report = merge.run(merge_job(gemma3n_dir, trained, splits["test"], out / "deploy"))
    assert report["passed"] and report["model_class"] == "Gemma3nForConditionalGeneration"
    merged = AutoModelForImageTextToText.from_pretrained(out / "deploy")
    assert type(merged).__name__ == "Gemma3nForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(out / "deploy")
    assert type(processor).__name__ == "Gemma3nProcessor" and processor.chat_template
    card = (out / "deploy" / "README.md").read_text()  # the family's Hub task and loading code
    assert "pipeline_tag: image-text-to-text" in card
    assert "AutoModelForImageTextToText.from_pretrained" in card

    model, tok = load_model(out / "deploy"), load_tokenizer(out / "deploy")
    prompts = pd.read_parquet(splits["test"])["prompt_text"].tolist()[:3]
    settings = {"max_new_tokens": 6}
    batched = generate(model, tok, prompts, settings_of(batch_size=3, **settings), progress=False)
    single = generate(model, tok, prompts, settings_of(batch_size=1, **settings), progress=False)
    assert batched["token_ids"] == single["token_ids"] and all(batched["token_ids"])
