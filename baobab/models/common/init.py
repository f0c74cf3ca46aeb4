"""Seeded, layout-independent initialisation: one full tensor at a time, by parameter name.

Every family builds its modules on the meta device (nothing allocated, no random numbers
drawn) and declares, as data, how each parameter and buffer starts: ``init_rules()`` maps
name patterns (``fnmatch``, e.g. ``"layers.*.attention.wo.weight"``) to an :data:`InitFn`
that fills one *full* tensor in place from a ``torch.Generator``. ``materialize`` then
allocates the model with ``to_empty`` and, parameter by parameter, creates the full tensor
on the device, fills it from a generator seeded by ``(seed, name)``, hands it to ``copy``
(plain ``copy_`` here; ``baobab.parallel.materialize`` passes one that keeps a DTensor's
local shard) and frees it. So:

- a value depends only on the seed and the parameter's name, never on construction order,
  on which parameters this rank holds or on how they are sharded: a one-process model and
  every parallel layout start from the same weights, bit for bit;
- at most one full parameter exists at a time beside the (sharded) model;
- buffers (RoPE tables, BatchNorm statistics) are computed by their rules too.

Loading (``load_weights``) assigns stored tensors to the meta model (``assign=True``) and
computes only what is not stored (non-persistent buffers): no random init is overwritten.

A module may define ``init_rules() -> dict[pattern, InitFn]`` with patterns relative to
itself; rules of deeper modules are tried first (a LoRA adapter's own rules before the
model's), then in dict order. A tensor that no rule matches is an error naming it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

InitFn = Callable[[torch.Tensor, torch.Generator], None]
"""Fills one full tensor in place, drawing random numbers only from the generator."""
CopyFn = Callable[[torch.Tensor, torch.Tensor], None]
"""``copy(target, full)``: write the part of ``full`` this process holds into ``target``."""


# --- init functions (the distributions the families use) ------------------------------


def normal(std: float, mean: float = 0.0) -> InitFn:
    """N(mean, std^2)."""
    return lambda t, g: nn.init.normal_(t, mean=mean, std=std, generator=g)


def uniform(low: float, high: float) -> InitFn:
    """U(low, high)."""
    return lambda t, g: nn.init.uniform_(t, low, high, generator=g)


def constant(value: float) -> InitFn:
    """Every element ``value`` (zeros, ones, BatchNorm's counters)."""
    return lambda t, g: t.fill_(value)


zeros, ones = constant(0.0), constant(1.0)


def kaiming_uniform(a: float = 0.0) -> InitFn:
    """``nn.init.kaiming_uniform_`` with fan_in from the full tensor's shape."""
    return lambda t, g: nn.init.kaiming_uniform_(t, a=a, generator=g)


def kaiming_normal(mode: str = "fan_in", nonlinearity: str = "leaky_relu") -> InitFn:
    """``nn.init.kaiming_normal_`` with fans from the full tensor's shape."""
    return lambda t, g: nn.init.kaiming_normal_(t, mode=mode, nonlinearity=nonlinearity, generator=g)  # fmt: skip


def linear_default(in_features: int) -> tuple[InitFn, InitFn]:
    """(weight, bias) rules of ``nn.Linear.reset_parameters`` for this fan-in."""
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
    return kaiming_uniform(math.sqrt(5)), uniform(-bound, bound)


def computed(make: Callable[[torch.device], torch.Tensor]) -> InitFn:
    """A deterministic tensor (a RoPE table): ``make(device)`` gives the full value."""
    return lambda t, g: t.copy_(make(t.device))


# --- the generic materialiser ----------------------------------------------------------


def param_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: a stable 63-bit hash of ``(seed, name)``."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(param_seed(seed, name))


def init_rules(model: nn.Module) -> list[tuple[str, InitFn]]:
    """(full-name pattern, rule) of every module's ``init_rules()``, deepest modules first."""
    found = []
    for prefix, module in model.named_modules():
        rules = getattr(module, "init_rules", None)
        if callable(rules):
            depth = prefix.count(".") + 1 if prefix else 0
            scope = f"{prefix}." if prefix else ""
            found.append((depth, [(scope + pat, fn) for pat, fn in rules().items()]))
    found.sort(key=lambda item: -item[0])  # stable: same depth keeps module order
    return [rule for _, rules in found for rule in rules]


def rule_for(rules: list[tuple[str, InitFn]], name: str, model: nn.Module) -> InitFn:
    """The first rule whose pattern matches ``name``; a tensor without one is an error."""
    for pattern, fn in rules:
        if fnmatch.fnmatchcase(name, pattern):
            return fn
    raise ValueError(
        f"{type(model).__name__} has no init rule for {name!r}; add a pattern matching it to "
        "the init_rules() of its model (or of the module that owns it)."
    )


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (e.g. embedding and output head)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Point every name of each group at its first name's Parameter again.

    ``to_empty`` and ``load_state_dict(assign=True)`` make one new Parameter per module,
    which silently unties shared weights.
    """
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)


def _plain_copy(target: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(target, "placements"):
        raise ValueError(
            "the model holds sharded (DTensor) parameters; materialise it with "
            "baobab.parallel.materialize_parallel, which keeps each rank's shard."
        )
    target.copy_(full)


def _local_device(t: torch.Tensor) -> torch.device:
    local = getattr(t, "_local_tensor", None)  # a DTensor's own shard lives here
    return (local if local is not None else t).device


@torch.no_grad()
def fill(
    model: nn.Module,
    seed: int,
    copy: CopyFn = _plain_copy,
    weights: Mapping[str, torch.Tensor] | None = None,
    only: Callable[[str], bool] | None = None,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Write every parameter and buffer of an allocated model, one full tensor at a time.

    A name found in ``weights`` takes that full tensor (cast to the target's dtype); any
    other is made by its rule from a generator seeded by ``(seed, name)``. ``only`` limits
    the names written; ``observe(name, full)`` sees each full tensor before it is freed.
    Tied parameters are written once, under their first name.
    """
    rules = init_rules(model)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, target in tensors:
        if only is not None and not only(name):
            continue
        device = _local_device(target)
        if weights is not None and name in weights:
            full = weights[name].to(device=device, dtype=target.dtype)
        else:
            full = torch.empty(target.shape, dtype=target.dtype, device=device)
            rule_for(rules, name, model)(full, _generator(seed, name, device))
        if observe is not None:
            observe(name, full)
        copy(target, full)
        del full  # one full tensor at a time


def materialize(
    model: nn.Module,
    seed: int,
    device: torch.device | str | None = None,
    copy: CopyFn = _plain_copy,
    weights: Mapping[str, torch.Tensor] | None = None,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> nn.Module:
    """Allocate a meta-built model on ``device`` (default: the default device) and fill it.

    See :func:`fill`; ties survive ``to_empty``. Returns ``model``.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    groups = tied_groups(model)
    model.to_empty(device=device)
    retie(model, groups)
    fill(model, seed, copy=copy, weights=weights, observe=observe)
    return model


def allocate(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Allocate a meta-built model for a loader that fills it in place (DCP).

    Parameters and persistent buffers are left uninitialised (the loader writes them all);
    non-persistent buffers (RoPE tables), which no checkpoint holds, are computed by their
    rules. Ties survive. Returns ``model``.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    groups = tied_groups(model)
    model.to_empty(device=device)
    retie(model, groups)
    stored = set(model.state_dict(keep_vars=True))
    computed_here = {name for name, _ in model.named_buffers() if name not in stored}
    fill(model, 0, only=computed_here.__contains__)
    return model


def _persistent_groups(model: nn.Module) -> list[list[str]]:
    """Every persistent tensor's names (tied ones together), in state-dict order."""
    keys = set(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if name in keys:
            groups.setdefault(id(t), []).append(name)
    return list(groups.values())


@torch.no_grad()
def load_weights(
    model: nn.Module,
    stored: Mapping[str, torch.Tensor],
    where: str,
    against: str = "the model",
    missing_seed: int | None = None,
) -> list[str]:
    """Assign ``stored`` (full name -> tensor, on the device wanted) to a meta-built model.

    Tensors are assigned, not copied (``load_state_dict(assign=True)``): their device and
    dtype become the model's. A tied group needs its tensor under any one of its names.
    Non-persistent buffers (RoPE tables) are computed by their rules. Names the model has
    but ``stored`` lacks are an error ("'where' does not match against: ..."), unless ``missing_seed`` is given:
    then they are initialised by their rules under that seed (an HF BertModel without its
    MLM head) and returned. Keys the model does not have are always an error.
    """
    groups = _persistent_groups(model)
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for names in groups:
        present = [n for n in names if n in stored]
        if present:
            state.update(dict.fromkeys(names, stored[present[0]]))
        else:
            missing.extend(names)
    unexpected = sorted(set(stored) - set(state))
    if unexpected or (missing and missing_seed is None):
        raise ValueError(
            f"'{where}' does not match {against}: missing {sorted(missing) or 'nothing'}, "
            f"unexpected {unexpected or 'nothing'}"
        )
    device = next(iter(state.values())).device if state else torch.get_default_device()
    for name in missing:  # allocated here, initialised by their rules below
        state[name] = torch.empty_like(_meta_tensor(model, name), device=device)
    tied = tied_groups(model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # a shape mismatch
        detail = " ".join(str(err).split())
        raise ValueError(f"'{where}' does not match {against}: {detail}") from None
    retie(model, tied)
    left = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta}
    for name in left:  # non-persistent buffers: allocate, then fill by rule below
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[attr] = torch.empty_like(module._buffers[attr], device=device)
    todo = left | set(missing)
    fill(model, missing_seed or 0, only=todo.__contains__)
    return sorted(missing)


def _meta_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


__all__ = [
    "allocate",
    "CopyFn",
    "InitFn",
    "computed",
    "constant",
    "fill",
    "init_rules",
    "kaiming_normal",
    "kaiming_uniform",
    "linear_default",
    "load_weights",
    "materialize",
    "normal",
    "ones",
    "param_seed",
    "retie",
    "rule_for",
    "tied_groups",
    "uniform",
    "zeros",
]
