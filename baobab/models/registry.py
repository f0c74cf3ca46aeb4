"""Explicit, flat registry: family name -> (config class, model class, task), and named
sizes -> (family, config values). Duplicates are refused; an unknown name is answered with
the list of known ones. A family's own name is also a model name: its config defaults.

Nothing here is inferred from file or directory names; ``baobab.models.sizes`` registers
the built-in families and sizes explicitly.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from baobab.models.common.init import materialize

TASKS = ("causal_lm", "masked_lm", "classification", "regression")
SEQUENCE_TASKS = ("causal_lm", "masked_lm")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family as the rest of baobab sees it."""

    name: str
    """Registry name of the family, also a model name giving the config defaults."""
    config_cls: type
    """Frozen config dataclass; every field has a default."""
    model_cls: type[nn.Module]
    """nn.Module built as ``model_cls(cfg)`` on the meta device, with ``.cfg`` and
    ``init_rules()`` (name pattern -> init function, see ``baobab.models.common.init``)."""
    task: str
    """Objective the trainer uses: causal_lm, masked_lm, classification or regression."""
    example_input: Callable[[Any, int, int], torch.Tensor]
    """``(cfg, batch, seq_len) -> input`` on the default device; seq_len is ignored by
    non-sequence families. Used for FLOP counting under ``torch.device("meta")``."""
    flops_linear_in_seq: bool = False
    """Forward FLOPs are exactly seq_len x those of one token (recurrent models): FLOPs are
    then counted on one token and multiplied, since a meta-device LSTM steps slowly."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(
                f"ModelFamily.task must be one of {', '.join(TASKS)}; got {self.task!r}."
            )
        if not dataclasses.is_dataclass(self.config_cls):
            raise ValueError(
                f"ModelFamily.config_cls must be a dataclass; got {self.config_cls!r}."
            )


_FAMILIES: dict[str, ModelFamily] = {}
_SIZES: dict[str, tuple[str, dict[str, Any]]] = {}


def register_family(family: ModelFamily) -> None:
    """Add a family; its name becomes a model name. A taken name or config class is refused."""
    if family.name in _FAMILIES or family.name in _SIZES:
        raise ValueError(f"model name {family.name!r} is already registered; choose another name.")
    for other in _FAMILIES.values():
        if other.config_cls is family.config_cls:
            raise ValueError(
                f"config class {family.config_cls.__name__} already belongs to family "
                f"{other.name!r}; give each family its own config class."
            )
    _FAMILIES[family.name] = family


def register_size(name: str, family: str, **config_kwargs: Any) -> None:
    """Add a named size of ``family``; the config is built now, so bad values fail here."""
    if name in _FAMILIES or name in _SIZES:
        raise ValueError(f"model name {name!r} is already registered; choose another name.")
    if family not in _FAMILIES:
        raise ValueError(
            f"unknown model family {family!r}; known families: {', '.join(family_names())}."
        )
    _make_config(_FAMILIES[family], name, config_kwargs)
    _SIZES[name] = (family, dict(config_kwargs))


def model_names() -> list[str]:
    """Every name ``get_config``/``build_model`` accept: named sizes and family names, sorted."""
    return sorted({*_FAMILIES, *_SIZES})


def family_names() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_FAMILIES)


def _make_config(family: ModelFamily, name: str, values: dict[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(family.config_cls)]
    for key in values:
        if key not in fields:
            raise ValueError(
                f"unknown option {key!r} for model {name!r}; "
                f"{family.config_cls.__name__} fields: {', '.join(fields)}."
            )
    return family.config_cls(**values)


def get_config(name: str, **overrides: Any) -> Any:
    """The config of a named size or family (its defaults), with ``overrides`` applied."""
    if name in _SIZES:
        family_name, values = _SIZES[name]
        return _make_config(_FAMILIES[family_name], name, {**values, **overrides})
    if name in _FAMILIES:
        return _make_config(_FAMILIES[name], name, overrides)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}.")


def family_of(cfg_or_name: Any) -> ModelFamily:
    """The family of a model name or of a config instance."""
    if isinstance(cfg_or_name, str):
        if cfg_or_name in _SIZES:
            return _FAMILIES[_SIZES[cfg_or_name][0]]
        if cfg_or_name in _FAMILIES:
            return _FAMILIES[cfg_or_name]
        raise ValueError(
            f"unknown model {cfg_or_name!r}; known models: {', '.join(model_names())}."
        )
    for family in _FAMILIES.values():
        if type(cfg_or_name) is family.config_cls:
            return family
    raise ValueError(
        f"config type {type(cfg_or_name).__name__} belongs to no registered family; "
        f"known families: {', '.join(family_names())}."
    )


def _as_config(name_or_cfg: Any, overrides: dict[str, Any]) -> Any:
    if isinstance(name_or_cfg, str):
        return get_config(name_or_cfg, **overrides)
    family = family_of(name_or_cfg)
    if not overrides:
        return name_or_cfg
    values = {f.name: getattr(name_or_cfg, f.name) for f in dataclasses.fields(name_or_cfg)}
    return _make_config(family, family.name, {**values, **overrides})


def task_of(cfg_or_name: Any) -> str:
    """The training objective: the config's own ``task`` field if it has one, else the family's."""
    cfg = _as_config(cfg_or_name, {})
    return getattr(cfg, "task", family_of(cfg).task)


def build_model(
    name_or_cfg: Any,
    device: torch.device | str | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a model from a name or config; ``device="meta"`` allocates nothing and
    initialises nothing (the start of every sharded or loaded model).

    Otherwise the model is allocated on ``device`` (default: the default device, which
    honours ``with torch.device(...)``) and every tensor is filled by its family's init
    rule from a generator seeded by ``(seed, its name)``: the weights depend on ``seed``
    alone, and equal those of any parallel layout materialised with the same seed. With
    ``seed=None`` the seed is drawn from the global RNG (``torch.manual_seed`` first to
    reproduce).
    """
    cfg = _as_config(name_or_cfg, overrides)
    model = family_of(cfg).model_cls(cfg)  # on meta
    if device is not None and torch.device(device).type == "meta":
        return model
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    return materialize(model, seed, device)


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters, tied weights counted once.

    ``exclude_embeddings`` leaves out ``nn.Embedding`` tables (token, position, token-type);
    a head tied to an embedding is left out with it, an untied head is kept.
    """
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _seq_len(cfg: Any, seq_len: int | None) -> int:
    return seq_len if seq_len is not None else getattr(cfg, "max_seq_len", 1)


def forward_flops(cfg: Any, batch: int = 1, seq_len: int | None = None) -> int:
    """FLOPs of one forward pass over ``batch`` example inputs (default seq_len: max_seq_len).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device model, so
    nothing is allocated: matmuls, convolutions and attention (2 FLOPs per multiply-add,
    causal attention counted as full), not elementwise ops or embedding lookups.
    ``cfg`` may also be a model name.
    """
    cfg = _as_config(cfg, {})
    family = family_of(cfg)
    n = _seq_len(cfg, seq_len)
    steps, n = (n, 1) if family.flops_linear_in_seq else (1, n)
    with torch.device("meta"), torch.no_grad():
        model = family.model_cls(cfg).eval()  # eval: BatchNorm refuses 1x1 maps at batch 1
        x = family.example_input(cfg, batch, n)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return int(counter.get_total_flops()) * steps


def training_flops_per_token(cfg: Any, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 3 x forward FLOPs of one sample / tokens per sample.

    Forward + backward is taken as 3 forwards. For sequence models a sample has ``seq_len``
    tokens (default max_seq_len); for the others (MLP, ResNet) a "token" is one sample.
    """
    cfg = _as_config(cfg, {})
    n = _seq_len(cfg, seq_len)
    tokens = n if family_of(cfg).task in SEQUENCE_TASKS else 1
    return 3.0 * forward_flops(cfg, batch=1, seq_len=n) / tokens
