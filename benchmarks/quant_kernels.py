"""Weight-only int8/int4 matmul kernels on this CPU, against the fp32 linear and against
dequantize-then-``F.linear`` (baobab's quantized forward where no fused kernel runs).

torch's CPU build ships fused weight-only kernels: ``aten._weight_int8pack_mm`` (int8
weight, per-channel scales) and ``aten._weight_int4pack_mm_for_cpu`` (int4 weight packed by
``aten._convert_weight_to_int4pack_for_cpu``, group-wise scales and zeros). Which
activation dtypes take their fast paths is not documented, so this script times each
kernel for fp32 and bf16 activations at decode (1 row) and small-batch (16 rows) shapes of
the gpt2-124m shape's linears, best of ``--repeats`` calls each, interleaved; checks each
against the same quantized weight dequantized to fp32 (the largest error relative to the
largest output), and that a row's result does not depend on the rows beside it (bit for
bit: what serving's batch invariance needs). Prints a table of milliseconds and speed-ups
over fp32.

    python benchmarks/quant_kernels.py [--threads 2] [--repeats 30] [--group-size 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (name, out_features, in_features): the gpt2-124m shape's block linears and its head (the
# vocabulary padded to 50304, as GPT-2 trainers do: the int4 packing wants out % 16 == 0).
SHAPES = [("wq/wk/wv/wo", 768, 768), ("w1/w3", 2048, 768), ("w2", 768, 2048), ("head", 50304, 768)]
ROWS = (1, 16)


def best_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up: first-call allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def row_invariant(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Each row alone gives the bits it gets inside the batch."""
    full = fn(x)
    return all(torch.equal(full[i : i + 1], fn(x[i : i + 1])) for i in range(x.shape[0]))


def kernels(
    out_f: int, in_f: int, group: int
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, torch.Tensor]]:
    """(name -> f(x (M, in) float32) -> (M, out), each with its weights prepared once;
    name -> the fp32 weight (out, in) whose product it should equal)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02  # (out, in) fp32
    scales = w.abs().amax(dim=1) / 127  # int8, per output channel
    q8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    grouped = w.view(out_f, in_f // group, group)  # int4, asymmetric per group
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    s4 = (hi - lo) / 15
    q4 = torch.round((grouped - lo[..., None]) / s4[..., None]).clamp(0, 15).view(out_f, in_f)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 1)
    # The kernel computes (q - 8) * scale + zero: zero = lo + 8 * scale. (in/g, out, 2)
    sz = torch.stack([s4, lo + 8 * s4], dim=-1).transpose(0, 1).contiguous()
    w_bf16, s8_bf16, sz_bf16 = w.bfloat16(), scales.bfloat16(), sz.bfloat16()
    deq8 = q8.float() * scales[:, None]
    deq4 = ((q4.view(out_f, -1, group) - 8) * s4[..., None] + (lo + 8 * s4)[..., None]).view(out_f, in_f)  # fmt: skip
    reference = {"fp32 linear": w, "bf16 linear": w, "int8 dequantize": deq8}
    reference.update({f"int8pack {d} x": deq8 for d in ("fp32", "bf16")})
    reference.update({f"int4pack {d} x": deq4 for d in ("fp32", "bf16")})

    def int8_pack(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        s = scales if dtype == torch.float32 else s8_bf16
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(dtype), q8, s).float()

    def int4_pack(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        table = sz if dtype == torch.float32 else sz_bf16
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(dtype), packed4, group, table
        ).float()

    fns = {
        "fp32 linear": lambda x: F.linear(x, w),
        "bf16 linear": lambda x: F.linear(x.bfloat16(), w_bf16).float(),
        "int8 dequantize": lambda x: F.linear(x, q8.float() * scales[:, None]),
        "int8pack fp32 x": int8_pack(torch.float32),
        "int8pack bf16 x": int8_pack(torch.bfloat16),
        "int4pack fp32 x": int4_pack(torch.float32),
        "int4pack bf16 x": int4_pack(torch.bfloat16),
    }
    return fns, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s); best of {args.repeats} calls; x = speed-up over fp32 linear")  # fmt: skip
    print(
        f"{'linear (out x in)':<24} {'rows':>4}  {'kernel':<24} {'ms':>9} {'x':>7}  {'rel err':>8}  row-invariant"
    )
    for name, out_f, in_f in SHAPES:
        fns, reference = kernels(out_f, in_f, args.group_size)
        for rows in ROWS:
            x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
            # Interleave: every kernel once per pass, so drift of a shared machine hits all.
            times = {k: float("inf") for k in fns}
            for _ in range(3):
                for k, fn in fns.items():
                    times[k] = min(
                        times[k], best_ms(lambda fn=fn, x=x: fn(x), args.repeats // 3 or 1)
                    )
            for k, fn in fns.items():
                label = f"{name} ({out_f}x{in_f})"
                speedup = times["fp32 linear"] / times[k]
                inv = "yes" if row_invariant(fn, x) else "NO"
                want = F.linear(x, reference[k])
                err = ((fn(x) - want).abs().max() / want.abs().max()).item()
                print(f"{label:<24} {rows:>4}  {k:<24} {times[k]:>9.3f} {speedup:>6.2f}x  "
                      f"{err:>8.1e}  {inv}")  # fmt: skip


if __name__ == "__main__":
    main()
