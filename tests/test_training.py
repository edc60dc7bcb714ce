"""Training: assistant-only labels, packing isolation, labels-only loss, resume, merge."""

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
from helpers import REPO, build_tiny_llama, merge_job, with_defaults, write_formatted
from helpers import train_job as make_train_job

from workflow_scripts.data.tokens import TokensWriter, open_tokens
from workflow_scripts.models.loading import load_chat_formatter
from workflow_scripts.stage import Job, StageError
from workflow_scripts.training import train as train_stage
from workflow_scripts.training.checkpoints import find_resume_checkpoint, prepare_checkpoint_dir
from workflow_scripts.training.data import IGNORE, Collator, pack_rows
from workflow_scripts.training.trainer import labels_only_loss


@pytest.fixture
def formatted(tmp_path, tiny_model_dir, tiny_tokenizer):
    return write_formatted(tmp_path, load_chat_formatter(tiny_model_dir), tiny_tokenizer)


def examples_of(path: str, n: int | None = None) -> list[dict]:
    """The first ``n`` rows of a token file, as the trainer hands them to the collator."""
    ds = open_tokens(path)
    return list(ds.select(range(n)) if n is not None else ds)


def old_labels(ex: dict) -> list[int]:
    """The labels before the collator made them: -100 over the prompt (load_examples), then the
    first token of the example -100 (the collator)."""
    ids, p = list(ex["input_ids"]), int(ex["prompt_length"])
    labels = [IGNORE] * p + ids[p:]
    return [IGNORE] + labels[1:]


def test_labels_cover_assistant_tokens_only(formatted, tiny_tokenizer):
    frame = pd.read_parquet(formatted["train"])
    examples = examples_of(formatted["train_tokens"], 4)
    batch = Collator(tiny_tokenizer.pad_token_id, pack=False)(examples)
    for r in range(4):
        n_prompt = int(frame["prompt_length"].iloc[r])
        ids = list(frame["input_ids"].iloc[r])
        labels = batch["labels"][r]
        assert (labels[:n_prompt] == IGNORE).all(), "prompt/system tokens must be masked"
        assert labels[n_prompt : len(ids)].tolist() == ids[n_prompt:], "assistant tokens must be targets"
        assert (labels[len(ids) :] == IGNORE).all(), "padding must be masked"
        supervised = tiny_tokenizer.decode(labels[labels != IGNORE])
        assert supervised == frame["completion_text"].iloc[r]
        assert "<|im_start|>user" not in supervised and "Answer." not in supervised


def test_packed_rows_restart_positions_and_mask_example_starts(formatted, tiny_tokenizer):
    examples = examples_of(formatted["train_tokens"], 6)
    lengths = [len(e["input_ids"]) for e in examples]
    capacity = max(lengths) * 2
    batch = Collator(tiny_tokenizer.pad_token_id, pack=True, max_length=capacity)(examples)
    assert batch["input_ids"].shape[0] < len(examples)
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        for s in starts:
            assert batch["labels"][row, s] == IGNORE
    assert sum(len(r) for r in pack_rows(lengths, capacity)) == len(examples)
    assert batch["labels"].ne(IGNORE).sum() == sum(
        sum(1 for x in old_labels(e) if x != IGNORE) for e in examples
    )


@pytest.mark.parametrize("pack", [False, True])
def test_collator_labels_follow_the_old_rule(formatted, tiny_tokenizer, tmp_path, pack):
    """The collator's labels on token-file rows are the old ones: -100 over the prompt, the ids
    after it, the first token -100 (edge cases too: no prompt, a prompt that is everything)."""
    edge = tmp_path / "edge.tokens.arrow"
    writer = TokensWriter(edge)
    writer.write([[5, 6, 7], [8, 9], [10]], [0, 2, 1])
    writer.close()
    examples = examples_of(formatted["train_tokens"]) + examples_of(str(edge))
    assert {"input_ids", "prompt_length", "length"} <= set(examples[0])
    lengths = [len(e["input_ids"]) for e in examples]
    collator = Collator(tiny_tokenizer.pad_token_id, pack=pack, max_length=max(lengths) * 2 if pack else None)
    batch = collator(examples)
    groups = pack_rows(lengths, max(lengths) * 2) if pack else [[i] for i in range(len(examples))]
    assert batch["labels"].shape[0] == len(groups)
    for r, group in enumerate(groups):
        ids = [t for i in group for t in examples[i]["input_ids"]]
        labels = [x for i in group for x in old_labels(examples[i])]
        assert batch["input_ids"][r, : len(ids)].tolist() == ids
        assert batch["labels"][r, : len(ids)].tolist() == labels
        assert (batch["labels"][r, len(ids) :] == IGNORE).all()
    assert collator.real_tokens == sum(lengths)


