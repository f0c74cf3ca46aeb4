"""The model runner: one forward of a GPT over every scheduled token, with a paged KV cache.

Shape legend: M rows (scheduled tokens, padded), C d_model, H heads, Hkv kv heads,
D head_dim, V vocab_size, L keys a query attends to.

The block math is the model's own (``baobab.models.gpt``). The runner's job is what is
left: pack the step's scheduled tokens, decodes and prefill chunks of all requests, into
one sequence of M rows (each with its own position) that goes through every linear
together; supply the attention backend (:class:`_PagedAttention`: the cache writes, and
each request attending to its own run of cache positions); compute the head only for the
rows whose logits are wanted; and keep a row's bits independent of its batch mates.

Batch invariance (greedy output under load equals one-at-a-time output, bit for bit):
a row's result must not depend on its batch mates. What was found on CPU (torch 2.13, MKL),
and the module swaps (DESIGN principle 3) the runner applies to the model for it:

* ``F.linear`` is not row-invariant: M=1 runs a GEMV, and MKL's GEMM treats rows in
  blocks of 4 with a different kernel for the leftover rows, so a row's bits depend on M.
  Two ways out, both giving a row the same bits for any M and row position (checked at 1
  and 2 threads by ``test_linear_rows_do_not_depend_on_the_batch``):

  - oneDNN with the weight reordered once (``mkldnn._reorder_linear_weight``): the same
    bits for every M, at GEMV speed for M=1, but ~40 us of fixed cost per call. Large
    float32 ``nn.Linear`` modules are swapped for :class:`PackedLinear`: batch-1 decode
    of a big model stays memory-bound.
  - MKL with rows padded to a multiple of 4, so every row goes through its 4-row kernel:
    used for the small linears (call overhead matters more than bandwidth there) and for
    whatever cannot be packed (int8/int4 weight-only modules, bfloat16, GPU).
* SiLU/GELU kernels compute a vector-width tail with a scalar formula that differs in the
  last bit, and where the tail falls depends on M; the model's activation modules are
  swapped for :class:`ComposedSiLU` / :class:`ComposedGELU`, built from ``exp``/``tanh``
  (MKL VML: position-independent) and exact IEEE ops.
* Attention of prefill chunks runs per request (batched SDPA's bits depend on the batch
  size once torch uses 2+ threads, and padding keys to a common length changes every
  reduction), and a chunk's result depends on its bounds, so chunks start at fixed
  multiples of ``prefill_chunk_size`` (the scheduler's rule, re-applied here).
* One-query pieces (decodes) of small models are batched instead (per-request SDPA costs
  ~20-60 us per request and layer, a quarter of gpt-mini's step at 16 requests): each
  request's keys are padded, masked, to a bucket length that depends on its own length
  only (``_bucket``), gathered into one tensor, and requests of one bucket go through
  ``matmul`` / ``softmax`` / ``matmul`` together, whose per-matrix and per-row results do
  not depend on the batch size (checked at 1 and 2 threads by
  ``test_batched_decode_attention_is_bitwise_independent_of_batch_mates``). The gather
  copies every key and value it reads, so once a request's bucket holds more than
  ``gather_max_bytes`` per layer (the gpt2-124m shape: 768 KiB at 128 keys) the copy costs
  more than the per-call overhead it saves, and the decode reads its cache view in place
  with its own SDPA call, like a prefill chunk. The choice depends on the request's own
  length only.
* Linears over the same input (wq/wk/wv, w1/w3) are swapped for parts of one fused linear
  (:class:`FusedLinears`), packed or not: one call instead of three (two); the fused
  weight is fixed, so a row's bits still depend on nothing but the row.
* Dropout modules (identity at inference, but ~5 us a call) are swapped for
  :class:`NoDropout`.

The runner's own modules (packed linears, fused parts, composed activations, NoDropout)
are inference-only and called dozens of times a step, so they set ``__call__ = forward``:
no hooks, and ~1-2 us less per call than ``nn.Module.__call__`` (measured: the block
structure of the shared forward otherwise costs gpt-mini ~5% of a decode step).

``tests/serve/test_kv_cache_runner.py`` checks this bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from baobab.export.quantize import QUANTIZED_LINEARS, Int8WeightOnlyLinear
from baobab.models.gpt import GPT
from baobab.serve.kv_cache import KVCache


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

    __call__ = forward  # inference only: no hooks, no nn.Module call machinery (~1 us)

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
    """A linear that runs through MKL, whose rows must come in fours: a plain ``nn.Linear``,
    or a quantized one that dequantizes. torch's fused int8/int4 kernels, which quantized
    linears run where they can, give a row the same bits whatever the rows beside it
    (tests/export/test_quant_fused.py)."""
    if isinstance(module, QUANTIZED_LINEARS):
        return module.fused_kernel() is None
    return isinstance(module, nn.Linear)


class FusedLinears(nn.Module):
    """Linears over one input as one: ``linear`` (or its packed swap) computes their outputs
    side by side, and :class:`_FusedPart` modules stand in for the originals.

    The model calls the parts one after another on the same input (``wq(x)``, ``wk(x)``,
    ``wv(x)``): the first part computes the fused output, the others take their slice of
    it. A part called on another tensor recomputes, so the result is always the fused
    linear of the part's own input; only the saving depends on the call order.
    """

    def __init__(self, linears: Sequence[nn.Linear | Int8WeightOnlyLinear]) -> None:
        super().__init__()
        first = linears[0]
        weight = torch.cat([m.weight.detach() for m in linears])  # (sum out, in)
        bias = None if first.bias is None else torch.cat([m.bias.detach() for m in linears])
        if type(first) is Int8WeightOnlyLinear:  # per output channel: scales stack too
            fused = Int8WeightOnlyLinear(first.in_features, weight.shape[0], bias is not None)
            fused.weight, fused.scales = weight, torch.cat([m.scales for m in linears])
        else:
            fused = nn.Linear(first.in_features, weight.shape[0], bias is not None, device="meta")
            fused.weight = nn.Parameter(weight, requires_grad=False)
        fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.linear: nn.Module = fused
        self.sizes = [m.out_features for m in linears]
        self._memo = _Memo()  # a plain object: nn.Module.__setattr__ costs ~8 us a call

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output ``index`` of the fused linear on ``x`` (..., in) -> (..., sizes[index])."""
        memo = self._memo
        if x is not memo.input:
            memo.input, memo.unread = x, len(self.sizes)
            memo.outputs = self.linear(x).split(self.sizes, -1)
        out = memo.outputs[index]
        memo.unread -= 1
        if not memo.unread:  # every part has read: hold no activations between steps
            memo.input, memo.outputs = None, ()
        return out


