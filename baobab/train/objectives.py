"""Training objectives: how a batch becomes a loss.

Every objective splits its work in two so gradient accumulation can weight micro-batches
exactly: ``prepare`` turns a loader batch into model inputs, targets and the number of loss
terms (tokens, masked tokens or samples); ``loss`` runs the model and returns the mean loss
over those terms plus summed extras (correct predictions) for evaluation. A step's loss is
then ``sum(loss_i * count_i) / sum(count_i)``, the mean over every term in the step, which
makes full-batch gradient descent and unequal last batches exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor
    count: int  # number of loss terms in this batch


class Objective:
    name = ""
    metric = ""  # the extra evaluation metric: "accuracy", "perplexity" or ""

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> Batch:
        return Batch(x, y, int(y.shape[0]))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the batch's terms, and summed extras (e.g. correct predictions)."""
        return self.criterion(model(batch.inputs), batch.targets)

    def criterion(
        self, output: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss given the model's output: what a pipeline's last stage computes."""
        raise NotImplementedError

    def items(self, batch: Batch) -> int:
        """Throughput unit: samples here, tokens for language models."""
        return int(batch.inputs.shape[0])


class _LanguageModel(Objective):
    def items(self, batch: Batch) -> int:
        return int(batch.inputs.numel())


class CausalLM(_LanguageModel):
    name, metric = "causal_lm", "perplexity"

    def prepare(self, x, y, generator=None):
        return Batch(x, y, int(y.numel()))

    def criterion(self, logits, targets):  # logits (B, T, V), targets (B, T)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), {}


class MaskedLM(_LanguageModel):
    """BERT masking: of a ``mask_prob`` share of positions, 80% become the mask token, 10% a
    random token and 10% stay; the loss is over those positions only."""

    name, metric = "masked_lm", "accuracy"

    def __init__(self, mask_id: int, vocab_size: int, mask_prob: float = 0.15):
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob

    def prepare(self, x, y, generator=None):
        # The loader yields (window, shifted window); MLM uses the window alone.
        tokens = x
        draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        chosen = draw < self.mask_prob
        if not chosen.any():  # always train on at least one position
            chosen[..., 0] = True
        labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
        kind = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        random_ids = torch.randint(
            self.vocab_size, tokens.shape, generator=generator, device=tokens.device
        )
        inputs = torch.where(chosen & (kind < 0.8), torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
        return Batch(inputs, labels, int(chosen.sum()))

    def criterion(self, logits, labels):  # logits (B, T, V), labels (B, T)
        flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten()
        loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
        keep = flat_labels != IGNORE_INDEX
        correct = (flat_logits.argmax(-1)[keep] == flat_labels[keep]).sum()
        return loss, {"correct": correct}


class Classification(Objective):
    name, metric = "classification", "accuracy"

    def criterion(self, logits, targets):  # logits (B, num_classes), targets (B,)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, {"correct": (logits.argmax(-1) == targets).sum()}


class Regression(Objective):
    """Mean squared error, the seed's ``torch.mean((output - target) ** 2)``."""

    name = "regression"

    def criterion(self, output, targets):
        return torch.mean((output.float() - targets.reshape(output.shape)) ** 2), {}


def build_objective(
    name: str, *, mask_id: int | None = None, vocab_size: int | None = None, mask_prob: float = 0.15
) -> Objective:
    """The objective called ``name`` (causal_lm, masked_lm, classification, regression)."""
    if name == "causal_lm":
        return CausalLM()
    if name == "masked_lm":
        if mask_id is None or vocab_size is None:
            raise ValueError("the masked_lm objective needs a tokenizer with a mask token")
        return MaskedLM(mask_id, vocab_size, mask_prob)
    if name == "classification":
        return Classification()
    if name == "regression":
        return Regression()
    raise ValueError(
        f"unknown objective '{name}'; choose one of: causal_lm, masked_lm, classification, regression"
    )
