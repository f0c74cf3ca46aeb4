"""Token attributions of language models (gpt, lstm, bert), by Captum on the token embeddings.

The explained value is a log-probability: log p(target | context) for a causal LM, summed
over the target's tokens, minus log p(contrast | context) for "why A rather than B"; for a
masked LM, log p(target) at the masked position. Captum's methods see it as a function of
the context's token embeddings (1, P, C): a forward hook on the model's embedding module
puts the interpolated (or perturbed) embeddings in place of the context's, and the target
positions keep their own. So integrated gradients run from a zero-embedding baseline (the
positions still get their position embeddings; ``paths.py`` integrates the path piece by
piece where a normalised model makes it rough), and a token's score is its attribution
summed over the embedding width.

Shapes: P attributed context tokens, T tokens the model sees, C embedding width, V vocab,
n the rows Captum batches (integration steps, perturbations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, Occlusion
from torch import nn

from baobab.data.tokenizer import Tokenizer
from baobab.explain.paths import integrated_gradients
from baobab.explain.types import Attribution, ExplainError, TextExplanation, TokenStep

EMBEDDINGS = {"gpt": "tok_embeddings", "lstm": "embedding", "bert": "word_embeddings"}
"""The token embedding module of each language-model family."""


@contextmanager
def embeddings_replaced(module: nn.Module, holder: dict[str, torch.Tensor]):
    """While active, ``module``'s output (n, T, C) takes ``holder["embeds"]`` (n, P, C) at its
    first P positions (broadcast over n when it has one row) and keeps the rest."""

    def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        embeds = holder["embeds"]
        head = embeds.expand(out.shape[0], -1, -1)
        return torch.cat([head.to(out.dtype), out[:, head.shape[1] :]], dim=1)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Objective:
    """The explained value as a function of the context's embeddings: (n, P, C) -> (n,).

    ``sequences`` are (token ids the model sees (T,), [(position, token id)] scored, sign):
    the value is the sum over them of sign * log p(token), read from the logits at
    ``position`` (a causal LM's row t predicts token t + 1; a masked LM's row is the
    masked position itself). Every call
    reports its rows to ``progress`` (Captum calls it once per internal batch).
    """

    def __init__(
        self,
        model: nn.Module,
        embedding: nn.Module,
        sequences: Sequence[tuple[torch.Tensor, list[tuple[int, int]], float]],
        progress: Callable[[int], None],
    ) -> None:
        self.model, self.embedding, self.progress = model, embedding, progress
        self.sequences = sequences

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[0]
        holder = {"embeds": embeds}
        total = embeds.new_zeros(n, dtype=torch.float64)
        with embeddings_replaced(self.embedding, holder):
            for ids, scored, sign in self.sequences:
                logits = self.model(ids[None].expand(n, -1))  # (n, T, V)
                positions = torch.tensor([p for p, _ in scored], device=ids.device)
                tokens = torch.tensor([t for _, t in scored], device=ids.device)
                logp = F.log_softmax(logits[:, positions].double(), dim=-1)  # (n, S, V)
                total = total + sign * logp[:, torch.arange(len(scored)), tokens].sum(-1)
        self.progress(n)
        return total  # (n,) float64: sums of log-probabilities lose nothing to rounding


def attribute(
    objective: Objective,
    embeds: torch.Tensor,
    methods: Sequence[str],
    ig_steps: int,
    max_delta: float,
    internal_batch_size: int,
) -> list[Attribution]:
    """Each method's per-token scores of ``objective`` at ``embeds`` (1, P, C)."""
    found = []
    for method in methods:
        delta = None
        if method == "ig":
            attr, delta = integrated_gradients(
                objective,
                embeds,
                torch.zeros_like(embeds),
                ig_steps,
                max_delta,
                internal_batch_size,
            )
            scores = attr.sum(-1)[0]  # (P,)
        elif method == "grad_x_input":
            scores = InputXGradient(objective).attribute(embeds.clone().requires_grad_())
            scores = scores.sum(-1)[0]
        else:  # occlusion: one token's embedding set to zero at a time
            width = embeds.shape[-1]
            attr = Occlusion(objective).attribute(
                embeds,
                sliding_window_shapes=(1, width),
                strides=(1, width),
                baselines=0.0,
                perturbations_per_eval=internal_batch_size,
            )
            scores = attr.mean(-1)[0]  # every width element holds the token's value drop
        found.append(Attribution(method, scores.detach().double().tolist(), delta))
    return found