class _Memo:
    """The last input of a :class:`FusedLinears`, its outputs, and how many parts have
    not read them yet."""

    __slots__ = ("input", "outputs", "unread")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.unread = 0


class _FusedPart(nn.Module):
    """Stands in for one of the linears of a :class:`FusedLinears` (each part registers the
    shared module; ``named_modules`` lists it once, under the first part)."""

    def __init__(self, fused: FusedLinears, index: int) -> None:
        super().__init__()
        self.fused, self.index = fused, index
        self._part = fused.part  # a plain attribute: no nn.Module.__getattr__ per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._part(x, self.index)

    __call__ = forward  # five calls per block: skip nn.Module's call machinery (hooks)


def fuse_linears(parent: nn.Module, names: Sequence[str]) -> bool:
    """Swap ``parent``'s linears ``names`` for parts of one :class:`FusedLinears`; False
    (nothing swapped) unless all are plain ``nn.Linear`` or all int8 weight-only linears
    (per-channel: their rows stack), of one input size, all with or without bias (an int4
    or LoRA linear stays as it is)."""
    linears = [getattr(parent, name, None) for name in names]
    first = linears[0]
    if not all(
        type(m) is type(first) in (nn.Linear, Int8WeightOnlyLinear)
        and m.in_features == first.in_features
        and (m.bias is None) == (first.bias is None)
        for m in linears
    ):
        return False
    fused = FusedLinears(linears)
    for index, name in enumerate(names):
        setattr(parent, name, _FusedPart(fused, index))
    return True


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class ComposedSiLU(nn.Module):
    """``silu(x) = x / (1 + exp(-x))`` in float32 from ``exp`` and exact IEEE ops: an
    element's bits do not depend on where it falls in a vector (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if x.dtype == torch.float32 else x.float()  # no no-op dispatches
        y = a / (1.0 + torch.exp(-a))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    __call__ = forward


class ComposedGELU(nn.Module):
    """GELU, tanh approximation, composed like :class:`ComposedSiLU`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x if x.dtype == torch.float32 else x.float()
        inner = _SQRT_2_OVER_PI * (u + 0.044715 * (u * u * u))
        y = 0.5 * u * (1.0 + torch.tanh(inner))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    __call__ = forward


