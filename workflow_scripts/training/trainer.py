"""SFTTrainer with snaketune's loss: the LM head and cross-entropy only where a label is.

The vocabulary of small models is large (SmolLM2: 49k x 576, a fifth of the model), and
prompt tokens carry no label, so projecting every position onto the vocabulary wastes most
of the head's FLOPs and the memory of a [tokens x vocab] fp32 tensor. The result is the same
loss (a test compares it with the model's own loss).
"""

import contextlib
import copy
import time

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from workflow_scripts.models.families import family_of
from workflow_scripts.training.data import IGNORE, plain_lengths


def split_head(model):
    """(decoder, lm_head, softcap) of a (PEFT-wrapped) causal or image-text-to-text LM, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    text_cfg = family_of(base.config).text_config(base.config)
    return decoder, head, getattr(text_cfg, "final_logit_softcapping", None)


def labels_only_loss(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, dict]:
    parts = split_head(model)
    if parts is None:
        raise ValueError("labels_only_logits: cannot find the decoder and LM head of this model")
    decoder, head, softcap = parts
    labels = inputs["labels"]
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = decoder(**fwd, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = head(hidden[:, :-1][mask]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    y = targets[mask]
    n = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = F.cross_entropy(logits, y, reduction="sum") / torch.as_tensor(n, device=logits.device).clamp(min=1)
    with torch.no_grad():
        stats = {"n": int(mask.sum()), "correct": int((logits.argmax(-1) == y).sum())}
    return loss, stats


def _with_plain_lengths(sampler):
    """A length-grouped sampler with the same lengths as a list (training.data.plain_lengths)."""
    if hasattr(sampler, "lengths"):
        sampler.lengths = plain_lengths(sampler.lengths)
    return sampler


class SnaketuneTrainer(SFTTrainer):
    """SFTTrainer whose loss computes logits only at labelled positions (switchable)."""

    def __init__(self, *args, labels_only_logits: bool, **kwargs):  # training.fast_path's, no default here
        super().__init__(*args, **kwargs)
        self.labels_only_logits = labels_only_logits
        self.eval_seconds = 0.0  # excluded from training tokens/s
        self.rng_neutral_eval_step = None  # the step of an unscheduled evaluation (halving), if any

    def _get_train_sampler(self, train_dataset=None):
        return _with_plain_lengths(super()._get_train_sampler(train_dataset))

    def _get_eval_sampler(self, eval_dataset):
        return _with_plain_lengths(super()._get_eval_sampler(eval_dataset))

    def get_eval_dataloader(self, eval_dataset=None):
        # A copy of the collator, so evaluation batches do not count as training tokens.
        train_collator = self.data_collator
        self.data_collator = copy.copy(train_collator)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def evaluate(self, *args, **kwargs):
        t0 = time.perf_counter()
        # An evaluation outside the schedule (a halving rung's, train.StopAtStep) leaves torch's CPU
        # RNG as it found it (its DataLoader draws a seed from it), so it changes nothing in the
        # training that follows (dropout masks, the next epoch's order); scheduled ones are as always.
        neutral = self.rng_neutral_eval_step == self.state.global_step
        try:
            with torch.random.fork_rng(devices=[]) if neutral else contextlib.nullcontext():
                return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - t0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        # Under DDP the forward must go through the wrapper (it arms the gradient all-reduce), so
        # multi-process runs use TRL's loss; single-process runs call the decoder and head directly.
        distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if not self.labels_only_logits or return_outputs or distributed:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, stats = labels_only_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if stats["n"]:
            self._metrics[mode]["mean_token_accuracy"].append(stats["correct"] / stats["n"])
        return loss
