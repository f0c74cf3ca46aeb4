"""torch's fused weight-only int8/int4 matmuls for the quantized linears of ``quantize.py``.

No kernel of baobab's own: the ``aten`` ops torch ships, with the stored weights converted
once into the layout each op wants (:func:`prepare_int8`, :func:`prepare_int4`). Every op
here runs in bfloat16 activations: on CPU the int8 and int4 kernels are fast only for
bf16 inputs (``benchmarks/quant_kernels.py``: fp32 inputs take a scalar path, 2-50x
slower than the fp32 linear), and CUDA's int4 kernel takes nothing else.

* int8, CPU and CUDA: ``aten._weight_int8pack_mm(x (M, K), q int8 (N, K), scales (N,))``,
  the stored weight itself (no copy), scales in x's dtype. On CPU (torch 2.13, AVX512) it crashes
  (SIGSEGV) when x or q does not start on a 64-byte boundary, as tensors safetensors loads
  may not: both go in 64-byte aligned (:func:`aligned`).
* int4, CPU: ``aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K) in 0..15, 1)`` then
  ``aten._weight_int4pack_mm_for_cpu``; needs N % 16 == 0.
* int4, CUDA (compute capability 8.0 or later): ``aten._convert_weight_to_int4pack(q uint8
  (N, K / 2) with element 2k in the HIGH nibble, inner_k_tiles)`` then
  ``aten._weight_int4pack_mm``; needs N % 8 == 0.

Both int4 ops compute ``(q - 8) * scale + zero`` per group, with ``scales_and_zeros``
(K / g, N, 2) in x's dtype: baobab's stored zeros are already ``min + 8 * scale``, and a
symmetric weight has zero 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KERNEL_DTYPE = torch.bfloat16
CPU_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs 16 output rows at once
CUDA_INT4_N_MULTIPLE = 8

# x (M, K) bf16 -> (M, N) bf16, with the prepared weights bound.
Kernel = Callable[[torch.Tensor], torch.Tensor]
ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every new tensor to it


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it that starts on a 64-byte boundary."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def _cuda_int4_ok(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # bf16 tensor-core kernel


def int8_supported(weight: torch.Tensor) -> bool:
    """The fused int8 op runs on this (N, K) int8 weight's device."""
    return weight.device.type in ("cpu", "cuda")


def int4_supported(weight: torch.Tensor) -> bool:
    """The fused int4 op runs on this packed (N, K / 2) weight's device and shape."""
    n = weight.shape[0]
    if weight.device.type == "cpu":
        return n % CPU_INT4_N_MULTIPLE == 0
    if weight.device.type == "cuda":
        return n % CUDA_INT4_N_MULTIPLE == 0 and _cuda_int4_ok(weight.device)
    return False


def prepare_int8(weight: torch.Tensor, scales: torch.Tensor) -> Kernel:
    """The int8 op over ``weight`` (N, K) int8, 64-byte aligned and bound as it is, and
    fp32 scales (N,)."""
    if weight.data_ptr() % ALIGNMENT:
        raise ValueError("the int8 weight must start on a 64-byte boundary; pass aligned(weight)")
    op, scales = torch.ops.aten._weight_int8pack_mm, scales.to(KERNEL_DTYPE)
    return lambda x: op(x, weight, scales)


def _scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """fp32 scales and zeros (N, G) -> (G, N, 2) in the kernel dtype; zero 0 if symmetric."""
    zeros = torch.zeros_like(scales) if zeros is None else zeros
    return torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)


def prepare_int4(
    values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> Kernel:
    """The int4 op over ``values`` uint8 (N, K) in 0..15 (the stored weight unpacked),
    repacked into the op's layout (a new tensor of K / 2 bytes per row)."""
    table = _scales_and_zeros(scales, zeros)
    if values.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
    else:  # cuda: element 2k in the high nibble; K is a multiple of 32 (the smallest group)
        pairs = (values[:, 0::2] << 4) | values[:, 1::2]  # (N, K / 2) uint8
        k = values.shape[1]
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
        op = torch.ops.aten._weight_int4pack_mm
    return lambda x: op(x, packed, group_size, table)


def fused_linear(x: torch.Tensor, kernel: Kernel, bias: torch.Tensor | None) -> torch.Tensor:
    """``kernel`` on ``x`` (..., K) in bf16, the result (..., N) back in x's dtype (+ bias)."""
    rows = aligned(x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous())  # (M, K)
    out = kernel(rows).to(x.dtype)  # (M, N)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])
