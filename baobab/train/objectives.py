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
    count: int | torch.Tensor  # loss terms in this batch (masked LM: a 0-dim device tensor)


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

    def for_evaluation(self) -> Objective:
        """The objective validation reports (a training-only loss term reports its base)."""
        return self


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
        chosen[..., 0] |= ~chosen.any()  # always train on at least one position
        labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
        kind = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        random_ids = torch.randint(
            self.vocab_size, tokens.shape, generator=generator, device=tokens.device
        )
        inputs = torch.where(chosen & (kind < 0.8), torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
        return Batch(inputs, labels, chosen.sum())  # a count the host never waits for

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


class Distillation(Objective):
    """Knowledge distillation around a base objective (causal_lm or classification).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * base loss,
    with the KL summed over classes and averaged over the base loss's terms (tokens or
    samples), so micro-batch weighting stays exact. T^2 keeps the soft term's gradient
    scale independent of T (Hinton et al., 2015). The teacher runs without gradients.
    """

    def __init__(self, base: Objective, teacher: nn.Module, temperature: float, alpha: float):
        if base.name not in ("causal_lm", "classification"):
            raise ValueError(
                f"distillation works with the causal_lm and classification objectives, not {base.name}"
            )
        self.base, self.teacher = base, teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self.name, self.metric = base.name, base.metric

    def prepare(self, x, y, generator=None):
        return self.base.prepare(x, y, generator)

    def items(self, batch: Batch) -> int:
        return self.base.items(batch)

    def for_evaluation(self) -> Objective:
        return self.base

    def loss(self, model, batch):
        student = model(batch.inputs)  # (B, T, V) or (B, classes)
        hard, extras = self.base.criterion(student, batch.targets)
        with torch.no_grad():
            teacher = self.teacher(batch.inputs)
        if teacher.shape != student.shape:
            raise ValueError(
                f"the teacher's outputs have shape {tuple(teacher.shape)} but the student's "
                f"have {tuple(student.shape)}; both need the same vocabulary or classes"
            )
        return self.alpha * self.soft_loss(student, teacher) + (1 - self.alpha) * hard, extras

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(teacher_T || student_T), summed over the last dim, mean over the rest."""
        t = self.temperature
        s_log = F.log_softmax(student.flatten(0, -2).float() / t, dim=-1)  # (N, V)
        t_log = F.log_softmax(teacher.flatten(0, -2).float() / t, dim=-1)  # (N, V)
        return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * t * t

    def criterion(self, output, targets):
        raise ValueError("distillation cannot run inside a pipeline schedule; set parallel.pp 1")


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
