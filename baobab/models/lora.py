"""LoRA adapters as a module swap: ``nn.Linear`` -> ``LoRALinear`` and back (``merge_lora``).

``LoRALinear`` keeps the frozen base ``weight`` (and ``bias``) as its own parameters, under
the same names ``nn.Linear`` uses, so an adapted model's ``state_dict()`` is the plain
model's keys plus ``<path>.lora_A`` / ``<path>.lora_B``: a base checkpoint loads into it
with ``strict=False`` (only adapter keys missing), plans that address ``<path>.weight``
still find it, and ``merge_lora`` hands back the plain model's exact keys.

Shape legend: N any leading dims, I in_features, O out_features, R rank.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baobab.models.common import check_fraction, check_positive
from baobab.models.common.init import InitFn, fill, kaiming_uniform, zeros

_ADAPTER_NAMES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    """Which ``nn.Linear`` modules get low-rank adapters, and their shape."""

    rank: int = 8
    """Rank R of the update B @ A; at least 1."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path sees x unchanged); in [0, 1)."""
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    """Module-name suffixes matched against ``model.named_modules()`` (add "w1", "w2",
    "w3" for the GPT feed-forward); each must match at least one ``nn.Linear``."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an integer >= 1; got {self.rank!r}.")
        check_positive("LoRAConfig", alpha=self.alpha)
        check_fraction("LoRAConfig", dropout=self.dropout)
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)  # a CLI or YAML list becomes a tuple
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"LoRAConfig.targets must be a non-empty list of module names; got {self.targets!r}."
            )
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        """Factor alpha / rank applied to the adapter's output."""
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """y = x W^T + b + dropout(x) A^T B^T * alpha/rank, with W and b frozen.

    Built from an ``nn.Linear`` whose ``weight``/``bias`` Parameters it takes over (same
    objects, same names); by ``init_rules`` ``lora_A`` (R, I) starts kaiming-uniform and
    ``lora_B`` (O, R) at zero, so a fresh adapter leaves the output bit-identical to the
    base layer. The adapters are created empty, on the base weight's device (meta too):
    ``apply_lora`` or the model's materialiser fills them, seeded by their names.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.weight = base.weight  # (O, I)
        self.bias = base.bias  # (O,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (R, I)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))  # (O, R)
        self.dropout = nn.Dropout(dropout)

    def init_rules(self) -> dict[str, InitFn]:
        """The adapters' starts (nn.Linear's weight init for A, zero for B); the frozen
        base ``weight``/``bias`` keep the rules of the model they came from."""
        return {"lora_A": kaiming_uniform(5**0.5), "lora_B": zeros}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)  # (N, O), exactly nn.Linear's forward
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (N, O)
        return base + update * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + B @ A * scaling (W is updated in place)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (O, I)
        self.weight.add_(delta.to(self.weight.dtype))
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}"
        )


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> nn.Module:
    """Swap every ``nn.Linear`` whose name ends with a target for a ``LoRALinear``, in place.

    Every other parameter is frozen (requires_grad False), so only adapters train. On an
    allocated model the adapters are initialised now, each from a generator seeded by
    ``(seed, its name)``; on a meta model they are left to the model's materialiser (which
    uses the same rules and seeding). Returns ``model``.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for target in cfg.targets:
        found = {n: m for n, m in linears.items() if _matches(n, target)}
        if not found:
            raise ValueError(
                f"LoRAConfig.targets entry {target!r} matches no nn.Linear module; "
                f"the model's Linear modules are: {', '.join(linears) or '(none)'}."
            )
        chosen.update(found)
    # A tied weight (e.g. GPT's output head shares tok_embeddings) would be changed for both
    # modules by merge_lora, so adapting one is refused.
    counts: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    for name, linear in chosen.items():
        if counts[id(linear.weight)] > 1:
            raise ValueError(
                f"LoRA target {name!r} shares its weight with another module (tied "
                "embeddings); remove it from LoRAConfig.targets or untie the weights."
            )
    model.requires_grad_(False)
    for name, linear in chosen.items():
        _swap(model, name, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    adapters = {f"{n}.{attr}" for n in chosen for attr in _ADAPTER_NAMES}
    if not any(p.is_meta for p in lora_parameters(model)):
        fill(model, seed, only=adapters.__contains__)
    return model


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (every ``lora_A`` and ``lora_B``), in module order."""
    return [p for m in _lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed as in ``model.state_dict()`` (detached, not copied)."""
    return {
        f"{prefix}.{attr}" if prefix else attr: getattr(m, attr).detach()
        for prefix, m in _lora_modules(model).items()
        for attr in _ADAPTER_NAMES
    }


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by ``lora_state_dict`` into an adapted model (keys must match)."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own)
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not match the model's adapters; "
            f"missing keys: {missing or 'none'}, unexpected keys: {unexpected or 'none'}."
        )
    for key, tensor in own.items():
        if state_dict[key].shape != tensor.shape:
            raise ValueError(
                f"LoRA tensor {key!r} has shape {tuple(state_dict[key].shape)} but the model "
                f"expects {tuple(tensor.shape)}; use the LoRAConfig.rank it was trained with."
            )
        tensor.copy_(state_dict[key])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and swap back to ``nn.Linear``, in place.

    The result's ``state_dict()`` keys equal the un-adapted model's, so it loads strictly
    into a fresh ``build_model(cfg)`` and exports like any model. Parameters stay frozen as
    ``apply_lora`` left them; call ``model.requires_grad_(True)`` to train it fully.
    Returns ``model``.
    """
    for name, module in _lora_modules(model).items():
        _swap(model, name, module.merged())
    return model
