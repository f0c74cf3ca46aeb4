"""Weight-only int8/int4 quantization as a module swap, and quantized export directories.

Like gpt-fast, every ``nn.Linear`` (but the skipped ones, e.g. a head tied to the token
embedding) is replaced by a module that stores integer weights; the model's own
``forward`` never branches on quantization. ``forward`` runs torch's fused weight-only
kernel (``quant_fused.py``: bf16 activations, the weight converted to the kernel's layout
once, on first use or at load) on CPU and CUDA, and dequantizes the weight and runs
``F.linear`` where that kernel cannot run: another device, an int4 linear whose
out_features is not a multiple of 16 (CPU) or 8 (CUDA), int4 on a GPU older than sm80, or
an input that requires grad.

* int8: per-output-channel symmetric. ``w ≈ q * scale[o]`` with q in [-127, 127] and
  ``scale[o] = max_i |w[o, i]| / 127``, so every element is off by at most scale / 2.
* int4: group-wise along the input dim (groups of ``group_size`` = 32, 64 or 128), two
  values packed per uint8 (element 2k in the low nibble, 2k + 1 in the high one).
  Asymmetric (default, gpt-fast's layout): ``w ≈ (q - 8) * scale + zero`` with q in
  [0, 15], ``scale = (max - min) / 15`` and ``zero = min + 8 * scale`` per group.
  Symmetric: ``w ≈ (q - 8) * scale`` with ``scale = max |w| / 7``. Either way every
  element is off by at most scale / 2. Scales and zeros are fp32.

A quantized export directory is an export directory (see ``artifact.py``) whose
config.json also has ``"quantization": {"bits", "group_size", "skip", "symmetric"}``.
:func:`load_quantized` rebuilds it on the meta device, swaps in empty quantized modules
and assigns the stored tensors: nothing is quantized at load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model
from torch import nn

from baobab.export.artifact import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, read_config
from baobab.export.atomic import atomic_directory
from baobab.export.quant_fused import (
    Kernel,
    aligned,
    fused_linear,
    int4_supported,
    int8_supported,
    prepare_int4,
    prepare_int8,
)
from baobab.models.common.init import load_weights

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
DEFAULT_SKIP = ("output", "lm_head")


# ---------------------------------------------------------------------------- the math
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and fp32 scales (out,), per-channel symmetric."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, in) float -> packed uint8 (out, in // 2), fp32 scales and zeros (out, in // g)."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scales = (w.abs().amax(dim=2) / 7).clamp(min=tiny)  # (out, G)
        zeros = None
        q = torch.round(w / scales[..., None]).clamp(-8, 7) + 8
    else:
        lo, hi = w.amin(dim=2), w.amax(dim=2)  # (out, G)
        scales = ((hi - lo) / 15).clamp(min=tiny)
        zeros = lo + 8 * scales
        q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(out_features, in_features)  # values 0..15
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in // 2)
    return packed, scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in // 2) -> uint8 (out, in) with values 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------- the modules
class _WeightOnlyLinear(nn.Module):
    """What the int8 and int4 linears share: ``forward`` through the fused kernel, prepared
    once per stored weight, or through the dequantized weight where it cannot run.

    The prepared kernel is a plain attribute (not in the state dict: the export format is
    the stored buffers alone), remade when ``weight`` is another tensor (moved, loaded)."""

    weight: torch.Tensor
    bias: nn.Parameter | None

    def _init_fused(self) -> None:
        self._fused_source: torch.Tensor | None = None  # the weight `_fused` was made from
        self._fused: Kernel | None = None

    def _kernel_supported(self) -> bool:
        raise NotImplementedError

    def _prepare_kernel(self) -> Kernel:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def fused_kernel(self) -> Kernel | None:
        """The fused op with this weight bound (made now if not yet), or None where it
        cannot run (then ``forward`` dequantizes)."""
        if self._fused_source is not self.weight:
            ready = not self.weight.is_meta and self._kernel_supported()
            with torch.no_grad():
                self._fused = self._prepare_kernel() if ready else None
            self._fused_source = self.weight  # after: the int8 one may align its weight
        return self._fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.fused_kernel()
        if kernel is None or x.requires_grad:  # the fused ops have no backward
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self.dequantize(x.dtype), bias)
        return fused_linear(x, kernel, self.bias)


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """``nn.Linear`` with an int8 weight (out, in) and fp32 per-output-channel scales (out,).

    ``forward`` runs ``aten._weight_int8pack_mm`` on CPU and CUDA (bf16 activations, the
    stored weight itself, moved to a 64-byte boundary once if need be), else dequantizes
    (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        )
        self._init_fused()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device)
        module.weight, module.scales = quantize_int8(w)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scales[:, None]).to(dtype)  # (out, in)

    def _kernel_supported(self) -> bool:
        return int8_supported(self.weight)

    def _prepare_kernel(self) -> Kernel:
        # The kernel binds the weight itself: one not 64-byte aligned (safetensors may load
        # it so) becomes an aligned copy of itself, once, rather than a second copy.
        self.weight = aligned(self.weight)
        return prepare_int8(self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """``nn.Linear`` with a group-wise 4-bit weight packed two per byte (out, in // 2).

    ``forward`` runs torch's int4 kernel (bf16 activations; the weight repacked into its
    layout once, an extra in // 2 bytes per row) where out_features is a multiple of 16
    on CPU, or of 8 on an sm80+ GPU; else it dequantizes (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 64,
        symmetric: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_group_size(group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("weight", packed)
        self.register_buffer("scales", torch.empty(out_features, groups, device=device))
        zeros = None if symmetric else torch.empty(out_features, groups, device=device)
        self.register_buffer("zeros", zeros)
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        )
        self._init_fused()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 64, symmetric: bool = False
    ) -> Int4WeightOnlyLinear:
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            symmetric,
            w.device,
        )
        module.weight, module.scales, module.zeros = quantize_int4(w, group_size, symmetric)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4(self.weight).to(torch.float32) - 8  # (out, in)
        q = q.view(self.out_features, -1, self.group_size)  # (out, G, g)
        w = q * self.scales[..., None]
        if self.zeros is not None:
            w = w + self.zeros[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def _kernel_supported(self) -> bool:
        return int4_supported(self.weight)

    def _prepare_kernel(self) -> Kernel:
        values = unpack_int4(self.weight)  # (out, in) in 0..15
        return prepare_int4(values, self.scales, self.zeros, self.group_size)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, {kind}"
        )


QUANTIZED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear)


def check_group_size(group_size: int, in_features: int | None = None) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of 32, 64, 128, got {group_size!r}")
    if in_features is not None and in_features % group_size:
        raise ValueError(
            f"in_features {in_features} is not divisible by group_size {group_size}; "
            "choose a group_size that divides it"
        )


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")


# --------------------------------------------------------------------------- the swap
def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules to swap: all but those whose path or last name is in ``skip``."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name not in skip and name.rsplit(".", 1)[-1] not in skip
    ]


def _swap(
    model: nn.Module, skip: tuple[str, ...], build: Callable[[str, nn.Linear], nn.Module]
) -> nn.Module:
    targets = _targets(model, skip)
    new = [(name, build(name, linear)) for name, linear in targets]  # all built, then swapped
    for name, module in new:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return model


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int = 64,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    symmetric: bool = False,
) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (in place) for its weight-only quantized twin.

    Args:
        bits: 8 (per-channel int8) or 4 (group-wise int4).
        group_size: int4 group along the input dim: 32, 64 or 128 (ignored for int8).
        skip: module paths or last names to leave in float (default: the output head,
            which a GPT ties to its token embedding).
        symmetric: int4 without zero points (int8 is always symmetric).
    """
    check_bits(bits)
    skip = tuple(skip)
    if bits == 4:
        check_group_size(group_size)
        for name, linear in _targets(model, skip):  # validate all before swapping any
            if linear.in_features % group_size:
                raise ValueError(
                    f"layer '{name}' has in_features {linear.in_features}, which is not "
                    f"divisible by group_size {group_size}; choose a group_size that divides it"
                )
    with torch.no_grad():
        if bits == 8:
            return _swap(model, skip, lambda _, lin: Int8WeightOnlyLinear.from_linear(lin))
        return _swap(
            model, skip, lambda _, lin: Int4WeightOnlyLinear.from_linear(lin, group_size, symmetric)
        )


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """What was quantized: {"bits", "group_size", "skip", "symmetric"} read from the modules."""
    found = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)]
    if not found:
        return None
    first = found[0]
    bits = 8 if isinstance(first, Int8WeightOnlyLinear) else 4
    return {
        "bits": bits,
        "group_size": first.group_size if bits == 4 else None,
        "symmetric": first.symmetric if bits == 4 else True,
    }