class NoDropout(nn.Module):
    """What replaces ``nn.Dropout`` at inference: its input, without a module call's cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    __call__ = forward


def make_batch_invariant(model: GPT, pack_weights: bool) -> None:
    """The runner's module swaps (module docstring), in place: fused wq/wk/wv and w1/w3,
    composed activations, no dropout modules, then (``pack_weights``) large float32
    linears packed for oneDNN. Fused before packing, so the fused weights are packed."""
    for block in model.layers.values():
        fuse_linears(block.attention, ["wq", "wk", "wv"])
        ffn = block.feed_forward
        if model.cfg.mlp == "swiglu":
            fuse_linears(ffn, ["w1", "w3"])
        ffn.act = ComposedSiLU() if model.cfg.mlp == "swiglu" else ComposedGELU()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Dropout):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NoDropout())
    if pack_weights:
        pack_linears(model)
    for module in model.modules():
        _call_forward_directly(module)


_DIRECT: dict[type, type] = {}


def _call_forward_directly(module: nn.Module) -> None:
    """Make calling ``module`` call its ``forward`` with no hook machinery, by giving it a
    subclass of its class whose ``__call__`` is ``forward``: the runner's model is
    inference-only, has no hooks, and runs ~18 module calls per block per step."""
    cls = type(module)
    if "__call__" in vars(cls):  # already direct (the runner's own modules)
        return
    if cls not in _DIRECT:
        _DIRECT[cls] = type(
            cls.__name__, (cls,), {"__call__": cls.forward, "__module__": cls.__module__}
        )
    module.__class__ = _DIRECT[cls]


# Above this many key and value bytes per layer in its bucket, a decode attends on its own
# (module docstring): the gather's copy then costs more than one SDPA call's overhead.
GATHER_MAX_BYTES = 2**18


def _bucket(kv_len: int) -> int:
    """Keys a one-query piece is padded to: the next power of two, at least 64. A function
    of the request's own length only, so its batch mates never change its numerics."""
    return max(64, 1 << (kv_len - 1).bit_length())


class SeqInput(NamedTuple):
    """One request's rows in a step: ``token_ids`` at positions ``start``, ``start + 1``, ...
    of the request whose keys and values live at cache positions from ``base``."""

    base: int
    start: int
    token_ids: Sequence[int]
    sample: bool  # return the logits of the last token
    all_rows: bool = False  # return the logits of every token (prompt logprobs)
    # Speculative verification: every token is its own one-query piece (the bits of a plain
    # decode step at its position) and every row's logits are returned.
    verify: bool = False


class _Piece(NamedTuple):
    """Rows ``r0:r1`` of the batch attend to the request's keys 0..kv_len-1."""

    r0: int
    r1: int
    base: int
    kv_len: int
    mask: torch.Tensor | None  # (r1 - r0, kv_len) bool, True = attend; None: see causal
    causal: bool


class _Decodes(NamedTuple):
    """One-query pieces whose keys are padded to the same bucket length ``Lb``: batch rows
    ``rows`` (G,) read cache positions ``where`` (G * Lb,) (scratch past each request's own
    keys, masked by ``bias`` (1, G, 1, Lb): 0 or -inf)."""

    rows: torch.Tensor
    where: torch.Tensor
    bias: torch.Tensor
    span: int | None  # rows are span, span + 1, ...: slices instead of index ops


