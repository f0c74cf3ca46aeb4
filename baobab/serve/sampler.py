"""Per-request sampling and logprobs over one step's logits rows.

Each request samples its own row with its own ``torch.Generator``, so its tokens depend on
its seed and its logits only, never on its batch mates. Greedy rows (temperature 0) take the
argmax together. Logprobs are ``log_softmax`` of the raw logits (before temperature, top-k
and top-p), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from baobab.models.sampling import sample_next
from baobab.serve.types import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed``, or with fresh OS entropy when it is None."""
    seed = secrets.randbits(63) if seed is None else seed
    return torch.Generator(device=device).manual_seed(seed)


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token per row of ``logits`` (N, V) float32, row i sampled by ``params[i]``."""
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    if len(greedy) == len(params):  # one argmax per row: the same for any row count
        return argmax_rows(logits)
    tokens: list[torch.Tensor | int | None] = [None] * len(params)
    if greedy:
        for i, t in zip(greedy, argmax_rows(logits[greedy])):
            tokens[i] = t
    for i, p in enumerate(params):
        if p.temperature > 0:
            tokens[i] = sample_next(
                logits[i : i + 1], p.temperature, p.top_k, p.top_p, generators[i]
            )[0]
    return [int(t) for t in tokens]


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The first index of each row's maximum of ``logits`` (N, V), as torch's argmax.

    On CPU through numpy: torch's CPU argmax along rows took 155 us for 16 x 4096 float32
    where numpy's took 10 us (one thread), 2% of gpt-mini's step at 16 requests.
    """
    if logits.device.type == "cpu":
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def top_logprobs(
    logits: torch.Tensor, chosen: Sequence[int], ks: Sequence[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of ``logits`` (N, V): the chosen token's logprob and the top ``ks[i]``
    (token id, logprob) pairs, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    picked = logprobs.gather(1, torch.tensor(chosen, device=logits.device)[:, None])[:, 0]
    k_max = min(max(ks, default=0), logprobs.shape[-1])
    if k_max > 0:
        top_values, top_ids = logprobs.topk(k_max, dim=-1)  # (N, k_max)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out = []
    for i, lp in enumerate(picked.tolist()):
        k = min(ks[i], k_max)
        top = list(zip(top_ids[i][:k], top_values[i][:k])) if k > 0 else []
        out.append((lp, top))
    return out