def test_open_tokens_memory_maps_the_file(formatted):
    from datasets.table import MemoryMappedTable

    ds = open_tokens(formatted["train_tokens"])
    assert isinstance(ds.data, MemoryMappedTable), "the token file must be memory-mapped, not read in"
    assert [f["filename"] for f in ds.cache_files] == [formatted["train_tokens"]]
    frame = pd.read_parquet(formatted["train"], columns=["input_ids", "prompt_length"])
    assert ds["length"][:] == [len(ids) for ids in frame["input_ids"]]
    assert ds["prompt_length"][:] == frame["prompt_length"].tolist()


def per_example_losses(model, batch) -> list[float]:
    """Sum of token losses per example (examples identified by position-id restarts)."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    losses = []
    for row in range(logits.shape[0]):
        tok_loss = torch.nn.functional.cross_entropy(
            logits[row, :-1], batch["labels"][row, 1:], ignore_index=IGNORE, reduction="none"
        )
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [logits.shape[1]]
        for a, b in zip(starts[:-1], starts[1:], strict=False):
            if batch["labels"][row, a:b].ne(IGNORE).any():
                losses.append(float(tok_loss[a : b - 1].sum()))
    return losses


def test_packing_isolates_examples(formatted, tiny_tokenizer):
    """Packed and unpacked per-example losses match: attention never crosses examples."""
    model = build_tiny_llama(len(tiny_tokenizer)).eval()
    examples = examples_of(formatted["train_tokens"], 6)
    cap = max(len(e["input_ids"]) for e in examples) * 3
    packed = Collator(tiny_tokenizer.pad_token_id, pack=True, max_length=cap)(examples)
    assert (packed["position_ids"] == 0).sum(1).max() > 1, "the test must pack several examples into a row"
    unpacked = [per_example_losses(model, Collator(tiny_tokenizer.pad_token_id)([e]))[0] for e in examples]
    packed_losses = per_example_losses(model, packed)
    assert sorted(packed_losses) == pytest.approx(sorted(unpacked), rel=1e-4)


def test_labels_only_loss_equals_full_logits_loss(formatted, tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    batch = Collator(tiny_tokenizer.pad_token_id)(examples_of(formatted["train_tokens"], 4))
    loss, stats = labels_only_loss(model, dict(batch))
    full = model(**batch, use_cache=False).loss
    assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert stats["n"] == int(batch["labels"][:, 1:].ne(IGNORE).sum())


def test_target_modules_missing_lists_the_model_modules(tiny_model_dir):
    with pytest.raises(StageError, match=r"peft.target_modules: \['qkv'\] not found.*'q_proj'"):
        train_stage.build_peft_model(
            str(tiny_model_dir), {"r": 4, "target_modules": ["qkv"]}, torch.float32, "cpu"
        )


def make_checkpoint(root: Path, step: int, complete: bool = True):
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(ckpt / "adapter_model.safetensors"))
        torch.save({}, ckpt / "optimizer.pt")
        torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    else:
        (ckpt / "adapter_model.safetensors").write_bytes(b"\x00\x01 truncated")
    return ckpt


def test_partial_newest_checkpoint_is_skipped(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10, complete=False)
    assert find_resume_checkpoint(tmp_path).name == "checkpoint-5"


def test_changed_config_starts_fresh(tmp_path):
    root = tmp_path / "checkpoints"
    assert prepare_checkpoint_dir(root, "fp-a") is None
    make_checkpoint(root, 5)
    assert prepare_checkpoint_dir(root, "fp-a").name == "checkpoint-5"
    assert prepare_checkpoint_dir(root, "fp-b") is None
    assert not list(root.glob("checkpoint-*"))


TRAINING = {
    "max_length": 4096,
    "overlength": "drop",
    "learning_rate": 0.01,
    "max_steps": 40,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 20,
    "save_steps": 4,
    "save_total_limit": 2,
    "seed": 1,
    "report_to": ["none"],
    "fast_path": {
        "group_by_length": True,
        "packing": True,
        "labels_only_logits": True,
        "bf16_frozen_weights": True,
    },
}
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def train_job(tmp_path, formatted, model_dir, training=TRAINING) -> Job:
    return make_train_job(tmp_path / "out", formatted, model_dir, training, PEFT)


def test_train_writes_adapter_metrics_and_run_info(tmp_path, formatted, tiny_model_dir):
    job = train_job(tmp_path, formatted, tiny_model_dir, {**TRAINING, "max_steps": 12})
    summary = train_stage.run(job)
    adapter = Path(job.output.adapter_dir)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    metrics = pd.read_csv(job.output.metrics)
    assert {"step", "loss", "eval_loss", "learning_rate", "tokens_per_s"} <= set(metrics.columns)
    losses = metrics["loss"].dropna().tolist()
    assert losses[-1] < losses[0], "a tiny model at lr 1e-2 must reduce its loss in 12 steps"
    assert metrics["eval_loss"].notna().any()
    info = json.loads(Path(job.output.run_info).read_text())
    assert info["global_step"] == 12 and info["versions"]["trl"] and info["real_tokens_seen_this_run"] > 0
    assert Path(job.output.loss_plot).stat().st_size > 1000
    assert summary["resumed_from"] is None


def test_resume_after_sigkill(tmp_path, formatted, tiny_model_dir):
    """Kill training (SIGKILL) after its first checkpoint; the re-run resumes and finishes."""
    # 56 steps (~2 s alone on 2 cores) after checkpoint-4 for the 20 ms poll to kill it part-way
    training = {**TRAINING, "max_steps": 60, "eval_steps": 30}
    job = train_job(tmp_path, formatted, tiny_model_dir, training)
    script = (
        "import json, sys\nsys.path.insert(0, sys.argv[2])\n"
        "from workflow_scripts.logs import setup_logging\n"
        "from workflow_scripts.stage import Job\n"
        "from workflow_scripts.training import train\nkw = json.loads(open(sys.argv[1]).read())\n"
        "setup_logging(kw.pop('log'))\ntrain.run(Job(**kw))\n"
    )
    args_file = tmp_path / "kw.json"
    log_file = tmp_path / "train.log"
    args_file.write_text(json.dumps({**job.to_dict(), "log": str(log_file)}))
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", script, str(args_file), str(REPO)], env=env)
    ckpts = Path(job.params.checkpoint_dir)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and find_resume_checkpoint(ckpts) is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("checkpoint-*")), "training should have written a checkpoint before the kill"
    assert not Path(job.output.adapter_dir).exists(), (
        "killed run must not leave an adapter that looks complete"
    )
    subprocess.run([sys.executable, "-c", script, str(args_file), str(REPO)], env=env, check=True)
    text = log_file.read_text()
    assert "resuming from checkpoint-" in text
    info = json.loads(Path(job.output.run_info).read_text())
    resumed_step = int(info["resumed_from"].split("-")[1])
    assert 0 < resumed_step < training["max_steps"]
    assert info["global_step"] == training["max_steps"]
    assert (Path(job.output.adapter_dir) / "adapter_model.safetensors").is_file()


def test_merge_equals_base_plus_adapter(tmp_path, formatted, tiny_model_dir):
    """Merge a trained (non-trivial) adapter; the reloaded merged model matches base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workflow_scripts.models import merge

    job = train_job(tmp_path, formatted, tiny_model_dir, {**TRAINING, "max_steps": 6})
    train_stage.run(job)
    # make the adapter clearly non-zero so equality is not trivial
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), job.output.adapter_dir
    )
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter.save_pretrained(job.output.adapter_dir)
    out = tmp_path / "deployment_model"
    report = merge.run(merge_job(tiny_model_dir, job, formatted["test"], out))
    assert report["passed"] and report["max_logit_diff"] <= 1e-3
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["max_logit_diff"] == report["max_logit_diff"]
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = max(
        float((a - b).abs().max())
        for (_, a), (_, b) in zip(plain.named_parameters(), base.named_parameters(), strict=False)
    )
    assert diff > 1e-3, "the merged weights must differ from the base weights"
    assert "Merge check" in (out / "README.md").read_text()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template