class _PagedAttention:
    """One step's attention backend (``baobab.models.common.attention.Attend``).

    The model hands it the step's rows as one sequence of M tokens: q (1, H, M, D), k and v
    (1, Hkv, M, D). It writes k and v to the cache at ``where`` (M,), then each piece's
    queries attend to their own request's cached keys; padding rows attend to nothing.
    """

    def __init__(
        self,
        cache: KVCache,
        where: torch.Tensor,
        pieces: list[_Piece],
        groups: list[_Decodes],
        gqa: bool,
    ) -> None:
        self.cache, self.where, self.pieces, self.groups = cache, where, pieces, groups
        self.gqa = gqa
        # One group of decodes over rows 0..M-1 (all-decode steps): its output is y itself.
        self.whole = (
            not pieces
            and len(groups) == 1
            and groups[0].span == 0
            and len(groups[0].rows) == len(where)
        )

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        self.cache.write(layer, self.where, k[0], v[0])
        q = q[0].transpose(0, 1).contiguous()  # (M, H, D)
        rows, heads, d = q.shape
        # Padding rows attend to nothing (zeros).
        y = None if self.whole else q.new_zeros(rows, heads * d)
        for p in self.pieces:
            keys, values = self.cache.view(layer, p.base, p.kv_len)  # (1, Hkv, L, D)
            query = q.as_strided(  # (1, H, n, D) view of rows r0:r1
                (1, heads, p.r1 - p.r0, d),
                (0, d, heads * d, 1),
                q.storage_offset() + p.r0 * heads * d,
            )
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=p.mask, is_causal=p.causal, enable_gqa=self.gqa
            )
            y[p.r0 : p.r1] = out[0].transpose(0, 1).reshape(-1, heads * d)
        kv_heads = self.cache.heads
        for g in self.groups:
            n = g.rows.shape[0]
            keys, values = self.cache.gather(layer, g.where, n)  # (Hkv, G, Lb, D)
            mine = q[g.span : g.span + n] if g.span is not None else q.index_select(0, g.rows)
            # (Hkv, G, rep, D): query head h uses key head h // rep, as enable_gqa does.
            query = (mine * d**-0.5).view(n, kv_heads, -1, d).transpose(0, 1)
            scores = torch.matmul(query, keys.transpose(-1, -2)) + g.bias  # (Hkv, G, rep, Lb)
            out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (Hkv, G, rep, D)
            out = out.transpose(0, 1).reshape(n, heads * d)
            if y is None:
                return out[None]  # (1, M, H * D)
            if g.span is not None:
                y[g.span : g.span + n] = out
            else:
                y.index_copy_(0, g.rows, out)
        return y[None]  # (1, M, H * D)


