"""The model runner: one batched forward of a GPT over every scheduled token, with a KV cache.

Shape legend: M rows (scheduled tokens, padded), C d_model, H heads, Hkv kv heads,
D head_dim, V vocab_size, L keys a query attends to.

Every scheduled token of the step is one row of a packed (M, C) batch: decodes and prefill
chunks of all requests go through each linear layer together. Attention is the one
per-request part: each request attends to its own run of cache positions, with
``scaled_dot_product_attention`` over exactly its own length (no padding).

Batch invariance (greedy output under load equals one-at-a-time output, bit for bit):
a row's result must not depend on its batch mates. What was found on CPU (torch 2.13, MKL):

* ``F.linear`` is not row-invariant: M=1 runs a GEMV, and MKL's GEMM treats rows in
  blocks of 4 with a different kernel for the leftover rows, so a row's bits depend on M.
  Two ways out, both giving a row the same bits for any M and row position (checked at 1
  and 2 threads by ``test_linear_rows_do_not_depend_on_the_batch``):

  - oneDNN with the weight reordered once (``mkldnn._reorder_linear_weight``): the same
    bits for every M, at GEMV speed for M=1, but ~40 us of fixed cost per call. Large
    float32 ``nn.Linear`` modules are swapped for :class:`PackedLinear` (a module swap,
    DESIGN principle 3): batch-1 decode of a big model stays memory-bound.
  - MKL with rows padded to a multiple of 4, so every row goes through its 4-row kernel:
    used for the small linears (call overhead matters more than bandwidth there) and for
    whatever cannot be packed (int8/int4 weight-only modules, bfloat16, GPU).
* SiLU/GELU kernels compute a vector-width tail with a scalar formula that differs in the
  last bit, and where the tail falls depends on M; they are composed from ``exp``/``tanh``
  (MKL VML: position-independent) and exact IEEE ops instead.
* Attention runs per request (batched SDPA's bits depend on the batch size once torch
  uses 2+ threads, and padding keys to a common length changes every reduction), and a
  prefill chunk's result depends on its bounds, so chunks start at fixed multiples of
  ``prefill_chunk_size`` (the scheduler's rule, re-applied here). Per-request SDPA costs
  ~20-40 us per request and layer: about a quarter of gpt-mini's step at 16 requests.

``tests/serve/test_kv_cache_runner.py`` checks this bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from baobab.export.quantize import QUANTIZED_LINEARS
from baobab.models.common import rotate_half
from baobab.models.gpt import GPT
from baobab.serve.kv_cache import KVCache

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class PackedLinear(nn.Module):
    """``nn.Linear`` whose float32 weight is reordered once for oneDNN (CPU only).

    Same result as the Linear up to float rounding; a row's bits do not depend on how many
    rows are in the batch. The packed weight is an opaque mkldnn tensor kept as a plain
    attribute (not a parameter): the module is for inference only and cannot be moved.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def can_pack(module: nn.Module, min_numel: int = 0) -> bool:
    """A float32 CPU ``nn.Linear`` (exactly; not a quantized twin) of at least ``min_numel``
    weights, with oneDNN present."""
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and module.weight.numel() >= min_numel
        and torch.backends.mkldnn.is_available()
    )


# Below this many weights a linear runs faster through MKL (padded rows) than through
# oneDNN's per-call overhead; above it, batch-1 decode is memory-bound and oneDNN wins.
PACK_MIN_NUMEL = 2**18


def pack_linears(model: nn.Module, min_numel: int = PACK_MIN_NUMEL) -> None:
    """Swap every packable ``nn.Linear`` of ``model`` for a :class:`PackedLinear`, in place."""
    for name, module in list(model.named_modules()):
        if can_pack(module, min_numel):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear(module))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *QUANTIZED_LINEARS))


class SeqInput(NamedTuple):
    """One request's rows in a step: ``token_ids`` at positions ``start``, ``start + 1``, ...
    of the request whose keys and values live at cache positions from ``base``."""

    base: int
    start: int
    token_ids: Sequence[int]
    sample: bool  # return the logits of the last token


class _Piece(NamedTuple):
    """Rows ``r0:r1`` of the batch attend to the request's keys 0..kv_len-1."""

    r0: int
    r1: int
    base: int
    kv_len: int
    mask: torch.Tensor | None  # (r1 - r0, kv_len) bool, True = attend; None: see causal
    causal: bool


