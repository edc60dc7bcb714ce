"""Fast batched generation: length-sorted batches, prefill without most padding, rows dropped early.

Plain ``model.generate`` pads every prompt of a batch to the longest one and keeps every row
until the longest answer finishes. Here prompts are sorted by length into batches; the prefix
all prompts of a batch share is encoded once; on a CPU, prompts of similar length are prefilled
together (prefill_groups) and their caches merged, left-padded, for decoding together; the KV
cache reserves room for the whole generation (ReservedLayer); and a row leaves the batch (and its
KV cache) the step it emits EOS. Position ids follow the attention mask, so greedy outputs equal
one-prompt-at-a-time generation (tested). Sampling (temperature, top_p) happens here too, and
`stream` hands one prompt's answer out as it grows (the chat command) on the same decode path.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, DynamicLayer

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


class ReservedLayer(DynamicLayer):
    """A full-attention KV cache layer that writes each step's keys and values into room reserved
    for the whole generation. The library's `DynamicLayer` concatenates the entire cache every step
    and layer; with FinQA-length prompts (~600 tokens) that copy costs as much as the step itself.
    Attention reads a view of the filled part, so what it computes is unchanged."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self.length = 0

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]
        return self.keys, self.values

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            self._keys = self._room(key_states, new + self.reserve)
            self._values = self._room(value_states, new + self.reserve)
        elif self.length + new > self._keys.shape[-2]:  # past the reserve (a longer run than planned)
            grow = max(new, self.reserve, 1)
            self._keys = torch.cat([self._keys, self._room(self._keys, grow)], dim=-2)
            self._values = torch.cat([self._values, self._room(self._values, grow)], dim=-2)
        self._keys[:, :, self.length : self.length + new] = key_states
        self._values[:, :, self.length : self.length + new] = value_states
        self.length += new
        return self._view()

    @staticmethod
    def _room(like: torch.Tensor, length: int) -> torch.Tensor:
        return like.new_zeros((like.shape[0], like.shape[1], length, like.shape[3]))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._view()