class ModelRunner:
    """Runs a :class:`~baobab.models.gpt.GPT` (Llama or GPT-2 variant) over scheduled tokens.

    The runner owns ``model``: its modules are swapped for batch-invariant ones
    (:func:`make_batch_invariant`); its own ``forward`` still works.
    """

    def __init__(
        self,
        model: GPT,
        num_blocks: int,
        block_size: int,
        prefill_chunk_size: int,
        pack_weights: bool = True,
        gather_max_bytes: int = GATHER_MAX_BYTES,
    ) -> None:
        if not isinstance(model, GPT):
            raise ValueError(f"the model runner serves gpt models; got a {type(model).__name__}.")
        cfg = model.cfg
        self.model = model.eval()
        self.cfg = cfg
        self.chunk = prefill_chunk_size
        self.device = next(model.parameters()).device
        self.dtype = model.tok_embeddings.weight.dtype
        make_batch_invariant(model, pack_weights)
        # Rows of the batch come in fours if any block linear runs through MKL; the rows
        # going into the head (one per sampled request) only if the head does.
        blocks_mkl = any(_is_linear(m) for m in model.layers.modules())
        self.row_multiple = 4 if blocks_mkl else 1
        self.head_multiple = 1 if isinstance(model.output, PackedLinear) else 4
        self.cache = KVCache(cfg, num_blocks, block_size, self.dtype, self.device)
        # Decodes whose bucket holds at most this many keys are gathered and batched.
        row_bytes = 2 * cfg.n_kv_head * cfg.head_dim * self.dtype.itemsize  # one key + value
        self.gather_max_keys = gather_max_bytes // row_bytes
        self.gqa = cfg.n_kv_head != cfg.n_head
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._minus_inf = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        self._aranges: dict[int, torch.Tensor] = {}

    def _keys(self, length: int) -> torch.Tensor:
        """0..length-1 (length,), kept per bucket length."""
        keys = self._aranges.get(length)
        if keys is None:
            keys = self._aranges[length] = torch.arange(length, device=self.device)
        return keys

    def _pieces(self, seqs: Sequence[SeqInput]) -> tuple[list[_Piece], list[_Decodes]]:
        """Attention work: each request's new tokens cut at multiples of ``chunk``; pieces
        of one query (decodes) grouped by ``_bucket`` of their key count, unless the bucket
        is over ``gather_max_keys``."""
        pieces, single, row = [], {}, 0
        for s in seqs:
            a, end = s.start, s.start + len(s.token_ids)
            while a < end:
                b = a + 1 if s.verify else min(end, (a // self.chunk + 1) * self.chunk)
                n = b - a
                if n == 1 and _bucket(b) <= self.gather_max_keys:
                    single.setdefault(_bucket(b), []).append((row, s.base, b))
                    row, a = row + n, b
                    continue
                mask = None
                if a > 0 and n > 1:  # bottom-right causal: query i sees keys 0..a+i
                    keys = torch.arange(b, device=self.device)
                    queries = torch.arange(a, b, device=self.device)
                    mask = keys[None, :] <= queries[:, None]
                pieces.append(_Piece(row, row + n, s.base, b, mask, a == 0))
                row, a = row + n, b
        groups = []
        for length, members in single.items():
            rows, bases, lens = torch.tensor(list(zip(*members)), device=self.device)  # (G,)
            keys = self._keys(length)  # (Lb,)
            live = keys[None, :] < lens[:, None]  # (G, Lb)
            where = torch.where(live, bases[:, None] + keys, self.cache.scratch)
            bias = torch.where(live, self._zero, self._minus_inf)  # (G, Lb)
            first = members[0][0]
            span = first if all(m[0] == first + j for j, m in enumerate(members)) else None
            groups.append(_Decodes(rows, where.flatten(), bias[None, :, None, :], span))
        return pieces, groups

    @torch.inference_mode()
    def execute(self, seqs: Sequence[SeqInput], all_logits: bool = False) -> torch.Tensor:
        """Compute the scheduled tokens, store their keys and values, return logits.

        Returns float32 (N, V), in ``seqs`` order: every token's row for a ``seq`` with
        ``all_rows`` or ``verify`` set (or for all of them with ``all_logits``: tests), else its last
        token's row if ``sample`` is set. A row's bits do not depend on which others are
        returned (the head is row-invariant).
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
            if all_logits or s.all_rows or s.verify:
                out_rows.extend(range(len(ids) - n, len(ids)))
            elif s.sample:
                out_rows.append(len(ids) - 1)
        pad = _round_up(len(ids), self.row_multiple) - len(ids)
        # Padding rows: token 0 at position 0, written to the scratch position. One tensor
        # (3, M): ids, positions and cache positions of the step's M rows.
        rows = torch.tensor(
            [ids + [0] * pad, positions + [0] * pad, where + [self.cache.scratch] * pad],
            device=dev,
        )
        ids_t, pos_t, where_t = rows[0:1], rows[1:2], rows[2]  # (1, M), (1, M), (M,)
        attend = _PagedAttention(self.cache, where_t, *self._pieces(seqs), self.gqa)
        h = model.hidden_states(ids_t, pos_t, attend)[0]  # (M, C)
        # Only the rows whose logits are wanted go through the norm and the head.
        wanted = len(out_rows)
        out_rows += [0] * (_round_up(wanted, self.head_multiple) - wanted)
        head_rows = torch.tensor(out_rows, device=dev, dtype=torch.long)
        return model.logits(h[head_rows])[:wanted]  # (N, V) float32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
