"""From a ``RunConfig`` (a recipe plus command-line overrides) to a finished run.

This is what ``baobab train`` calls; it is also the shortest way to train from Python::

    from baobab.train import RunConfig, run
    result = run(RunConfig(...))
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from baobab import data as bdata
from baobab import models
from baobab.export.open import OpenedModel, open_model
from baobab.models.lora import apply_lora
from baobab.optim import build_optimizer, build_scheduler, is_full_batch
from baobab.parallel import (
    apply_block_options,
    build_mesh,
    dp_rank_and_size,
    materialize_parallel,
    parallelize,
)
from baobab.train import distributed as bdist
from baobab.train.config import RunConfig
from baobab.train.device import pick_device, set_deterministic
from baobab.train.objectives import Distillation, build_objective
from baobab.train.trainer import Trainer, TrainResult
from baobab.train.watchdog import process_group_timeout

# Model config fields that the data decides, unless the user overrode them.
DATA_DECIDED = (
    "vocab_size",
    "num_classes",
    "in_channels",
    "in_features",
    "out_features",
    "image_size",
)


@dataclasses.dataclass
class DataBundle:
    train: Any
    val: Any
    facts: dict[str, Any]  # model config fields the data decides (see DATA_DECIDED)
    tokenizer_file: Path | None = None
    mask_id: int | None = None


def build_data(
    cfg: RunConfig, full_batch: bool = False, rank: int = 0, world_size: int = 1
) -> DataBundle:
    """Loaders for ``cfg.data`` for data-parallel ``rank`` of ``world_size``; a prepared
    corpus is made first (by rank 0, the others wait) when ``data.source`` says so."""
    d, seed = cfg.data, cfg.train.seed
    if d.kind == "tokens":
        path = Path(d.path)
        if d.source == "stdlib" and not (path / "manifest.json").is_file():
            bdata.prepare_stdlib(
                path, vocab_size=d.vocab_size, seed=seed, progress=cfg.train.progress
            )
        manifest = bdata.Manifest.load(path)
        train_ds = bdata.TokenWindows(path, "train", d.seq_len)
        val_ds = (
            bdata.TokenWindows(path, "val", d.seq_len)
            if manifest.split_tokens("val") > d.seq_len
            else None
        )
        tok = manifest.tokenizer()
        # Round the embedding table up to a multiple of 64: faster matmuls and divisible by
        # any tensor-parallel degree up to 64; the extra ids are never produced by the data.
        facts = {
            "vocab_size": -(-manifest.vocab_size // 64) * 64,
            "tokenizer_vocab_size": manifest.vocab_size,
        }
        loaders = _loaders(train_ds, val_ds, d.batch_size, seed, not full_batch, rank, world_size)
        return DataBundle(*loaders, facts, path / "tokenizer.json", tok.mask_id)
    if d.kind == "digits":
        dataset, _ = bdata.load_digits()
    elif d.kind == "regression":
        dataset = bdata.make_regression(n=d.num_samples, seed=seed)
    elif d.kind == "arrays":
        dataset = bdata.load_arrays(d.path, d.targets_path)
    else:  # images
        dataset, _ = bdata.load_image_folder(d.path, d.image_size)
    train_ds, val_ds = (
        bdata.train_val_split(dataset, d.val_fraction, seed) if d.val_fraction else (dataset, None)
    )
    facts = _array_facts(dataset)
    return DataBundle(
        *_loaders(train_ds, val_ds, d.batch_size, seed, False, rank, world_size), facts
    )


def _loaders(
    train_ds, val_ds, batch_size: int, seed: int, drop_last: bool, rank: int, world_size: int
):
    ranks = {"rank": rank, "world_size": world_size}
    train = bdata.DataLoader(
        train_ds, batch_size, seed=seed, shuffle=True, drop_last=drop_last, **ranks
    )
    val = (
        bdata.DataLoader(val_ds, batch_size, seed=seed, shuffle=False, drop_last=False, **ranks)
        if val_ds
        else None
    )
    return train, val


def _array_facts(dataset) -> dict[str, Any]:
    x, y = dataset.x, dataset.y
    facts: dict[str, Any] = {"in_features": int(x.shape[1]) if x.ndim == 2 else None}
    if x.ndim == 4:  # (N, C, H, W) images
        facts.update(in_channels=int(x.shape[1]), image_size=int(x.shape[2]))
    if y.dtype.kind in "iu":
        facts["num_classes"] = int(y.max()) + 1
    else:
        facts["out_features"] = 1 if y.ndim == 1 else int(y.shape[1])
    return {k: v for k, v in facts.items() if v is not None}


def model_config_for(cfg: RunConfig, facts: dict[str, Any], base: OpenedModel | None = None):
    """The named model config with data-decided fields filled in, then user overrides.

    Starting from ``base`` (``model.init``), its config is kept and the data must fit it.
    """
    if base is not None:
        model_cfg = _base_config(cfg, base)
        if facts.get("tokenizer_vocab_size", 0) > getattr(model_cfg, "vocab_size", 1 << 62):
            raise ValueError(
                f"the data's tokenizer has {facts['tokenizer_vocab_size']} tokens but the model in "
                f"'{cfg.model.init}' has only {model_cfg.vocab_size}"
            )
    else:
        base_cfg = models.get_config(cfg.model.name)
        fields = {f.name for f in dataclasses.fields(base_cfg)}
        decided = {k: v for k, v in facts.items() if k in fields and k in DATA_DECIDED}
        overrides = {**decided, **cfg.model.overrides}
        if "vocab_size" in cfg.model.overrides and cfg.model.overrides["vocab_size"] < facts.get(
            "tokenizer_vocab_size", 0
        ):
            raise ValueError(
                f"model.overrides.vocab_size {cfg.model.overrides['vocab_size']} is smaller than the tokenizer's "
                f"{facts['tokenizer_vocab_size']} tokens"
            )
        model_cfg = models.get_config(cfg.model.name, **overrides)
    max_len = getattr(model_cfg, "max_seq_len", None)
    if cfg.data.kind == "tokens" and max_len is not None and cfg.data.seq_len > max_len:
        raise ValueError(
            f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len {max_len}; lower data.seq_len "
            "or set model.overrides.max_seq_len"
        )
    return model_cfg


def _base_config(cfg: RunConfig, base: OpenedModel):
    described = base.described
    return models.get_config(described["name"], **{**described["config"], **cfg.model.overrides})


def _check_tokenizer(data_tokenizer: Path | None, model: OpenedModel, role: str) -> None:
    """Refuse data encoded with another tokenizer than the one ``model`` was trained with."""
    if data_tokenizer is None or model.tokenizer_file is None:
        return
    ours = bdata.Tokenizer.load(data_tokenizer).backend.get_vocab()
    theirs = bdata.Tokenizer.load(model.tokenizer_file).backend.get_vocab()
    if ours != theirs:
        raise ValueError(
            f"the data was tokenized with another tokenizer than the {role}'s; prepare it with "
            f"--tokenizer {model.tokenizer_file}"
        )


def _check_features(cfg: RunConfig, layout) -> None:
    """Refuse combinations of fine-tuning features and layouts that cannot work."""
    if cfg.lora is not None and layout.tp > 1:
        raise ValueError("LoRA adapters do not support tensor parallelism; set parallel.tp 1")
    if cfg.distill.teacher and layout.pp > 1:
        raise ValueError("distillation does not support pipeline parallelism; set parallel.pp 1")
    if cfg.blocks.compile_model and layout.is_distributed:
        raise ValueError(
            "blocks.compile_model works on one device; under a parallel layout use "
            "blocks.compile (per block)"
        )
    if cfg.train.precision == "bf16-params" and layout.dp_shard == 1:
        raise ValueError(
            "train.precision bf16-params needs FSDP (parallel.dp_shard > 1); use bf16 "
            "(autocast) otherwise"
        )


def build_trainer(cfg: RunConfig) -> Trainer:
    """Everything a run needs, built and validated before the first step.

    Under torchrun the process group is joined first; the layout (``cfg.parallel``) is
    checked against the world size and the model before any data is touched.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        set_deterministic()
    full_batch = is_full_batch(cfg.optim)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Refuse a bad model or layout before any data work or process-group start-up.
    checks = {
        "seq_len": cfg.data.seq_len if cfg.data.kind == "tokens" else None,
        "local_batch_size": cfg.data.batch_size,
    }
    base = open_model(cfg.model.init, lazy=True) if cfg.model.init else None
    named = (
        _base_config(cfg, base)
        if base
        else models.get_config(cfg.model.name, **cfg.model.overrides)
    )
    layout = cfg.parallel.validate(world, named, **checks)
    _check_features(cfg, layout)
    timeout = process_group_timeout(cfg.fault.hang_timeout)
    device = (
        bdist.init_distributed(cfg.train.device, timeout)
        if world > 1
        else pick_device(cfg.train.device)
    )
    mesh = build_mesh(layout, device.type) if world > 1 else None
    dp_rank, dp_size = dp_rank_and_size(mesh) if mesh is not None else (0, 1)
    bundle = build_data(cfg, full_batch, dp_rank, dp_size)
    model_cfg = model_config_for(cfg, bundle.facts, base)
    layout = cfg.parallel.validate(world, model_cfg, **checks)
    teacher = open_model(cfg.distill.teacher) if cfg.distill.teacher else None
    for opened, role in ((base, "base model"), (teacher, "teacher")):
        if opened is not None:
            _check_tokenizer(bundle.tokenizer_file, opened, role)
    family = models.family_of(model_cfg)
    objective_name = (
        models.task_of(model_cfg) if cfg.train.objective == "auto" else cfg.train.objective
    )
    objective = build_objective(
        objective_name,
        mask_id=bundle.mask_id,
        vocab_size=bundle.facts.get("tokenizer_vocab_size"),
        mask_prob=cfg.train.mask_prob,
    )
    if teacher is not None:
        objective = Distillation(
            objective, teacher.model.to(device), cfg.distill.temperature, cfg.distill.alpha
        )
    # torchtitan's order: build on meta (nothing allocated), parallelize() the meta model,
    # then allocate this rank's shards and fill them one full tensor at a time, each drawn
    # from a generator seeded by (train.seed, its name) or copied from the --model.init
    # base: every layout starts from the one-process weights, and no rank ever holds the
    # whole model (baobab.parallel.materialize).
    torch.manual_seed(cfg.train.seed)  # the run's RNG (dropout, masking); init is by name
    model = models.build_model(model_cfg, device="meta")
    weights = _base_weights(model, base, cfg.model.init) if base is not None else None
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)  # on meta: adapters are filled by name with the rest
    if mesh is not None:
        head = _output_layer_name(model)
        model = parallelize(
            model,
            mesh,
            layout,
            loss_fn=lambda output, target: objective.criterion(output, target)[0],
            blocks=cfg.blocks,
            param_dtype=torch.bfloat16 if cfg.train.precision == "bf16-params" else None,
        )
        materialize_parallel(model.parts, cfg.train.seed, device, weights=weights)
        optimizers = [
            build_optimizer(
                part, cfg.optim, output_layer=head if head in dict(part.named_modules()) else ""
            )
            for part in model.parts
        ]
    else:
        apply_block_options(model, cfg.blocks)
        materialize_parallel([model], cfg.train.seed, device, weights=weights)
        optimizers = [build_optimizer(model, cfg.optim)]
    seq_len = cfg.data.seq_len if cfg.data.kind == "tokens" else None
    trainer = Trainer(
        model,
        optimizers,
        bundle.train,
        cfg=cfg.train,
        objective=objective,
        val_loader=bundle.val,
        grad_clip_norm=cfg.optim.grad_clip_norm,
        grad_clip_value=cfg.optim.grad_clip_value,
        full_batch=full_batch,
        flops_per_item=models.training_flops_per_token(model_cfg, seq_len),
        meta={
            "model": {
                "name": base.described["name"] if base else cfg.model.name,
                "family": family.name,
                "config": _plain(dataclasses.asdict(model_cfg)),
            },
            "objective": objective_name,
            "data": {"kind": cfg.data.kind, "seq_len": seq_len},
            "run": _plain(dataclasses.asdict(cfg)),
            "lora": _plain(dataclasses.asdict(cfg.lora)) if cfg.lora else None,
        },
        tokenizer_file=bundle.tokenizer_file,
        device=device,
        fault=cfg.fault,
    )
    trainer.schedulers = [
        build_scheduler(opt, cfg.schedule, trainer.total_steps) for opt in optimizers
    ]
    return trainer


