"""bf16 compute on the trainable path (training/bf16_compute.py): the same model, loss and
gradients as PEFT's fp32 LoRA path and SDPA, to bf16's precision, and the same saved adapter."""

import copy

import pytest
import torch
from helpers import build_tiny_llama, tiny_gemma3_text

from workflow_scripts.training import bf16_compute


def tiny(kind: str):
    """A tiny model of ``kind`` (a vocabulary of 64): its every projection gets an adapter."""
    import transformers

    if kind == "llama":
        return build_tiny_llama(64)
    if kind == "gemma3":  # a sliding window shorter than the batch: a real boolean mask
        return tiny_gemma3_text()
    torch.manual_seed(0)  # Qwen2: biases on q/k/v, the base layer's bias on the bf16 path
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.Qwen2ForCausalLM(config)


def lora(model, dtype):
    from peft import LoraConfig, get_peft_model

    model = model.to(dtype)
    # init_lora_weights=False: B is random too, so the adapter changes the output from step 0
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def loss_and_grads(model, ids, mask=None):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), out.loss.item(), grads


def errors(model, truth, ids, mask=None, autocast: bool = False) -> tuple[float, list[float]]:
    """Relative errors of ``model``'s logits and each gradient against ``truth`` (the same weights
    in fp32): bf16 cannot be exact, so each bf16 path is held to what the established bf16 path
    achieves (PEFT's LoRA under autocast; SDPA). ``autocast``: run ``model`` (not ``truth``) under
    bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, _, grads = loss_and_grads(model, ids, mask)
    true_logits, _, true_grads = loss_and_grads(truth, ids, mask)
    keep = (mask if mask is not None else torch.ones_like(ids)).bool()  # padded positions are anything

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert grads.keys() == true_grads.keys()
    return rel(logits[keep], true_logits[keep]), [rel(grads[n], true_grads[n]) for n in sorted(grads)]


def no_worse(fast: tuple[float, list[float]], reference: tuple[float, list[float]]) -> bool:
    (logits, grads), (ref_logits, ref_grads) = fast, reference
    mean, ref_mean = sum(grads) / len(grads), sum(ref_grads) / len(ref_grads)
    return logits < 1.25 * ref_logits and mean < 1.25 * ref_mean and max(grads) < 1.5 * max(ref_grads)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_bf16_lora_compute_is_as_close_to_fp32_as_autocast_and_keeps_the_adapter(kind):
    reference = lora(tiny(kind), torch.bfloat16)
    truth = copy.deepcopy(reference).float()
    fast = copy.deepcopy(reference)
    keys = {k: v.dtype for k, v in fast.state_dict().items()}
    assert bf16_compute.use_bf16_lora_compute(fast) == 7 * 2  # every projection of 2 layers
    assert {k: v.dtype for k, v in fast.state_dict().items()} == keys  # same names, LoRA still fp32
    ids = torch.randint(0, 64, (2, 24))
    # held to PEFT's LoRA in bf16 the established way: under autocast
    assert no_worse(errors(fast, truth, ids), errors(reference, truth, ids, autocast=True))
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)


def test_bf16_lora_compute_leaves_fp32_and_disabled_adapters_to_peft():
    reference = lora(tiny("llama"), torch.float32)
    fast = copy.deepcopy(reference)
    bf16_compute.use_bf16_lora_compute(fast)
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(fast(input_ids=ids).logits, reference(input_ids=ids).logits)  # fp32: PEFT's own path
    with fast.disable_adapter(), reference.disable_adapter():
        assert torch.equal(fast(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_small_eager_attention_is_as_close_to_fp32_as_sdpa_with_and_without_masks(kind, monkeypatch):
    sdpa = tiny(kind).to(torch.bfloat16)
    truth = copy.deepcopy(sdpa).float()
    eager = copy.deepcopy(sdpa)
    bf16_compute.use_small_eager_attention(eager)
    for model in (sdpa, eager, truth):
        model.lm_head.weight.requires_grad_(False)  # gradients of the decoder's weights, as under LoRA
        model.model.embed_tokens.weight.requires_grad_(False)
    calls = []
    real = bf16_compute.sdpa_attention_forward
    monkeypatch.setattr(
        bf16_compute, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ids = torch.randint(0, 64, (2, 20))
    padded = torch.ones_like(ids)
    padded[1, 14:] = 0  # a right-padded row: a boolean mask reaches the attention
    for mask in (None, padded):
        assert no_worse(errors(eager, truth, ids, mask), errors(sdpa, truth, ids, mask))
    assert calls == []  # small calls: the plain path every time
    monkeypatch.setattr(bf16_compute, "EAGER_MAX_SCORES", 0)
    eager(input_ids=ids)
    assert calls == [1, 1]  # above the bound, every call (one per layer) goes to SDPA