def test_two_process_training_saves_the_adapter_once(tmp_path, formatted, tiny_model_dir):
    """training.num_processes=2 runs DDP (gloo, CPU) through accelerate launch."""
    training = {**TRAINING, "max_steps": 10, "eval_steps": 10, "save_steps": 5, "num_processes": 2}
    job = train_job(tmp_path, formatted, tiny_model_dir, training)
    summary = train_stage.run(job)
    assert summary["setup"]["world_size"] == 2
    assert summary["global_step"] == 10
    out = Path(job.output.adapter_dir).parent
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "model", "training"]
    assert (out / "model" / "adapter_model.safetensors").is_file()
    losses = pd.read_csv(job.output.metrics)["loss"].dropna().tolist()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("fast_bf16", "pinned", "policy"),
    [
        # the schema's defaults where bf16 is fast
        (True, False, "bf16 frozen weights, bf16 LoRA compute over fp32 LoRA weights"),
        (True, True, "fp32"),  # config.yaml's demo pin on a bf16 CPU: said once
        (False, False, "fp32"),  # AVX2 only: fp32 whatever the config says
    ],
)
def test_the_dtype_policy_is_named_and_a_pinned_fp32_is_said_once(
    tmp_path, formatted, tiny_model_dir, monkeypatch, caplog, fast_bf16, pinned, policy
):
    from workflow_scripts.training import train as train_module

    monkeypatch.setattr(train_module, "bf16_is_fast", lambda device: fast_bf16)
    monkeypatch.setattr(train_module, "bf16_speed", lambda device: (fast_bf16, 0.001, 0.004))
    fast_path = {**TRAINING["fast_path"], "bf16_frozen_weights": not pinned}
    training = with_defaults(
        "training", {**TRAINING, "fast_path": fast_path, **({"bf16": False} if pinned else {})}
    )
    with caplog.at_level("WARNING", logger="snaketune"):
        _, _, info = train_module.build_trainer(
            formatted["train_tokens"],
            formatted["validation_tokens"],
            str(tiny_model_dir),
            training,
            PEFT,
            tmp_path / "ckpt",
            ["none"],
            "cpu",
        )
    assert info["dtype_policy"] == policy and info["fp32_pinned_on_fast_bf16"] == (fast_bf16 and pinned)
    said = [r.getMessage() for r in caplog.records if "pin fp32" in r.getMessage()]
    if fast_bf16 and pinned:
        assert said == [
            "this CPU runs bf16 fast (its bf16 matmul 4.0x as fast as fp32), but training.bf16: false and "
            "training.fast_path.bf16_frozen_weights: false pin fp32 (config.yaml does, for digit-exact demo "
            "numbers): drop both lines for bf16"
        ]
    else:
        assert said == []


