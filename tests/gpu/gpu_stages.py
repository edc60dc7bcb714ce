"""GPU checks: train -> merge -> generate in bf16 on CUDA, and resume after a kill, on tiny models.

The CPU suite runs the same stages in fp32 on CPU, with Gemma-3n's timm vision tower swapped
for a stand-in (timm and torchvision do not load against the CPU torch build). Here, on a CUDA
machine: frozen weights in bf16 on the GPU, the merge check, batched greedy generation against
one-prompt-at-a-time generation in bf16 (the evaluation's dtype on a GPU), resume from a
checkpoint after SIGKILL, and Gemma-3n with its real vision tower (timm's mobilenetv5_300m_enc).

This file is named outside pytest's ``test_*.py`` pattern, so ``pytest tests`` (``make test``)
never collects it; ``tests/gpu/run_gpu_checks.sh`` runs it by name:
``pytest -m gpu tests/gpu/gpu_stages.py``. Without CUDA every test is skipped;
``SNAKETUNE_GPU_CHECKS_ON_CPU=1`` runs them on the CPU instead, to check this file without a GPU.

Calls: workflow_scripts.training.train.run, workflow_scripts.models.merge.run,
workflow_scripts.evaluation.generate.generate, workflow_scripts.models.loading.{load_model,
load_tokenizer, load_chat_formatter}, workflow_scripts.training.checkpoints.find_resume_checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import REPO, train_bpe_tokenizer, with_defaults, write_formatted

from workflow_scripts.stage import Job

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("SNAKETUNE_GPU_CHECKS_ON_CPU") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or ON_CPU), reason="no CUDA device")]

TRAINING = {
    "max_length": 4096,
    "overlength": "drop",
    "learning_rate": 0.01,
    "max_steps": 12,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 6,
    "save_steps": 6,
    "save_total_limit": 2,
    "seed": 1,
    "report_to": ["none"],
}
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
N_PROMPTS = 8
MAX_NEW_TOKENS = 24


@pytest.fixture(autouse=True)
def peak_gpu_memory(record_property):
    """Each test's peak GPU memory (this process), into the JUnit XML run_gpu_checks.sh reads."""
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield
    if CUDA:
        record_property("peak_gpu_mb", round(torch.cuda.max_memory_allocated() / 2**20, 1))


def train_job(out: Path, splits: dict, model_dir: Path, training: dict = TRAINING) -> Job:
    return Job(
        input={
            "train": splits["train_tokens"],
            "validation": splits["validation_tokens"],
            "model_dir": str(model_dir),
        },
        output={
            "adapter_dir": str(out / "model"),
            "metrics": str(out / "training" / "metrics.csv"),
            "loss_plot": str(out / "training" / "loss.png"),
            "run_info": str(out / "training" / "run.json"),
        },
        params={
            "training": with_defaults("training", training),
            "peft": with_defaults("peft", PEFT),
            "wandb": with_defaults("wandb", {"mode": "disabled"}),
            "experiment": "gpu",
            "gpus": 1 if CUDA else 0,
            "checkpoint_dir": str(out / "checkpoints"),
        },
        threads=4,
    )


def merge_job(out: Path, splits: dict, model_dir: Path) -> Job:
    return Job(
        input={
            "model_dir": str(model_dir),
            "adapter_dir": str(out / "model"),
            "run_info": str(out / "training" / "run.json"),
            "test": splits["test"],
        },
        output={"deployment_dir": str(out / "deployment_model")},
    )


def formatted(tmp_path: Path, model_dir: Path) -> dict:
    from workflow_scripts.models.loading import load_chat_formatter, load_tokenizer

    return write_formatted(tmp_path, load_chat_formatter(model_dir), load_tokenizer(model_dir), 32, 8)


