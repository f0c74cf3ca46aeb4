"""Inside a GPT: attention maps per layer and head, and the logit lens.

The model attends through ``scaled_dot_product_attention``, which never materialises its
weights. One hooked forward records what each layer's attention module receives (the
normed residual stream and the rotary tables) and what each block outputs; the maps are
then recomputed with the layer's own ``wq``/``wk`` and rotation, grouped-query heads
expanded as SDPA's ``enable_gqa`` does (query head h reads key head h // (H // Hkv)), and
the lens reads each block's output through the model's own final norm and head
(``GPT.logits``). No second copy of the model is made.

Shapes: L layers, B = 1, T tokens, C d_model, H query heads, Hkv key/value heads,
D head_dim, V vocab, K top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from baobab.explain.types import AttentionMaps, LogitLens
from baobab.models.gpt import GPT


def _recorded_forward(model: GPT, ids: torch.Tensor):
    """Run ``model`` on ids (1, T); per layer, the attention's inputs (x, cos, sin) and the
    block's output (1, T, C), in layer order."""
    inputs: list[tuple[torch.Tensor, ...]] = []
    outputs: list[torch.Tensor] = []
    handles = []
    for block in model.layers.values():
        # Block calls attention(x, cos, sin, attend=...): positional x, cos, sin.
        handles.append(
            block.attention.register_forward_pre_hook(
                lambda _m, args: inputs.append(tuple(a.detach() for a in args[:3]))
            )
        )
        handles.append(
            block.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
        )
    try:
        with torch.no_grad():
            logits = model(ids)  # (1, T, V)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, logits


def attention_weights(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """(L, H, T, T) float32 attention weights of ``ids`` (1, T), recomputed per layer."""
    inputs, _, _ = _recorded_forward(model, ids)
    maps = []
    with torch.no_grad():
        for block, (x, cos, sin) in zip(model.layers.values(), inputs):
            attn = block.attention
            B, T, _ = x.shape
            q = attn.wq(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = attn.wk(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
            q, k = attn.rotary(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, D)
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(attn.head_dim)  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            maps.append(scores.softmax(-1)[0])  # (H, T, T): exactly 0 above the diagonal
    return torch.stack(maps)


def attention_maps(model: GPT, ids: torch.Tensor, tokens: list[str]) -> AttentionMaps:
    """:func:`attention_weights` with the tokens they are over."""
    return AttentionMaps(tokens, attention_weights(model, ids).cpu())


def lens_logits(model: GPT, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, T, V) float32: each block's output read through the final norm and head; and the
    model's own logits (1, T, V). Row L-1 is computed exactly as the forward computes its
    logits, so the two are equal bit for bit."""
    _, outputs, logits = _recorded_forward(model, ids)
    with torch.no_grad():
        lens = torch.cat([model.logits(h) for h in outputs])  # (L, T, V)
    return lens, logits


def logit_lens(
    model: GPT, ids: torch.Tensor, tokens: list[str], top_k: int, decode: Callable[[int], str]
) -> LogitLens:
    """The top-``top_k`` next tokens (and their probabilities) each layer predicts at each
    position of ``ids`` (1, T)."""
    lens, _ = lens_logits(model, ids)
    probs, top = lens.softmax(-1).topk(min(top_k, lens.shape[-1]), dim=-1)  # (L, T, K)
    top_ids = top.tolist()
    return LogitLens(
        tokens,
        top_ids,
        [[[decode(t) for t in row] for row in layer] for layer in top_ids],
        probs.tolist(),
    )
