"""Fast batched generation: length-sorted, left-padded batches, finished rows dropped early.

Plain ``model.generate`` keeps every row of a batch until the longest one finishes, so one
rambling answer makes the whole batch decode to ``max_new_tokens``. Here a row leaves the
batch (and its KV cache is sliced away) the step it emits EOS, and prompts are sorted by
length so a batch holds little padding. Position ids follow the attention mask, so greedy
outputs equal one-prompt-at-a-time generation (tested).
"""

import logging
import time
from dataclasses import dataclass

import torch

from workflow_scripts.models.families import ModelFamily, family_of

log = logging.getLogger("snaketune.generate")


@dataclass
class GenerationSettings:
    """The generation keys of the `evaluation` section (their defaults are the schema's)."""

    max_new_tokens: int
    batch_size: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    share_prefix: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "GenerationSettings":
        """From a resolved `evaluation` section (other keys are ignored)."""
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


def eos_ids(model, tok) -> list[int]:
    ids = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for v in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if v is not None:
            ids.add(int(v))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def _pick(logits: torch.Tensor, s: GenerationSettings, gen: torch.Generator | None) -> torch.Tensor:
    if not s.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, -1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


MIN_SHARED_PREFIX = 8  # below this, a separate prefix pass costs more than it saves


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens all prompts share at the start, leaving each at least one token of its own."""
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


@torch.inference_mode()
def generate_batch(
    model,
    prompts: list[list[int]],
    pad_id: int,
    stop_ids: list[int],
    s: GenerationSettings,
    gen=None,
    family: ModelFamily | None = None,
):
    """Token ids generated for each prompt (EOS excluded)."""
    from transformers import DynamicCache

    family = family or family_of(model.config)
    device = model.device
    n = len(prompts)
    cache = DynamicCache(config=model.config)
    # the cache argument's name, and logits of the last position only (where the model has it)
    fwd = {family.cache_kwarg(model): cache, "use_cache": True, **family.last_logits_kwargs(model)}
    # Prompts built from one template share a prefix (system prompt, chat tokens, table header):
    # encode it once and copy its KV cache to every row instead of recomputing it per row.
    shared = common_prefix_length(prompts) if (s.share_prefix and n > 1) else 0
    if shared >= MIN_SHARED_PREFIX:
        prefix = torch.tensor(prompts[0][:shared], device=device)[None]
        model(input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], **fwd)
        cache.batch_repeat_interleave(n)
    else:
        shared = 0
    suffixes = [p[shared:] for p in prompts]
    width = max(len(p) for p in suffixes)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, shared + width), dtype=torch.long)
    attn[:, :shared] = 1
    for i, p in enumerate(suffixes):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, shared + width - len(p) :] = 1
    input_ids, attn = input_ids.to(device), attn.to(device)
    # positions follow the real tokens: padding sits between the shared prefix and each suffix
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **fwd)
    logits = out.logits[:, -1]
    next_pos = position_ids[:, -1] + 1
    stop = torch.tensor(stop_ids, device=device)
    active = torch.arange(n, device=device)
    results: list[list[int]] = [[] for _ in range(n)]
    for step in range(s.max_new_tokens):
        token = _pick(logits, s, gen)
        done = torch.isin(token, stop)
        for row, t, d in zip(active.tolist(), token.tolist(), done.tolist(), strict=True):
            if not d:
                results[row].append(t)
        if step == s.max_new_tokens - 1:
            break
        keep = ~done
        if not bool(keep.any()):
            break
        if not bool(keep.all()):  # drop finished rows: no more compute spent on them
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            attn, token, next_pos, active = attn[idx], token[idx], next_pos[idx], active[idx]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos[:, None], **fwd)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return results


def make_batches(
    lengths: list[int], batch_size: int, max_new_tokens: int, window: int | None
) -> list[list[int]]:
    """Length-sorted batches of prompt indices. A sliding window counts padding slots as positions,
    so when a padded sequence could outgrow the window, a batch only holds prompts of one length
    (no padding): outputs then stay identical to one-prompt-at-a-time generation."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        exact = window is not None and lengths[i] + max_new_tokens > window
        if last and len(last) < batch_size and (not exact or lengths[last[0]] == lengths[i]):
            last.append(i)
        else:
            batches.append([i])
    return batches


def generate(model, tok, prompt_texts: list[str], s: GenerationSettings, progress=True) -> dict:
    """Generate for every prompt; returns texts, token counts and timing, in the input order."""
    from tqdm.auto import tqdm

    model.eval()
    family = family_of(model.config)
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    window = family.sliding_window(model.config)
    batches = make_batches([len(e) for e in encoded], s.batch_size, s.max_new_tokens, window)
    stop_ids = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    gen = torch.Generator(device=model.device).manual_seed(s.seed) if s.do_sample else None
    outputs: list[list[int]] = [[] for _ in encoded]
    t0 = time.perf_counter()
    bar = tqdm(total=len(encoded), desc="generate", disable=not progress, mininterval=5)
    for batch in batches:
        for i, ids in zip(
            batch,
            generate_batch(model, [encoded[i] for i in batch], pad_id, stop_ids, s, gen, family),
            strict=True,
        ):
            outputs[i] = ids
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(o) for o in outputs)
    return {
        "texts": [tok.decode(o, skip_special_tokens=True) for o in outputs],
        "token_ids": outputs,
        "generated_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
    }
