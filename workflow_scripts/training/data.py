"""The collator: labels on assistant tokens only, optional isolated packing.

Training reads the token files format_dataset writes (``{split}.tokens.arrow``, memory-mapped by
``workflow_scripts.data.tokens.open_tokens``): every example is a row
``{"input_ids": prompt_ids + completion_ids, "prompt_length": len(prompt_ids), "length": ...}``
(extra keys are ignored). The collator makes the labels: ``-100`` over the prompt, so the loss
covers the assistant's tokens and nothing else, and the first token of an example is never a target.

The collator right-pads, or packs several examples into one row with position ids restarting
at 0 for each example. It never returns an attention mask: with right padding the causal
mask already keeps real tokens from seeing padding, and for packed rows transformers derives
a block-diagonal mask from the position ids (attention never crosses examples; the model
must be called with ``use_cache=False``, which the trainer does). Without a mask, SDPA can
take its causal fast path instead of materialising a padded 4-D mask.
"""

import torch

from workflow_scripts.config import schema_default

IGNORE = -100


def plain_lengths(lengths) -> list[int]:
    """The token file's `length` column as a list. transformers hands its length-grouped sampler
    ``dataset["length"]``, a datasets Column that it then indexes one element at a time (~75 s an
    epoch at 1M rows); the same lengths as a list give the same order in a fraction of a second."""
    from datasets import Dataset
    from datasets.arrow_dataset import Column

    if not isinstance(lengths, Column):
        return lengths
    source = lengths.source
    if isinstance(source, Dataset) and source._indices is None:  # the token file as written
        return source.data.column(lengths.column_name).to_pylist()
    return list(lengths)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the examples in each row of at most ``capacity`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


class Collator:
    """Batch examples; ``pack=True`` packs them into rows of at most ``max_length`` tokens
    (by default as training.fast_path.packing's default says)."""

    def __init__(
        self,
        pad_token_id: int,
        pack: bool = schema_default("training.fast_path.packing"),
        max_length: int | None = None,
    ):
        if pack and not max_length:
            raise ValueError("packing needs max_length")
        self.pad_token_id = pad_token_id
        self.pack = pack
        self.max_length = max_length
        self.real_tokens = 0  # non-padding tokens collated so far (for tokens/s)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack:
            groups = pack_rows([len(e["input_ids"]) for e in examples], self.max_length)
        else:
            groups = [[i] for i in range(len(examples))]
        rows_ids, rows_labels, rows_pos = [], [], []
        for group in groups:
            ids, labels, pos = [], [], []
            for i in group:
                ex = examples[i]
                ids += ex["input_ids"]
                # -100 over the prompt; the first token of an example is never a target either (it would
                # be predicted from the previous example's last token)
                masked = max(int(ex["prompt_length"]), 1)
                labels += [IGNORE] * masked + list(ex["input_ids"][masked:])
                pos += list(range(len(ex["input_ids"])))
            rows_ids.append(ids)
            rows_labels.append(labels)
            rows_pos.append(pos)
        self.real_tokens += sum(len(r) for r in rows_ids)
        width = max(len(r) for r in rows_ids)
        batch = {
            "input_ids": torch.full((len(groups), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(groups), width), IGNORE, dtype=torch.long),
            "position_ids": torch.zeros((len(groups), width), dtype=torch.long),
        }
        for r, (ids, labels, pos) in enumerate(zip(rows_ids, rows_labels, rows_pos, strict=True)):
            n = len(ids)
            batch["input_ids"][r, :n] = torch.tensor(ids)
            batch["labels"][r, :n] = torch.tensor(labels)
            # padding continues the last position so it never looks like the start of a new example
            batch["position_ids"][r, :n] = torch.tensor(pos)
            batch["position_ids"][r, n:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + width - n)
        return batch