def _base_weights(model: nn.Module, base: OpenedModel, where: str) -> dict[str, torch.Tensor]:
    """The base model's tensors by name (an export's are read one at a time, when its
    parameter is filled), checked against the (meta) model they will fill."""
    weights = base.tensors()
    shapes = getattr(weights, "shapes", None) or {k: tuple(t.shape) for k, t in weights.items()}
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing = sorted(want.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - want.keys())
    wrong = [
        f"{k} is {shapes[k]} there but {want[k]} here"
        for k in sorted(want.keys() & shapes.keys())
        if shapes[k] != want[k]
    ]
    problems = [f"missing {', '.join(missing[:5])}"] if missing else []
    problems += [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []
    problems += wrong[:5]
    if problems:  # e.g. shapes changed by model.overrides
        raise ValueError(f"the weights in '{where}' do not fit the model: {'; '.join(problems)}")
    return weights


def _output_layer_name(model: nn.Module) -> str:
    """The full model's last Linear: muon keeps it on AdamW in whichever part holds it."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else ""


def run(cfg: RunConfig) -> TrainResult:
    """Train as ``cfg`` says; the resolved config is kept as ``run_dir/config.yaml``."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = build_trainer(cfg)
        if bdist.is_main():
            save_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
        return trainer.fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # train.deterministic ends with the run
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False))


def _plain(value: Any) -> Any:
    """JSON-safe copy (tuples become lists) for YAML and JSON metadata."""
    return json.loads(json.dumps(value))