# ----------------------------------------------------------------------- save and load
def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    config: dict[str, Any],
    tokenizer_file: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model as model.safetensors + config.json (+ tokenizer.json), atomically.

    ``config`` is the export config (see ``artifact.py``) with a ``"quantization"`` entry
    ``{"bits", "group_size", "skip", "symmetric"}`` (as :func:`quantize_export` writes it).
    """
    if "quantization" not in config:
        raise ValueError("config has no 'quantization' entry; pass the dict quantize_export builds")
    out = Path(out_dir)
    with atomic_directory(out, overwrite) as tmp:
        # save_model stores tied tensors once and makes every tensor contiguous.
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_file is not None and Path(tokenizer_file).is_file():
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    return out


def load_quantized(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a quantized export (the loader for what ``baobab quantize`` writes), eval mode.

    The model is built on the meta device, empty quantized modules are swapped in and the
    stored tensors are assigned: nothing is quantized here. Use
    ``baobab.export.load_exported`` for an unquantized export.
    """
    from baobab import models

    path = Path(path)
    config = read_config(path)
    quant = config.get("quantization")
    if not quant:
        raise ValueError(f"'{path}' is not a quantized export; load it with load_exported")
    bits, group_size = quant["bits"], quant.get("group_size") or 64
    symmetric = bool(quant.get("symmetric", False))
    check_bits(bits)
    described = config["model"]
    cfg = models.get_config(described["name"], **described["config"])
    model = models.build_model(cfg, device="meta")

    def empty(_: str, lin: nn.Linear) -> nn.Module:
        bias = lin.bias is not None
        if bits == 8:
            return Int8WeightOnlyLinear(lin.in_features, lin.out_features, bias, "meta")
        return Int4WeightOnlyLinear(
            lin.in_features, lin.out_features, bias, group_size, symmetric, "meta"
        )

    _swap(model, tuple(quant.get("skip", DEFAULT_SKIP)), empty)
    stored = load_file(path / MODEL_FILE, device=str(torch.device(device)))
    load_weights(model, stored, str(path / MODEL_FILE), against="its config.json")
    for module in model.modules():  # the fused kernels' weight layouts, made once, now
        if isinstance(module, QUANTIZED_LINEARS):
            module.fused_kernel()
    return model.eval(), config


def quantize_export(
    in_dir: str | Path,
    out_dir: str | Path,
    bits: int,
    group_size: int = 64,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    symmetric: bool = False,
    overwrite: bool = False,
) -> Path:
    """Read a ``baobab export`` directory and write its weight-only quantized twin.

    Load the result with :func:`load_quantized`.
    """
    from baobab.export.artifact import load_exported

    check_bits(bits)
    if bits == 4:
        check_group_size(group_size)
    in_dir = Path(in_dir)
    config = read_config(in_dir)
    if config.get("quantization"):
        raise ValueError(f"'{in_dir}' is already quantized; quantize the unquantized export")
    model, config = load_exported(in_dir)
    quantize_model(model, bits, group_size, skip, symmetric)
    config = {
        **config,
        "quantization": {
            "bits": bits,
            "group_size": group_size if bits == 4 else None,
            "skip": list(skip),
            "symmetric": symmetric if bits == 4 else True,
        },
    }
    tokenizer = in_dir / TOKENIZER_FILE
    return save_quantized(model, out_dir, config, tokenizer, overwrite=overwrite)