def test_torch_compile_compiles_the_decoder_layers_and_trains_as_uncompiled(
    tmp_path, formatted, tiny_model_dir
):
    """`training.torch_compile` takes effect (the Trainer's own would compile a wrapper the
    labels-only loss goes around): the decoder layers run compiled, with the same losses. A
    backend alone asks for it too (as in TrainingArguments); aot_eager traces forward and
    backward as inductor does, without inductor's C++ build (~40 s cold on 2 cores)."""
    from workflow_scripts.training import train as train_module

    losses, infos = {}, {}
    for compile_ in (False, True):
        training = with_defaults(
            "training",
            {
                **TRAINING,
                "max_steps": 3,
                "eval_strategy": "no",
                "save_strategy": "no",
                **({"torch_compile_backend": "aot_eager"} if compile_ else {}),
            },
        )
        trainer, _, infos[compile_] = train_module.build_trainer(
            formatted["train_tokens"],
            formatted["validation_tokens"],
            str(tiny_model_dir),
            training,
            PEFT,
            tmp_path / f"ckpt-{compile_}",
            ["none"],
            "cpu",
        )
        assert not trainer.args.torch_compile  # compiled by snaketune, not wrapped again by the Trainer
        trainer.train()
        losses[compile_] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        layers = trainer.model.get_base_model().model.layers
        assert all((layer._compiled_call_impl is not None) == compile_ for layer in layers)
    assert infos[True]["compiled_decoder_layers"] == 2 and infos[False]["compiled_decoder_layers"] == 0
    # the same to rounding: compiled kernels order bf16 (where this CPU runs it) and fp32 sums differently
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
