"""What the Hugging Face converters share: name tables used both ways, config checks.

A causal-LM architecture is a :class:`GPTFormat`: the variant of baobab's ``gpt`` it
represents, and one name table (:data:`Pairs`) that import and export both read, so a
tensor is renamed in one place. A pair may transpose: HF GPT-2's ``Conv1D`` stores
(in, out) where ``nn.Linear`` stores (out, in), and a transpose undoes itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Weights = dict[str, torch.Tensor]
# (baobab parameter name, HF tensor name, transposed between the two)
Pairs = list[tuple[str, str, bool]]


def gpt_pairs(
    top: dict[str, str],
    layer: dict[str, str],
    hf_layer: str,
    n_layer: int,
    tied: bool,
    kinds: tuple[str, ...] = ("weight",),
    transposed: tuple[str, ...] = (),
) -> Pairs:
    """The name table of a baobab gpt in one HF architecture.

    Args:
        top: baobab tensor -> HF tensor, outside the blocks (the head comes from ``tied``).
        layer: baobab block module -> HF block module, each with the tensors ``kinds``.
        hf_layer: the HF name of block ``i``'s prefix, e.g. "model.layers.{i}.".
        n_layer: number of blocks.
        tied: the head shares the token embedding (then HF stores no lm_head.weight).
        transposed: HF block modules whose weight is stored (in, out).
    """
    pairs = [(ours, theirs, False) for ours, theirs in top.items()]
    if not tied:
        pairs.append(("output.weight", "lm_head.weight", False))
    for i in range(n_layer):
        for ours, theirs in layer.items():
            for kind in kinds:
                flip = kind == "weight" and theirs in transposed
                pairs.append(
                    (f"layers.{i}.{ours}.{kind}", f"{hf_layer.format(i=i)}{theirs}.{kind}", flip)
                )
    return pairs


def to_hf_names(sd: Weights, pairs: Pairs) -> Weights:
    """baobab tensors renamed (and transposed where the pair says) to HF's."""
    return {theirs: sd[ours].t() if flip else sd[ours] for ours, theirs, flip in pairs}


def from_hf_names(w: Weights, pairs: Pairs, tied: bool) -> Weights:
    """HF tensors renamed (and transposed where the pair says) to baobab's, the head pointed
    at the token embedding when ``tied``; KeyError names the HF tensor that is missing."""
    sd = {ours: w[theirs].t() if flip else w[theirs] for ours, theirs, flip in pairs}
    if tied:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def need(hf: dict[str, Any], key: str, allowed: list[Any], arch: str) -> None:
    """Refuse an HF config value baobab does not implement (absent counts as allowed[0])."""
    value = hf.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(
            f"{arch} config {key}={value!r} is not supported; baobab supports {allowed!r}."
        )


@dataclass(frozen=True)
class GPTFormat:
    """A Hugging Face causal-LM architecture and the variant of baobab's ``gpt`` it holds."""

    architecture: str
    """The ``architectures`` entry of config.json, e.g. "GPT2LMHeadModel"."""
    needs: Callable[[Any], dict[str, Any]]
    """GPTConfig -> the field values this format needs it to have (norm, mlp, ...)."""
    hf_config: Callable[[Any], dict[str, Any]]
    """GPTConfig -> config.json keys for the architecture and shapes (dtype and token
    ids are added by the exporter)."""
    to_hf: Callable[[nn.Module], Weights]
    """A baobab gpt -> its tensors under HF names (a tied head not repeated)."""
    from_hf: Callable[[dict[str, Any], Weights], tuple[dict[str, Any], Weights]]
    """(config.json, HF tensors) -> (GPTConfig values, baobab state dict)."""

    def mismatches(self, cfg: Any) -> dict[str, tuple[Any, Any]]:
        """Fields of ``cfg`` this format cannot hold: name -> (the model's, the needed)."""
        return {
            key: (getattr(cfg, key), want)
            for key, want in self.needs(cfg).items()
            if getattr(cfg, key) != want
        }
