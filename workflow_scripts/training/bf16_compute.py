"""bf16 compute on the trainable path, where the frozen weights are bf16 (training.fast_path).

With bf16 frozen weights the activations are bf16, but PEFT keeps the LoRA weights in fp32 and
casts every LoRA input up to fp32 and the result back: two casts per adapted layer and pass (a
tenth of a step on an AMX Xeon, benchmarks/README.md) and fp32 matmuls beside bf16 ones.
`bf16_lora_compute` runs LoRA's two matmuls in the activations' dtype over its fp32 weights
instead (each weight cast once per pass, a [r x d] matrix): the optimizer still updates fp32
weights and their gradients arrive in fp32, as under autocast.

`eager_small_attention` (CPU): torch's flash-attention kernel for CPU has a slow bf16 backward at
the short lengths of fine-tuning data, where plain bf16 matmuls + softmax are faster; larger score
matrices (and everything else) go to SDPA, whose memory stays linear in the length.
"""

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

# Attention scores per call (batch x heads x queries x keys) up to which the plain path runs:
# around 3M the two paths were even on an AMX Xeon, above it SDPA's flash kernel won (up to 1.7x
# at 4-5M; benchmarks/README.md), and the plain path's scores and probabilities (kept for the
# backward) grow with the square of the length: 3M bf16 scores are ~12 MB a layer.
EAGER_MAX_SCORES = 3_000_000
SMALL_ATTENTION = "snaketune_small_eager"


def small_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention as plain bf16 matmuls + softmax for small CPU bf16 calls, else SDPA.
    Masks arrive as SDPA's (registered below): None (causal, nothing else) or a boolean
    [batch, 1, q, kv] mask of the positions to attend (padding, packing, sliding windows)."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    small = batch * heads * q_len * kv_len <= EAGER_MAX_SCORES
    plain = attention_mask is None or attention_mask.dtype == torch.bool
    cpu_bf16 = query.device.type == "cpu" and query.dtype == torch.bfloat16
    if not (small and plain and cpu_bf16) or kwargs.get("softcap"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    lowest = torch.finfo(query.dtype).min  # not -inf: a fully masked row gives uniform weights, not NaN
    if attention_mask is None:  # causal, the queries being the last q_len of kv_len positions
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        bias = torch.zeros(q_len, kv_len, dtype=query.dtype, device=query.device).masked_fill(~causal, lowest)
        scores = torch.baddbmm(bias, query.flatten(0, 1), key.flatten(0, 1).transpose(1, 2), alpha=scale)
        scores = scores.view(batch, heads, q_len, kv_len)
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        scores = scores.masked_fill(~attention_mask, lowest)
    # bf16 in and out, fp32 inside (torch's CPU kernel): the same weights as an fp32 softmax cast
    # to bf16, without the cast and its [batch, heads, q, kv] fp32 copy (half the softmax's time)
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_small_eager_attention(model) -> None:
    """Switch a transformers model to `small_eager_attention` (masks built as for SDPA)."""
    AttentionInterface.register(SMALL_ATTENTION, small_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SMALL_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SMALL_ATTENTION)


class Bf16ComputeLinear(LoraLinear):
    """PEFT's LoRA Linear whose adapter matmuls run in the input's dtype (see the module doc);
    anything but one plain active adapter on an unmerged layer takes PEFT's own forward."""

    def forward(self, x, *args, **kwargs):
        active = self.active_adapters
        if (
            x.dtype == torch.float32
            or self.disable_adapters
            or self.merged
            or args
            or kwargs
            or len(active) != 1
            or active[0] not in self.lora_A
            or active[0] in self.lora_variant
        ):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        result = self.base_layer(x)
        a = self.lora_A[name].weight.to(x.dtype)
        b = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype)
        return result + F.linear(F.linear(self.lora_dropout[name](x), a), b)


def use_bf16_lora_compute(peft_model) -> int:
    """Give every plain LoRA Linear of ``peft_model`` bf16 compute; returns how many. The
    parameters, their names and so the saved adapter are unchanged (only the class is)."""
    n = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear:
            module.__class__ = Bf16ComputeLinear
            n += 1
    return n


def compile_decoder_layers(model, backend: str | None, mode: str | None) -> int:
    """`torch.compile` each decoder layer of ``model`` in place (dynamic shapes: batches differ in
    length), for `training.torch_compile`. The Trainer's own would compile a wrapper that the
    labels-only loss goes around (it calls the decoder and head itself), so would change nothing.
    The layers share one compiled graph. Returns how many were compiled."""
    options = {k: v for k, v in (("backend", backend), ("mode", mode)) if v}  # unset: torch.compile's own
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=True, **options)
    return len(layers)
