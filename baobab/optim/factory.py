"""Build a torch optimizer for any ``nn.Module`` from an ``OptimConfig``.

Parameter classes (each trainable tensor appears once, tied weights included):
- matrix: ndim >= 2 and not an embedding weight -> weight decay
- other: norm weights, biases, scalars, embedding weights -> no weight decay (by default)
For muon, 2-D non-embedding tensors outside the output layer go to Muon; everything else
(embeddings, the output layer, 1-D tensors, conv kernels) goes to AdamW with the groups above.
"""

from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

from baobab.optim.config import OptimConfig
from baobab.optim.muon import MuonWithAdamW

try:  # private torch helper; the fallback lists the devices torch 2.6+ ships fused kernels for
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover

    def _get_fused_kernels_supported_devices() -> list[str]:
        return ["cuda", "cpu", "mps", "xpu", "hpu"]


_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)

# Optimizer classes by name; muon is built separately. gd and sgd are the same update;
# gd differs in that the trainer accumulates gradients over the whole epoch.
_TORCH_CLASSES: dict[str, type[Optimizer]] = {
    "gd": SGD,
    "sgd": SGD,
    "momentum": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
}
# RMSprop has no fused kernel (Muon neither: for muon, fused applies to the AdamW half).
_NO_FUSED = {"rmsprop"}


def is_full_batch(cfg: OptimConfig) -> bool:
    """Whether the trainer must accumulate gradients over the whole epoch per step (gd)."""
    return cfg.name == "gd"


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() yields a tied tensor once, under its first name.
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(module.weight) for module in model.modules() if isinstance(module, _EMBEDDING_TYPES)}


def _decay_groups(
    params: list[nn.Parameter], embedding_ids: set[int], weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    if decay_all:
        groups = [{"params": params, "weight_decay": weight_decay}]
    else:
        decay = [p for p in params if p.ndim >= 2 and id(p) not in embedding_ids]
        decay_ids = {id(p) for p in decay}
        rest = [p for p in params if id(p) not in decay_ids]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def param_groups(
    model: nn.Module, weight_decay: float, decay_norms_biases_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Decayed: tensors with ndim >= 2 that are not ``nn.Embedding``/``nn.EmbeddingBag``
    weights. Not decayed: everything else (norm weights, biases, embeddings), unless
    ``decay_norms_biases_embeddings`` puts every parameter in one decayed group.
    Empty groups are dropped; each group is ``{"params": [...], "weight_decay": float}``.
    """
    params = [p for _, p in _trainable(model)]
    return _decay_groups(params, _embedding_ids(model), weight_decay, decay_norms_biases_embeddings)


def _output_layer(model: nn.Module, output_layer: str | None) -> nn.Module | None:
    """The module whose parameters muon keeps on AdamW: named, or the last ``nn.Linear``."""
    modules = dict(model.named_modules())
    if output_layer == "":  # a model part (e.g. a pipeline stage) without the output layer
        return None
    if output_layer is None:
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None
    if output_layer not in modules or output_layer == "":
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"output_layer {output_layer!r} is not a module of the model; "
            f"choose one of its Linear modules: {', '.join(names) or '(none)'}."
        )
    return modules[output_layer]


def _implementation_kwargs(cfg: OptimConfig, name: str, params: list[nn.Parameter]) -> dict:
    """Map ``cfg.implementation`` to torch's foreach/fused flags for optimizer ``name``."""
    impl = cfg.implementation
    if impl == "auto":
        return {}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "for-loop":
        return {"foreach": False}
    # fused
    if name in _NO_FUSED:
        raise ValueError(
            f"implementation 'fused' is not available for optimizer {cfg.name!r}; "
            "choose one of: auto, foreach, for-loop."
        )
    # The same device check torch runs at the first step, done here to fail at build time.
    devices = set(_get_fused_kernels_supported_devices())
    for p in params:
        if p.device.type not in devices or not torch.is_floating_point(p):
            raise ValueError(
                f"implementation 'fused' for optimizer {cfg.name!r} needs floating-point "
                f"parameters on {', '.join(sorted(devices))}, got {p.dtype} on {p.device.type}; "
                "choose one of: auto, foreach, for-loop."
            )
    return {"fused": True}


def _hyperparameters(cfg: OptimConfig) -> dict[str, Any]:
    name = cfg.name
    if name in ("gd", "sgd"):
        return {"lr": cfg.lr, "momentum": 0.0}
    if name == "momentum":
        return {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    if name == "adagrad":
        return {"lr": cfg.lr, "lr_decay": cfg.lr_decay, "eps": cfg.eps}
    if name == "rmsprop":
        return {"lr": cfg.lr, "alpha": cfg.alpha, "eps": cfg.eps, "momentum": cfg.rmsprop_momentum}
    return {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}  # adam, adamw


def _build_muon(model: nn.Module, cfg: OptimConfig, output_layer: str | None) -> MuonWithAdamW:
    embedding_ids = _embedding_ids(model)
    head = _output_layer(model, output_layer)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    params = [p for _, p in _trainable(model)]
    # Hidden matrices only: embeddings and the output layer need AdamW's per-element scaling.
    hidden = [p for p in params if p.ndim == 2 and id(p) not in embedding_ids | head_ids]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    muon_groups = [{"params": hidden, "weight_decay": cfg.weight_decay}] if hidden else []
    adamw_groups = _decay_groups(
        rest, embedding_ids, cfg.weight_decay, cfg.decay_norms_biases_embeddings
    )
    muon_kwargs = {
        "lr": cfg.muon_lr if cfg.muon_lr is not None else cfg.lr,
        "weight_decay": cfg.weight_decay,
        "momentum": cfg.muon_momentum,
        "nesterov": True,
        "ns_steps": cfg.muon_ns_steps,
        "adjust_lr_fn": cfg.muon_adjust_lr,
    }
    adamw_kwargs = {
        "lr": cfg.lr,
        "betas": cfg.betas,
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        **_implementation_kwargs(cfg, "adamw", rest),
    }
    return MuonWithAdamW(
        muon_groups, adamw_groups, muon_kwargs=muon_kwargs, adamw_kwargs=adamw_kwargs
    )


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, output_layer: str | None = None
) -> Optimizer:
    """Build the optimizer ``cfg.name`` over ``model``'s trainable parameters.

    Weight decay follows ``param_groups``. For muon, ``output_layer`` names the module
    (as in ``model.named_modules()``) kept on AdamW; None picks the last ``nn.Linear``
    in ``model.modules()`` order and "" says the model (part) has none. Other optimizers
    ignore ``output_layer``.
    """
    if not _trainable(model):
        raise ValueError("model has no parameters with requires_grad=True to optimize.")
    if cfg.name == "muon":
        return _build_muon(model, cfg, output_layer)
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norms_biases_embeddings)
    params = [p for g in groups for p in g["params"]]
    cls = _TORCH_CLASSES[cfg.name]
    return cls(
        groups,
        weight_decay=cfg.weight_decay,
        **_hyperparameters(cfg),
        **_implementation_kwargs(cfg, cfg.name, params),
    )
