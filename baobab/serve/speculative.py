"""Speculative decoding: propose a few tokens cheaply, verify them in one target forward.

Two proposers:

* :class:`NgramProposer` (prompt lookup, no draft model): the tokens that followed the most
  recent earlier occurrence of the context's last n-gram (longest n first). Strong where
  the output repeats its input: code, edits, extraction.
* :class:`DraftProposer`: a small model with the target's tokenizer, vocabulary and context
  (e.g. gpt-nano distilled from gpt-mini), run ``k`` one-token steps over its own KV cache.

The target then computes the request's last token and its ``k`` proposals in one batched
forward, each row as a one-query piece (``SeqInput.verify``), so every row has the bits a
plain decode step would give it: greedy output is identical to non-speculative decoding,
bit for bit. Sampled rows keep the target's distribution by rejection sampling
(:func:`accept`, Leviathan et al. 2023 / vLLM's rejection sampler): a proposal ``d`` drawn
from the draft's q is kept with probability min(1, p(d) / q(d)); at the first rejection the
token is drawn from the residual max(0, p - q), renormalised; when all are kept, one more
token comes from p at the last row. An n-gram proposal is a draw from a point mass.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from baobab.models.gpt import GPT
from baobab.models.sampling import GREEDY_BELOW, sampling_probs
from baobab.serve.runner import ModelRunner, SeqInput
from baobab.serve.types import SamplingParams


class NgramProposer:
    """Prompt lookup: for n from ``max_n`` down to ``min_n``, find the most recent earlier
    occurrence of the last n tokens and propose the (up to) ``k`` tokens after it."""

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        ids = array("i", tokens)  # the search runs over bytes (C speed), 4 per token
        raw = ids.tobytes()
        size = ids.itemsize
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            pattern = raw[-n * size :]
            end = len(raw) - size  # the match must end before the last token
            while (at := raw.rfind(pattern, 0, end)) >= 0:
                if at % size == 0:  # aligned on a token, not inside one
                    start = at // size + n
                    return list(ids[start : start + k])
                end = at + len(pattern) - 1
        return []


def accept(
    probs: torch.Tensor,
    proposals: Sequence[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens one verify step emits: the accepted prefix of ``proposals`` plus one.

    ``probs`` (k + 1, V): the target's logits at the request's last token and each
    proposal (raw; greedy) or its sampling distribution (temperature, top-k, top-p applied).
    ``draft_probs`` (k, V): the draft's distribution each proposal was drawn from, or None
    for a point mass (n-gram proposals, or greedy drafts).
    """
    if params.temperature < GREEDY_BELOW:
        best = probs.argmax(-1).tolist()
        out = []
        for i, d in enumerate(proposals):
            out.append(best[i])
            if best[i] != d:
                return out
        return out + [best[len(proposals)]]
    uniform = torch.rand(len(proposals), generator=generator, device=probs.device).tolist()
    out = []
    for i, d in enumerate(proposals):
        p = probs[i]
        q = draft_probs[i, d].item() if draft_probs is not None else 1.0
        if uniform[i] * q < p[d].item():  # u < p(d) / q(d), without dividing by 0
            out.append(d)
            continue
        if draft_probs is None:  # a point mass at d: the residual is p without d
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_(min=0.0)
        if residual.sum() <= 0:  # p == q up to rounding: any draw from p is exact
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    bonus = torch.multinomial(probs[len(proposals)], 1, generator=generator)
    return out + [int(bonus)]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What :func:`accept` compares: raw logits for greedy, else the sampling distribution."""
    if params.temperature < GREEDY_BELOW:
        return logits
    return sampling_probs(logits, params.temperature, params.top_k, params.top_p)


def check_draft(target_cfg, draft_cfg, target_tokenizer: str, draft_tokenizer: str) -> None:
    """ValueError (one sentence) unless a draft model can propose for the target: the same
    tokenizer, vocabulary size and context length."""
    if draft_tokenizer != target_tokenizer:
        raise ValueError(
            "the draft model's tokenizer differs from the target's; a draft must share the "
            "target's tokenizer.json."
        )
    for what, name in (("vocabulary", "vocab_size"), ("context length", "max_seq_len")):
        a, b = getattr(target_cfg, name), getattr(draft_cfg, name)
        if a != b:
            raise ValueError(
                f"the draft model's {what} ({name} {b}) differs from the target's ({a}); a "
                "draft must match it."
            )


class DraftProposer:
    """Proposals from a draft model over its own KV cache, laid out like the target's (the
    same blocks and bases, so a request's run is the same in both caches).

    A request's ``draft_computed`` counts the positions whose draft keys and values are
    valid; the first of the ``k`` draft steps catches up from there to its last token (its
    whole prompt the first time), the others add one proposal each.
    """

    def __init__(self, model: GPT, num_blocks: int, block_size: int, chunk: int, pack: bool):
        self.runner = ModelRunner(model, num_blocks, block_size, chunk, pack)

    def propose(self, batch: Sequence[tuple]) -> list[tuple[list[int], torch.Tensor | None]]:
        """For each (request, cache base, k): k proposals and the (k, V) distributions they
        were drawn from (None when greedy: the draft's argmax, a point mass)."""
        proposals: list[list[int]] = [[] for _ in batch]
        dists: list[list[torch.Tensor]] = [[] for _ in batch]
        seqs = [SeqInput(base, r.draft_computed, r.token_ids[r.draft_computed :], True)
                for r, base, _ in batch]  # fmt: skip
        active = list(range(len(batch)))
        while active:
            logits = self.runner.execute(seqs)  # (len(active), V)
            for row, i in enumerate(active):
                r, p = batch[i][0], batch[i][0].params
                if p.temperature < GREEDY_BELOW:
                    proposals[i].append(int(logits[row].argmax()))
                else:
                    q = sampling_probs(logits[row : row + 1], p.temperature, p.top_k, p.top_p)[0]
                    proposals[i].append(int(torch.multinomial(q, 1, generator=r.generator)))
                    dists[i].append(q)
            active = [i for i in active if len(proposals[i]) < batch[i][2]]
            seqs = [
                SeqInput(batch[i][1], batch[i][0].num_tokens - 1 + len(proposals[i]),
                         proposals[i][-1:], True)
                for i in active
            ]  # fmt: skip
        for r, _, k in batch:
            r.draft_computed = r.num_tokens + k - 1  # the last proposal's keys: not computed
        return [(p, torch.stack(d) if d else None) for p, d in zip(proposals, dists)]