def new_cache(model, reserve: int):
    """The library's cache for this model, its plain full-attention layers reserving `reserve` tokens."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


# What one more prefill forward costs, in prompt tokens of work: on a 2-core AMD EPYC a forward of
# SmolLM2-135M takes ~120 ms plus ~2.6 ms per prompt token, so an extra forward pays only when it
# saves more than ~48 tokens of padding. On a GPU padding is nearly free and every forward costs
# launches, so a batch is prefilled as one there.
PREFILL_FORWARD_TOKENS = 48


def prefill_groups(lengths: list[int], forward_tokens: float = PREFILL_FORWARD_TOKENS) -> list[list[int]]:
    """Row indices split into prefill groups of similar length that minimise the work: each group
    costs `forward_tokens` plus its rows times its longest length (padding included). Exact over
    contiguous runs of the length-sorted rows (dynamic programming, n <= a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(sizes)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):  # rows i..j-1 form the last group
            cost = best[i] + forward_tokens + (j - i) * sizes[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(sizes)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def split_prefill(model, family: ModelFamily) -> bool:
    """Whether a batch is prefilled in length groups whose caches are then merged: on a CPU, with
    plain full-attention layers only (a sliding window counts padding as positions; other layer
    kinds keep state of their own)."""
    layers = new_cache(model, 0).layers
    return (
        model.device.type != "cuda"
        and family.sliding_window(model.config) is None
        and all(isinstance(x, ReservedLayer) for x in layers)
    )


@dataclass
class _Prefill:
    rows: list[int]
    cache: DynamicCache
    attn: torch.Tensor  # (rows, prompt positions incl. the shared prefix)
    logits: torch.Tensor  # (rows, vocabulary): the last prompt position's
    next_pos: torch.Tensor  # (rows,)


def _merge(parts: list[_Prefill], n: int, model, reserve: int):
    """One left-padded cache, mask, logits and positions for all rows of `parts`."""
    if len(parts) == 1:
        p = parts[0]
        return p.cache, p.attn, p.logits, p.next_pos
    width = max(p.attn.shape[1] for p in parts)
    device = parts[0].attn.device
    attn = torch.zeros((n, width), dtype=torch.long, device=device)
    logits = parts[0].logits.new_empty((n, parts[0].logits.shape[-1]))
    next_pos = torch.empty(n, dtype=torch.long, device=device)
    for p in parts:
        attn[p.rows, width - p.attn.shape[1] :] = p.attn
        logits[p.rows], next_pos[p.rows] = p.logits, p.next_pos
    cache = new_cache(model, reserve)
    for i, layer in enumerate(cache.layers):
        if not parts[0].cache.layers[i].is_initialized:
            continue
        merged = []
        for name in ("keys", "values"):
            first = getattr(parts[0].cache.layers[i], name)
            full = first.new_zeros((n, first.shape[1], width, first.shape[3]))
            for p in parts:
                kv = getattr(p.cache.layers[i], name)
                full[p.rows, :, width - kv.shape[-2] :] = kv
            merged.append(full)
        layer.update(*merged)
    return cache, attn, logits, next_pos


@torch.inference_mode()
def generate_batch(
    model,
    prompts: list[list[int]],
    pad_id: int,
    stop_ids: list[int],
    s: GenerationSettings,
    gen=None,
    family: ModelFamily | None = None,
    split: bool | None = None,
    on_token: Callable[[int, int], None] | None = None,
):
    """Token ids generated for each prompt (EOS excluded). `split`: prefill in length groups
    (default: where split_prefill allows it). `on_token(row, token id)` is called for every token
    the step it is generated (streaming)."""
    family = family or family_of(model.config)
    split = split_prefill(model, family) if split is None else split
    device = model.device
    n = len(prompts)
    cache_arg, extra = family.cache_kwarg(model), {"use_cache": True, **family.last_logits_kwargs(model)}
    # Prompts built from one template share a prefix (system prompt, chat tokens, table header):
    # encode it once and copy its KV cache to every row instead of recomputing it per row.
    shared = common_prefix_length(prompts) if (s.share_prefix and n > 1) else 0
    prefix_cache = None
    if shared >= MIN_SHARED_PREFIX:
        prefix_cache = new_cache(model, s.max_new_tokens)
        prefix = torch.tensor(prompts[0][:shared], device=device)[None]
        model(
            input_ids=prefix,
            position_ids=torch.arange(shared, device=device)[None],
            **extra,
            **{cache_arg: prefix_cache},
        )
    else:
        shared = 0
    suffixes = [p[shared:] for p in prompts]
    # Prefill prompts of similar length together (prefill_groups): on a CPU padding costs compute
    # (a quarter of the prefill on FinQA-length prompts) and keeps attention off its causal fast
    # path. The groups' caches are then merged, left-padded, for decoding together. Only plain
    # full-attention caches can be merged; a sliding window (or any other layer kind) prefills the
    # batch as one, padded, as does a GPU.
    parts = []
    for rows in prefill_groups([len(x) for x in suffixes]) if split else [list(range(n))]:
        if prefix_cache is None:
            cache = new_cache(model, s.max_new_tokens)
        elif len(rows) == n:
            cache = prefix_cache
            cache.batch_repeat_interleave(n)
        else:
            cache = new_cache(model, s.max_new_tokens)
            for layer, pre in zip(cache.layers, prefix_cache.layers, strict=True):
                if pre.is_initialized:
                    layer.update(*(t.expand(len(rows), -1, -1, -1) for t in (pre.keys, pre.values)))
        width = max(len(suffixes[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), shared + width), dtype=torch.long)
        attn[:, :shared] = 1
        for j, i in enumerate(rows):
            input_ids[j, width - len(suffixes[i]) :] = torch.tensor(suffixes[i])
            attn[j, shared + width - len(suffixes[i]) :] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        # positions follow the real tokens: padding sits between the shared prefix and each suffix
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        out = model(
            input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **extra, **{cache_arg: cache}
        )
        parts.append(_Prefill(rows, cache, attn, out.logits[:, -1], position_ids[:, -1] + 1))
    cache, attn, logits, next_pos = _merge(parts, n, model, s.max_new_tokens)
    fwd = {cache_arg: cache, **extra}
    stop = torch.tensor(stop_ids, device=device)
    active = torch.arange(n, device=device)
    results: list[list[int]] = [[] for _ in range(n)]
    for step in range(s.max_new_tokens):
        token = _pick(logits, s, gen)
        done = torch.isin(token, stop)
        for row, t, d in zip(active.tolist(), token.tolist(), done.tolist(), strict=True):
            if not d:
                results[row].append(t)
                if on_token is not None:
                    on_token(row, t)
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


def stream(
    model,
    tok,
    prompt_ids: list[int],
    s: GenerationSettings,
    emit: Callable[[str], None],
    stop_ids: list[int] | None = None,
    family: ModelFamily | None = None,
) -> list[int]:
    """Generate for one prompt on generate_batch's path, calling ``emit(text)`` with each new piece
    of the answer as it grows: a half-decoded character, or text a later token could still change,
    is held back until it settles. Returns the token ids (EOS excluded): greedy, they are the ids
    `generate` gives the same prompt (the same decode path, one row)."""
    stop_ids = stop_ids if stop_ids is not None else eos_ids(model, tok)
    gen = torch.Generator(device=model.device).manual_seed(s.seed) if s.do_sample else None
    ids: list[int] = []
    shown = ""

    def show(text: str) -> None:
        nonlocal shown
        if text.startswith(shown) and len(text) > len(shown):
            emit(text[len(shown) :])
            shown = text

    def on_token(row: int, token: int) -> None:
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            show(text)

    model.eval()
    pad_id = stop_ids[0]  # one row is never padded
    (out,) = generate_batch(model, [prompt_ids], pad_id, stop_ids, s, gen, family, on_token=on_token)
    show(tok.decode(out, skip_special_tokens=True))
    return out


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


def check_context_window(model, family: ModelFamily, lengths: list[int], max_new_tokens: int) -> None:
    """The longest prompt plus max_new_tokens fits the model's context window, so the KV cache a
    batch reserves (prompt + max_new_tokens) is bounded by the window; one line before any work."""
    from workflow_scripts.stage import StageError

    window = getattr(family.text_config(model.config), "max_position_embeddings", None)
    longest = max(lengths, default=0)
    if isinstance(window, int) and longest + max_new_tokens > window:
        raise StageError(
            f"evaluation.max_new_tokens: {max_new_tokens} new tokens after the longest prompt "
            f"({longest} tokens) exceed the model's context window ({window} tokens); lower it to "
            f"{max(window - longest, 0)} or less"
        )


def generate(model, tok, prompt_texts: list[str], s: GenerationSettings, progress=True) -> dict:
    """Generate for every prompt; returns texts, token counts and timing, in the input order."""
    from tqdm.auto import tqdm

    model.eval()
    family = family_of(model.config)
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    check_context_window(model, family, [len(e) for e in encoded], s.max_new_tokens)
    window = family.sliding_window(model.config)
    batches = make_batches([len(e) for e in encoded], s.batch_size, s.max_new_tokens, window)
    split = split_prefill(model, family)
    stop_ids = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    gen = torch.Generator(device=model.device).manual_seed(s.seed) if s.do_sample else None
    outputs: list[list[int]] = [[] for _ in encoded]
    t0 = time.perf_counter()
    bar = tqdm(total=len(encoded), desc="generate", disable=not progress, mininterval=5)
    for batch in batches:
        for i, ids in zip(
            batch,
            generate_batch(model, [encoded[i] for i in batch], pad_id, stop_ids, s, gen, family, split),
            strict=True,
        ):
            outputs[i] = ids
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(o) for o in outputs)
    return {
        "path": {
            "generator": "snaketune",
            "prefill": "length groups, merged" if split else "one padded batch",
            "shared_prefix": s.share_prefix,
            "batches": len(batches),
        },
        "texts": [tok.decode(o, skip_special_tokens=True) for o in outputs],
        "token_ids": outputs,
        "generated_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
    }