def explain_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    family: str,
    *,
    prompt: str,
    target: str | None,
    contrast: str | None,
    completion: str | None,
    max_tokens: int,
    top_k: int,
    methods: list[str],
    ig_steps: int,
    max_delta: float,
    internal_batch_size: int,
    progress: Callable[[int], None],
) -> TextExplanation:
    """See :func:`baobab.explain.explain`: the language-model half."""
    device = next(model.parameters()).device
    embedding = model.get_submodule(EMBEDDINGS[family])
    tokens = _TokenText(tokenizer)
    plans = _plans(model, tokenizer, family, prompt, target, contrast, completion, max_tokens)
    limit = getattr(model.cfg, "max_seq_len", None) if family != "lstm" else None
    steps = []
    for plan in plans:
        longest = max(len(s) for s, _, _ in plan.sequences)
        if limit is not None and longest > limit:
            raise ExplainError(
                f"the prompt and target take {longest} tokens; the model reads at most {limit}."
            )
        sequences = [
            (torch.tensor(s, device=device), scored, sign) for s, scored, sign in plan.sequences
        ]
        with torch.no_grad():
            embeds = embedding(sequences[0][0][None, : plan.attributed]).detach()  # (1, P, C)
        objective = Objective(model, embedding, sequences, progress)
        with torch.no_grad():
            logprobs = [
                seq[2] * float(Objective(model, embedding, [seq], _silent)(embeds))
                for seq in sequences
            ]
        # cuDNN's LSTM backward runs only in training mode: explain an LSTM without cuDNN.
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=family != "lstm"):
            attributions = attribute(
                objective, embeds, methods, ig_steps, max_delta, internal_batch_size
            )
        context = plan.context_ids
        steps.append(
            TokenStep(
                position=plan.position,
                context_ids=context,
                context=[tokens(t) for t in context],
                target_ids=plan.target_ids,
                target=tokenizer.decode(plan.target_ids),
                logprob=logprobs[0],
                attributions=attributions,
                contrast_ids=plan.contrast_ids,
                contrast=None if plan.contrast_ids is None else tokenizer.decode(plan.contrast_ids),
                contrast_logprob=logprobs[1] if len(logprobs) > 1 else None,
            )
        )
    result = TextExplanation(family, prompt, steps, methods=list(methods), ig_steps=ig_steps)
    if family == "gpt":
        from baobab.explain.inside import attention_maps, logit_lens

        last = steps[-1]
        seen = last.context_ids + last.target_ids[:-1]
        ids = torch.tensor(seen, device=device)[None]
        words = [tokens(t) for t in seen]
        result.attention = attention_maps(model, ids, words)
        result.logit_lens = logit_lens(model, ids, words, top_k, tokens)
    return result


def _silent(units: int) -> None:
    del units


class _TokenText:
    """Each token id decoded on its own (cached: a report shows the same ids many times)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


@dataclass
class _Plan:
    """One explained prediction: the sequences the objective scores and what is attributed."""

    context_ids: list[int]  # attributed: the first P tokens of every sequence
    target_ids: list[int]
    contrast_ids: list[int] | None
    position: int
    sequences: list[tuple[list[int], list[tuple[int, int]], float]]  # target's first

    @property
    def attributed(self) -> int:
        return len(self.context_ids)


def _causal_sequence(context: list[int], target: list[int], sign: float):
    """Context then target: the target's token i is predicted at position P - 1 + i."""
    scored = [(len(context) - 1 + i, t) for i, t in enumerate(target)]
    return context + target[:-1], scored, sign


