"""Quantized linears through torch's fused int8/int4 kernels: they match the dequantized
weight within bf16 rounding, fall back to it where the kernels cannot run, and give a row
the same bits whatever the rows beside it (what the serving runner's batch invariance
relies on, without padding rows to fours)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from baobab.export import quantize as q

# (bits, group_size, symmetric): int8 and every int4 flavour.
KINDS = [(8, None, True)] + [(4, g, s) for g in q.GROUP_SIZES for s in (False, True)]
KIND_IDS = [f"int{b}" + (f"-g{g}-{'sym' if s else 'asym'}" if b == 4 else "") for b, g, s in KINDS]


def quantized(out_features: int, in_features: int, bits: int, group_size, symmetric, bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        linear.weight[0, 3] = 0.7  # an outlier in one row / group
    if bits == 8:
        return q.Int8WeightOnlyLinear.from_linear(linear)
    return q.Int4WeightOnlyLinear.from_linear(linear, group_size, symmetric)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), KINDS, ids=KIND_IDS)
def test_fused_forward_matches_the_dequantized_weight_within_bf16_rounding(
    bits, group_size, symmetric
):
    module = quantized(48, 256, bits, group_size, symmetric)
    assert module.fused_kernel() is not None  # 48 rows: the int4 kernel packs 16 at a time
    x = torch.randn(3, 5, 256)
    # What the kernel is given: x, scales and zeros rounded to bf16 (8 significant bits).
    rounded = copy.deepcopy(module)
    rounded.scales = module.scales.bfloat16().float()
    if bits == 4 and not symmetric:
        rounded.zeros = module.zeros.bfloat16().float()
    with torch.no_grad():
        got = module(x)
        half = module(x.bfloat16())
        exact = nn.functional.linear(x, module.dequantize(), module.bias)  # fp32 reference
        want = nn.functional.linear(x.bfloat16().float(), rounded.dequantize(), module.bias)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 48)
    assert half.dtype == torch.bfloat16 and half.shape == (3, 5, 48)
    # The kernel's output is bf16: each element is off by up to 2^-9 of itself, plus
    # summation order (twice that in bf16, where the bias is added in bf16 too). > 0: the
    # fused kernel ran, not the fp32 fallback.
    top = want.abs().max()
    assert 0 < (got - want).abs().max() / top < 5e-3
    assert (half.float() - want).abs().max() / top < 1e-2
    # Against the unrounded weight: a zero rounded to bf16 (up to 2^-9 of a group's
    # midpoint) shifts the whole group; 1.7e-2 seen here for int4, groups of 128 with an
    # outlier, 5e-3 for int8.
    assert (got - exact).abs().max() / exact.abs().max() < (2.5e-2 if bits == 4 else 1e-2)


def test_the_kernel_is_prepared_once_and_remade_for_a_new_weight():
    module = quantized(32, 64, 4, 32, False)
    kernel = module.fused_kernel()
    assert module.fused_kernel() is kernel  # not prepared again per call
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = module(x)
        module.weight = q.unpack_int4(module.weight).flip(1)[:, 0::2].contiguous()
        assert module.fused_kernel() is not kernel
        assert not torch.equal(module(x), before)
    assert "_fused" not in dict(module.named_buffers()) and len(module.state_dict()) == 4


def test_where_the_kernel_cannot_run_forward_dequantizes():
    odd = quantized(24, 64, 4, 32, False)  # the CPU int4 kernel needs out_features % 16 == 0
    assert odd.fused_kernel() is None
    x = torch.randn(4, 64, requires_grad=True)
    want = nn.functional.linear(x, odd.dequantize(), odd.bias)
    assert torch.equal(odd(x), want)
    int8 = quantized(32, 64, 8, None, True)
    out = int8(x)  # an input that needs grad: the fused ops have no backward
    assert torch.equal(out, nn.functional.linear(x, int8.dequantize(), int8.bias))
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), KINDS[:2], ids=KIND_IDS[:2])
def test_fused_rows_do_not_depend_on_the_batch(threads, bits, group_size, symmetric):
    module = quantized(96, 128, bits, group_size, symmetric)
    x = torch.randn(128)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            alone = module(x[None])[0]
            for m in (2, 3, 5, 8, 13, 64, 100):
                for row in (0, m // 2, m - 1):
                    batch = torch.randn(m, 128)
                    batch[row] = x
                    assert torch.equal(module(batch)[row], alone), (m, row)
    finally:
        torch.set_num_threads(before)


@pytest.mark.cuda
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), KINDS, ids=KIND_IDS)
def test_cuda_kernels_match_the_cpu_ones(bits, group_size, symmetric):
    module = quantized(64, 256, bits, group_size, symmetric)
    x = torch.randn(7, 256)
    with torch.no_grad():
        cpu = module(x)
        gpu = module.to("cuda")
        assert gpu.fused_kernel() is not None
        got = gpu(x.cuda()).cpu()
        want = nn.functional.linear(x, module.dequantize().cpu(), module.bias.cpu())
    assert (got - want).abs().max() / want.abs().max() < 1.6e-2
    assert (got - cpu).abs().max() / want.abs().max() < 1.6e-2


def test_int8_weights_and_inputs_off_a_64_byte_boundary_are_aligned_first():
    # torch 2.13's CPU int8 kernel crashes on them; safetensors can load weights so.
    module = quantized(64, 192, 8, None, True)
    with torch.no_grad():
        storage = torch.empty(64 * 192 + 8, dtype=torch.int8)
        module.weight = storage[8:].view(64, 192).copy_(module.weight)  # 8 bytes off
        x = torch.randn(32 * 192 + 4).bfloat16()[4:].view(32, 192)  # 8 bytes off
        assert module.weight.data_ptr() % 64 and x.data_ptr() % 64
        got = module(x)  # before the fix: SIGSEGV
        assert torch.equal(got, module(x.clone()))  # the clone starts aligned
    assert module.weight.data_ptr() % 64 == 0  # replaced by an aligned copy, once
    assert torch.equal(module.weight, storage[8:].view(64, 192))
    assert module.fused_kernel() is module.fused_kernel()