def check_trained(summary: dict, metrics_csv: str, record_property) -> None:
    assert summary["device"] == DEVICE
    if CUDA:  # the GPU path: frozen weights stored in bf16 on the GPU
        assert summary["setup"]["bf16_hardware"] and summary["setup"]["frozen_dtype"] == "torch.bfloat16"
    losses = pd.read_csv(metrics_csv)["loss"].dropna().tolist()
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    record_property("train_loss_first_last", f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    record_property("train_peak_memory_mb", summary["peak_memory_mb"])


def check_generation(deploy: Path, test_parquet: str, record_property) -> None:
    """Batched greedy generation in bf16 on the device equals one prompt at a time."""
    from workflow_scripts.evaluation.generate import GenerationSettings, generate
    from workflow_scripts.models.loading import load_model, load_tokenizer

    model = load_model(deploy, dtype=torch.bfloat16, device=DEVICE)
    assert next(model.parameters()).device.type == DEVICE
    tok = load_tokenizer(deploy)
    prompts = pd.read_parquet(test_parquet)["prompt_text"].tolist()[:N_PROMPTS]

    def settings(batch_size):
        return GenerationSettings.from_config(
            with_defaults("evaluation", {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": batch_size})
        )

    batched = generate(model, tok, prompts, settings(N_PROMPTS), progress=False)
    single = generate(model, tok, prompts, settings(1), progress=False)
    same = sum(a == b for a, b in zip(batched["token_ids"], single["token_ids"], strict=True))
    record_property("generation_identical", f"{same}/{len(prompts)}")
    record_property("generation_tokens_per_s_batched", round(batched["tokens_per_s"], 1))
    assert all(batched["token_ids"]), "every prompt must generate tokens"
    assert same == len(prompts), (
        f"batched != one-at-a-time for {len(prompts) - same} of {len(prompts)} prompts"
    )


def test_llama_train_merge_generate_bf16(tmp_path, tiny_model_dir, record_property):
    from workflow_scripts.models import merge
    from workflow_scripts.training import train as train_stage

    splits = formatted(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    job = train_job(out, splits, tiny_model_dir)
    check_trained(train_stage.run(job), job.output.metrics, record_property)
    report = merge.run(merge_job(out, splits, tiny_model_dir))
    record_property("max_logit_diff", report["max_logit_diff"])
    assert report["passed"] and report["max_logit_diff"] <= 1e-3
    check_generation(out / "deployment_model", splits["test"], record_property)


def test_resume_after_sigkill(tmp_path, tiny_model_dir, record_property):
    """Kill training (SIGKILL) after its first checkpoint on the GPU; the re-run resumes and finishes."""
    from workflow_scripts.training.checkpoints import find_resume_checkpoint

    splits = formatted(tmp_path, tiny_model_dir)
    training = {**TRAINING, "max_steps": 300, "eval_steps": 150, "save_steps": 5}
    job = train_job(tmp_path / "out", splits, tiny_model_dir, training)
    script = (
        "import json, sys\nsys.path.insert(0, sys.argv[2])\n"
        "from workflow_scripts.logs import setup_logging\n"
        "from workflow_scripts.stage import Job\n"
        "from workflow_scripts.training import train\nkw = json.loads(open(sys.argv[1]).read())\n"
        "setup_logging(kw.pop('log'))\ntrain.run(Job(**kw))\n"
    )
    args_file, log_file = tmp_path / "job.json", tmp_path / "train.log"
    args_file.write_text(json.dumps({**job.to_dict(), "log": str(log_file)}))
    cmd = [sys.executable, "-c", script, str(args_file), str(REPO)]
    proc = subprocess.Popen(cmd)
    ckpts = Path(job.params.checkpoint_dir)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and find_resume_checkpoint(ckpts) is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("checkpoint-*")), "training should have written a checkpoint before the kill"
    assert not Path(job.output.adapter_dir).exists(), "a killed run must not leave an adapter"
    subprocess.run(cmd, check=True, timeout=240)
    assert "resuming from checkpoint-" in log_file.read_text()
    info = json.loads(Path(job.output.run_info).read_text())
    assert info["device"] == DEVICE
    resumed_step = int(info["resumed_from"].split("-")[1])
    record_property("resumed_from_step", resumed_step)
    record_property("train_peak_memory_mb", info["peak_memory_mb"])
    assert 0 < resumed_step < training["max_steps"]
    assert info["global_step"] == training["max_steps"]
    assert (Path(job.output.adapter_dir) / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- Gemma-3n, real vision tower
MM_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def save_gemma3n(path: Path) -> int:
    """A tiny Gemma-3n text stack and audio tower with the real (random) timm vision tower;
    returns the vision tower's parameter count."""
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
    )
    from transformers.models.gemma3n import Gemma3nAudioFeatureExtractor, Gemma3nProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *MM_TOKENS.values()]
    tok = train_bpe_tokenizer(
        specials,
        pad_token="<pad>",
        eos_token="<end_of_turn>",
        bos_token="<bos>",
        extra_special_tokens=MM_TOKENS,
    )
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
        vision_config=Gemma3nVisionConfig().to_dict(),  # the real one: timm mobilenetv5_300m_enc
        audio_config=audio.to_dict(),
    )
    torch.manual_seed(0)
    model = Gemma3nForConditionalGeneration(cfg)
    tower = model.model.vision_tower
    assert type(tower).__name__ == "TimmWrapperModel", type(tower)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessorPil(),
        tokenizer=tok,
        chat_template=GEMMA_TEMPLATE,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "manifest.json").write_text(json.dumps({"model_id": "tiny-gemma3n", "chat_template": "model"}))
    return sum(p.numel() for p in tower.parameters())


def test_gemma3n_real_vision_tower_train_merge_generate_bf16(tmp_path, record_property):
    if CUDA:
        import timm  # noqa: F401 - on the GPU machine a missing timm is a failure, not a skip
    else:
        pytest.importorskip("timm", exc_type=ImportError)
    from safetensors import safe_open

    from workflow_scripts.models import merge
    from workflow_scripts.training import train as train_stage

    model_dir = tmp_path / "gemma3n"
    vision_params = save_gemma3n(model_dir)
    record_property("vision_tower_params", vision_params)
    splits = formatted(tmp_path, model_dir)
    out = tmp_path / "out"
    job = train_job(out, splits, model_dir, {**TRAINING, "max_steps": 8, "eval_steps": 4, "save_steps": 4})
    check_trained(train_stage.run(job), job.output.metrics, record_property)
    with safe_open(str(out / "model" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("language_model" in k for k in keys), "LoRA must touch the language model only"
    report = merge.run(merge_job(out, splits, model_dir))
    record_property("max_logit_diff", report["max_logit_diff"])
    assert report["passed"] and report["model_class"] == "Gemma3nForConditionalGeneration"
    check_generation(out / "deployment_model", splits["test"], record_property)
