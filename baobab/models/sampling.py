"""Token sampling for language models: temperature, top-k, top-p (nucleus), seeded.

``generate`` decodes a GPT with a KV cache (:class:`ContiguousKVCache`): the prompt is
prefilled once, then each new token attends to the cached keys. Past the context window
it slides like the recompute it replaced: the window is the last ``max_context`` tokens at
positions 0.., so every position (and every key) changes with each new token and each
step re-prefills the window. Other causal LMs (the LSTM) re-run over the cropped context
for every token. The serving engine has its own paged cache (``baobab.serve``).
"""

from __future__ import annotations

import torch
from torch import nn

from baobab.models.common.attention import ContiguousKVCache
from baobab.models.gpt import GPT

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (as vLLM does)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V) -> (B,). temperature 0 is greedy."""
    if temperature < GREEDY_BELOW:  # dividing by a tiny temperature overflows to inf
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution ``sample_next`` draws from: float32 (B, V) probabilities of ``logits``
    (B, V) at ``temperature`` (> 0), cut to the ``top_k`` most likely and the ``top_p``
    nucleus."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False  # even for top_p ~ 0 the most likely token stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


class _Recompute:
    """Logits of the next token: the model over the whole (cropped) context, every step."""

    def __init__(self, model: nn.Module, max_context: int | None, device: torch.device) -> None:
        self.model, self.window, self.device = model, max_context, device

    def __call__(self, context: list[int]) -> torch.Tensor:
        window = context if self.window is None else context[-self.window :]
        idx = torch.tensor([window], dtype=torch.long, device=self.device)  # (1, T)
        return self.model(idx)[:, -1, :]  # (1, V)


class _Cached:
    """Logits of the next token from a GPT with a KV cache of the current window.

    While the context fits the window, only the tokens not yet cached run (the prompt
    once, then one token a step). Once it is longer, the window's positions shift by one
    each step, so the whole window runs again from position 0: the recompute's result.
    """

    def __init__(self, model: GPT, window: int, length: int, device: torch.device) -> None:
        self.model, self.window, self.device = model, window, device
        self.cache = ContiguousKVCache(model.cfg.n_layer, min(window, length))
        self.cached = 0  # window tokens whose keys the cache holds, at positions 0..cached-1

    def __call__(self, context: list[int]) -> torch.Tensor:
        window = context[-self.window :]
        start = self.cached if len(context) <= self.window else 0  # slid: re-prefill
        idx = torch.tensor([window[start:]], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(start, len(window), device=self.device)[None]  # (1, T)
        self.cache.start = start
        logits = self.model(idx, positions, attend=self.cache)[:, -1, :]  # (1, V)
        self.cached = len(window)
        return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    max_context: int | None = None,
) -> list[int]:
    """Continue ``ids`` by up to ``max_new_tokens`` tokens; returns only the new tokens.

    The model sees at most the last ``max_context`` tokens (a GPT: at most its
    ``max_seq_len``); a GPT decodes with a KV cache (module docstring).
    """
    if not ids:
        raise ValueError("generate needs at least one prompt token.")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    if isinstance(model, GPT):
        window = min(max_context or model.cfg.max_seq_len, model.cfg.max_seq_len)
        next_logits = _Cached(model, window, len(ids) + max_new_tokens, device)
    else:
        next_logits = _Recompute(model, max_context, device)
    context, new = list(ids), []
    try:
        for _ in range(max_new_tokens):
            logits = next_logits(context)  # (1, V)
            token = int(sample_next(logits, temperature, top_k, top_p, generator))
            if token in stop_ids:
                break
            new.append(token)
            context.append(token)
    finally:
        model.train(was_training)
    return new
