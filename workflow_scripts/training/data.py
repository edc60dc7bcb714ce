"""Training examples and the collator: labels on assistant tokens only, optional isolated packing.

Every example is ``input_ids = prompt_ids + completion_ids`` (from format_dataset); its labels
are ``-100`` over the prompt, so the loss covers the assistant's tokens and nothing else.

The collator right-pads, or packs several examples into one row with position ids restarting
at 0 for each example. It never returns an attention mask: with right padding the causal
mask already keeps real tokens from seeing padding, and for packed rows transformers derives
a block-diagonal mask from the position ids (attention never crosses examples; the model
must be called with ``use_cache=False``, which the trainer does). Without a mask, SDPA can
take its causal fast path instead of materialising a padded 4-D mask.
"""

import pandas as pd
import torch

from workflow_scripts.config import schema_default

IGNORE = -100


def load_examples(parquet_path: str) -> list[dict]:
    frame = pd.read_parquet(parquet_path, columns=["input_ids", "prompt_length"])
    examples = []
    for ids, prompt_length in zip(frame["input_ids"], frame["prompt_length"], strict=True):
        ids = [int(t) for t in ids]
        labels = [IGNORE] * int(prompt_length) + ids[int(prompt_length) :]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


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
                # the first token of an example is never a target (it would be predicted from the previous one)
                labels += [IGNORE] + list(ex["labels"][1:])
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
