"""Token sampling for language models: temperature, top-k, top-p (nucleus), seeded.

``generate`` re-runs the model over the (cropped) context for every new token: simple and
exact for command-line sampling from a checkpoint. The serving engine keeps a KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    """Continue ``ids`` by up to ``max_new_tokens`` tokens; returns only the new tokens."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    context = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = context if max_context is None else context[:, -max_context:]
        logits = model(window)[:, -1, :]  # (1, V)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if int(token) in stop_ids:
            break
        new.append(int(token))
        context = torch.cat([context, token[:, None]], dim=1)
    model.train(was_training)
    return new