class ModelRunner:
    """Runs a :class:`~baobab.models.gpt.GPT` (Llama or GPT-2 variant) over scheduled tokens.

    The runner owns ``model``: with ``pack_weights`` its large float32 linears are swapped
    for :class:`PackedLinear` (its own ``forward`` still works).
    """

    def __init__(
        self,
        model: GPT,
        num_blocks: int,
        block_size: int,
        prefill_chunk_size: int,
        pack_weights: bool = True,
    ) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"the model runner serves gpt models; got a {type(model).__name__}.")
        cfg = model.cfg
        self.model = model.eval()
        self.cfg = cfg
        self.chunk = prefill_chunk_size
        self.device = next(model.parameters()).device
        self.dtype = model.tok_embeddings.weight.dtype
        if pack_weights:
            pack_linears(model)
        # Rows of the batch come in fours if any block linear runs through MKL; the rows
        # going into the head (one per sampled request) only if the head does.
        blocks_mkl = any(_is_linear(m) for m in model.layers.modules())
        self.row_multiple = 4 if blocks_mkl else 1
        self.head_multiple = 1 if isinstance(model.output, PackedLinear) else 4
        self.cache = KVCache(cfg, num_blocks, block_size, self.dtype, self.device)
        self.rope = cfg.position == "rope"
        self.gqa = cfg.n_kv_head != cfg.n_head

    # ---------------------------------------------------------------------- helpers
    def _pieces(self, seqs: Sequence[SeqInput]) -> list[_Piece]:
        """Attention work: each request's new tokens cut at multiples of ``chunk``."""
        pieces, row = [], 0
        for s in seqs:
            a, end = s.start, s.start + len(s.token_ids)
            while a < end:
                b = min(end, (a // self.chunk + 1) * self.chunk)
                n = b - a
                mask = None
                if n > 1 and a > 0:  # bottom-right causal: query i sees keys 0..a+i
                    keys = torch.arange(b, device=self.device)
                    queries = torch.arange(a, b, device=self.device)
                    mask = keys[None, :] <= queries[:, None]
                pieces.append(_Piece(row, row + n, s.base, b, mask, n > 1 and a == 0))
                row, a = row + n, b
        return pieces

    def _ffn(self, ffn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The block's feed-forward with position-independent activations (module docstring)."""
        if self.cfg.mlp == "swiglu":
            a = ffn.w1(h).float()
            gate = (a / (1.0 + torch.exp(-a))).to(h.dtype)  # silu
            return ffn.w2(gate * ffn.w3(h))
        u = ffn.w1(h).float()
        inner = _SQRT_2_OVER_PI * (u + 0.044715 * (u * u * u))
        return ffn.w2((0.5 * u * (1.0 + torch.tanh(inner))).to(h.dtype))  # gelu (tanh)

    def _attention(self, layer: int, q: torch.Tensor, pieces: list[_Piece]) -> torch.Tensor:
        """Each piece's queries against its own request's cached keys: (M, H * D)."""
        rows, heads, d = q.shape
        outs = []
        for p in pieces:
            keys, values = self.cache.view(layer, p.base, p.kv_len)  # (1, Hkv, L, D)
            query = q.as_strided(  # (1, H, n, D) view of rows r0:r1
                (1, heads, p.r1 - p.r0, d),
                (0, d, heads * d, 1),
                q.storage_offset() + p.r0 * heads * d,
            )
            outs.append(
                F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=p.mask, is_causal=p.causal, enable_gqa=self.gqa
                )
            )
        y = torch.cat(outs, dim=2)[0].transpose(0, 1).reshape(-1, heads * d)  # (m, H * D)
        if y.shape[0] < rows:  # padding rows attend to nothing
            y = torch.cat([y, y.new_zeros(rows - y.shape[0], heads * d)])
        return y

    # ---------------------------------------------------------------------- the step
    @torch.inference_mode()
    def execute(self, seqs: Sequence[SeqInput], all_logits: bool = False) -> torch.Tensor:
        """Compute the scheduled tokens, store their keys and values, return logits.

        Returns float32 (N, V): one row per ``seq`` with ``sample`` set, in order, or with
        ``all_logits`` one row per scheduled token (tests).
        """
        cfg, model, dev = self.cfg, self.model, self.device
        ids, positions, where, out_rows = [], [], [], []
        for s in seqs:
            n = len(s.token_ids)
            if s.start + n > cfg.max_seq_len:
                raise ValueError(
                    f"position {s.start + n - 1} is past the model's context of "
                    f"{cfg.max_seq_len} tokens."
                )
            ids.extend(s.token_ids)
            positions.extend(range(s.start, s.start + n))
            where.extend(range(s.base + s.start, s.base + s.start + n))
            if all_logits:
                out_rows.extend(range(len(ids) - n, len(ids)))
            elif s.sample:
                out_rows.append(len(ids) - 1)
        pad = _round_up(len(ids), self.row_multiple) - len(ids)
        ids_t = torch.tensor(ids + [0] * pad, device=dev)  # (M,) padding: token 0 ...
        pos_t = torch.tensor(positions + [0] * pad, device=dev)  # (M,) ... at position 0 ...
        where_t = torch.tensor(where + [self.cache.scratch] * pad, device=dev)  # ... in scratch
        pieces = self._pieces(seqs)

        x = model.tok_embeddings(ids_t)  # (M, C)
        if model.pos_embeddings is not None:
            x = x + model.pos_embeddings(pos_t)
        if self.rope:
            cos = model.rope_cos[pos_t].to(x.dtype)[:, None, :]  # (M, 1, D)
            sin = model.rope_sin[pos_t].to(x.dtype)[:, None, :]
        rows, d = ids_t.shape[0], cfg.head_dim
        for i, layer in enumerate(model.layers.values()):
            attn = layer.attention
            h = layer.attention_norm(x)
            q = attn.wq(h).view(rows, -1, d)  # (M, H, D)
            k = attn.wk(h).view(rows, -1, d)  # (M, Hkv, D)
            v = attn.wv(h).view(rows, -1, d)
            if self.rope:  # apply_rotary's formula, per row's own position
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
            self.cache.write(i, where_t, k, v)
            x = x + attn.wo(self._attention(i, q.contiguous(), pieces))
            x = x + self._ffn(layer.feed_forward, layer.ffn_norm(x))
        # Only the rows whose logits are wanted go through the norm and the head.
        wanted = len(out_rows)
        out_rows += [0] * (_round_up(wanted, self.head_multiple) - wanted)
        h = model.norm(x[torch.tensor(out_rows, device=dev, dtype=torch.long)])  # (N, C)
        return model.output(h).float()[:wanted]  # (N, V)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