def _encode(tokenizer: Tokenizer, text: str, what: str, special: bool = False) -> list[int]:
    ids = tokenizer.encode(text, allow_special=special)
    if not ids:
        raise ExplainError(f"the {what} is empty; give it at least one token.")
    return ids


def _plans(
    model: nn.Module,
    tokenizer: Tokenizer,
    family: str,
    prompt: str,
    target: str | None,
    contrast: str | None,
    completion: str | None,
    max_tokens: int,
) -> list[_Plan]:
    """The predictions to explain, in order (checks the combination of arguments)."""
    given = [name for name, v in (("target", target), ("completion", completion)) if v is not None]
    if max_tokens:
        given.append("max_tokens")
    if max_tokens < 0:
        raise ExplainError(f"max_tokens must be at least 0; got {max_tokens}.")
    if len(given) > 1:
        raise ExplainError(
            f"give one of target, completion and max_tokens; got {', '.join(given)}."
        )
    if contrast is not None and given and given[0] != "target":
        raise ExplainError("a contrast explains one target; it cannot go with a completion.")
    if family == "bert":
        return [_masked_plan(model, tokenizer, prompt, target, contrast, given)]
    ids = _encode(tokenizer, prompt, "prompt")
    contrast_ids = None if contrast is None else _encode(tokenizer, contrast, "contrast")
    if target is not None:
        target_ids = _encode(tokenizer, target, "target")
    else:
        if completion is not None:
            new = _encode(tokenizer, completion, "completion")
        else:
            new = _greedy(model, tokenizer, ids, max(1, max_tokens))
        if not new:
            raise ExplainError("the model produced no token to explain after this prompt.")
        if contrast_ids is None:
            plans = []
            for i, token in enumerate(new):
                context = ids + new[:i]
                sequence = _causal_sequence(context, [token], 1.0)
                plans.append(_Plan(context, [token], None, len(context) - 1, [sequence]))
            return plans
        target_ids = new[:1]
    sequences = [_causal_sequence(ids, target_ids, 1.0)]
    if contrast_ids is not None:
        sequences.append(_causal_sequence(ids, contrast_ids, -1.0))
    return [_Plan(ids, target_ids, contrast_ids, len(ids) - 1, sequences)]


def _greedy(model: nn.Module, tokenizer: Tokenizer, ids: list[int], count: int) -> list[int]:
    """The model's own next ``count`` tokens (greedy), stopping after end-of-text."""
    from baobab.models.sampling import generate

    limit = getattr(model.cfg, "max_seq_len", None)
    stop = () if tokenizer.eot_id is None else (tokenizer.eot_id,)
    return generate(model, ids, count, 0.0, 0, 1.0, 0, stop, limit)


def _masked_plan(model, tokenizer, prompt, target, contrast, given) -> _Plan:
    """A masked LM: the prediction at the prompt's first mask token."""
    if given and given[0] != "target":
        raise ExplainError(
            "a masked LM explains the token at its mask; give target, not " + given[0] + "."
        )
    mask = tokenizer.mask_id
    ids = _encode(tokenizer, prompt, "prompt", special=True)
    if mask is None or mask not in ids:
        raise ExplainError("a masked LM's prompt needs the mask token <|mask|> where it predicts.")
    position = ids.index(mask)
    if target is None:
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(torch.tensor(ids, device=device)[None])  # (1, T, V)
        target_ids = [int(logits[0, position].argmax())]
    else:
        target_ids = _one_token(tokenizer, target, "target")
    sequences = [(ids, [(position, target_ids[0])], 1.0)]
    contrast_ids = None
    if contrast is not None:
        contrast_ids = _one_token(tokenizer, contrast, "contrast")
        sequences.append((ids, [(position, contrast_ids[0])], -1.0))
    return _Plan(ids, target_ids, contrast_ids, position, sequences)


def _one_token(tokenizer: Tokenizer, text: str, what: str) -> list[int]:
    ids = _encode(tokenizer, text, what)
    if len(ids) != 1:
        raise ExplainError(f"a masked LM's {what} must be one token; '{text}' is {len(ids)}.")
    return ids
