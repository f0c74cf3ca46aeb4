"""From ``baobab plan``'s flags to a printed plan: the run's shape, the device, the report.

The flags are ``baobab train``'s (a ``RunConfig``) plus the world (``--nproc-per-node``,
``--nnodes``) and the device (``--device-memory``, ``--device-peak-tflops``, link
bandwidths). The model config is resolved as the run would resolve it (the prepared
corpus's vocabulary when one is on disk, an export's config for ``--model.init``), without
reading any weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from baobab import models
from baobab.train.config import RunConfig
from baobab.train.plan import (
    Hardware,
    Plan,
    not_fitting,
    parse_bytes,
    plan_layout,
    search,
    size,
    unit_for,
)
from baobab.train.plan_memory import RunShape, param_shapes, resolve_precision


def model_config(cfg: RunConfig) -> Any:
    """The model config the run would build, from its flags and the files it names."""
    from baobab.train.run import model_config_for

    if cfg.model.init:
        path = Path(cfg.model.init) / "config.json"
        described = json.loads(path.read_text()).get("model") if path.is_file() else None
        if not isinstance(described, dict):  # an HF directory or a checkpoint: open it
            from baobab.export.open import open_model

            described = open_model(cfg.model.init).described
        return models.get_config(
            described["name"], **{**described["config"], **cfg.model.overrides}
        )
    facts: dict[str, Any] = {}
    manifest = Path(cfg.data.path or "") / "manifest.json"
    if cfg.data.kind == "tokens" and manifest.is_file():
        from baobab.data import Manifest

        vocab = Manifest.load(manifest.parent).vocab_size
        facts = {"vocab_size": -(-vocab // 64) * 64, "tokenizer_vocab_size": vocab}
    return model_config_for(cfg, facts)


def run_shape(cfg: RunConfig, model_cfg: Any) -> RunShape:
    seq_len = (
        cfg.data.seq_len if cfg.data.kind == "tokens" else getattr(model_cfg, "max_seq_len", 1)
    )
    return RunShape(
        model_cfg=model_cfg,
        batch_size=cfg.data.batch_size,
        seq_len=seq_len,
        grad_accum=cfg.train.grad_accum,
        precision=cfg.train.precision,
        optim=cfg.optim,
        blocks=cfg.blocks,
        lora=cfg.lora,
    )


def hardware(
    cfg: RunConfig,
    nproc_per_node: int,
    device_memory: str | None,
    device_peak_tflops: float | None,
    intra_node_gbps: float,
    inter_node_gbps: float,
) -> Hardware:
    """The device the plan is for: ``train.device`` (auto: this machine's), its memory and
    peak unless given. A CPU's memory is the machine's RAM shared by its ranks."""
    from baobab.train import device as bdevice

    device = bdevice.pick_device(cfg.train.device)
    if device_memory is not None:
        memory = parse_bytes(device_memory)
    elif device.type == "cuda" and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // nproc_per_node
    else:
        raise ValueError(
            f"cannot read the memory of a {device.type} device here; pass --device-memory "
            "(e.g. 80GiB)"
        )
    if device_peak_tflops is not None:
        if not device_peak_tflops > 0:
            raise ValueError(f"--device-peak-tflops must be positive, got {device_peak_tflops}")
        peak = device_peak_tflops * 1e12
    elif cfg.train.peak_flops:
        peak = cfg.train.peak_flops
    elif device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device here to read its peak from; pass --device-peak-tflops")
    else:
        peak, _ = bdevice.peak_flops(device, bdevice.compute_dtype(device, cfg.train.precision))
    for key, value in (("intra-node", intra_node_gbps), ("inter-node", inter_node_gbps)):
        if not value > 0:
            raise ValueError(f"--{key}-gbps must be positive, got {value}")
    return Hardware(
        device_type=device.type,
        memory=memory,
        peak_flops=peak,
        nproc_per_node=nproc_per_node,
        intra_node_bandwidth=intra_node_gbps * 1e9,
        inter_node_bandwidth=inter_node_gbps * 1e9,
    )


def _row(plan: Plan, scale: int) -> list[str]:
    w = plan.worst
    parts = ("parameters", "gradients", "optimizer", "activations", "buffers", "peak")
    return [
        plan.name,
        str(plan.batch_size),
        *(f"{getattr(w, k) / scale:.2f}" for k in parts),
        "yes" if plan.fits else "no",
        f"{plan.step_time:.3g}",
        f"{100 * plan.mfu_ceiling:.1f}%",
    ]


def table(plans: list[Plan]) -> str:
    """One row per plan; sizes per rank (worst pipeline rank) in one unit."""
    unit, scale = unit_for(max((p.worst.peak for p in plans), default=0))
    header = ["layout", "batch", "params", "grads", "optim", "activ", "buffers",
              f"peak {unit}", "fits", "step s", "MFU max"]  # fmt: skip
    rows = [header, *(_row(p, scale) for p in plans)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def describe(plan: Plan, hw: Hardware) -> str:
    """The text report of one plan."""
    w = plan.worst
    where = f" (worst: pipeline rank {w.pp_rank})" if plan.layout.pp > 1 else ""
    lines = [f"{plan.name}: per rank{where}"]
    labels = {"buffers": "communication buffers", "temporaries": "temporaries (largest)"}
    for key, value in w.parts().items():
        if key != "peak":
            lines.append(f"  {labels.get(key, key):<24}{size(value):>12}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'peak':<24}{size(w.peak):>12}  of {size(plan.device_memory)}: {verdict}")
    lines.append(
        f"FLOPs per step {plan.flops_per_step:.3g} ({plan.tokens_per_step:,} tokens); at "
        f"{hw.peak_flops / 1e12:.4g} TFLOP/s per device: step {plan.step_time:.3g} s "
        f"(compute {plan.compute_time:.3g} s, exposed communication {plan.comm_time:.3g} s), "
        f"MFU ceiling {100 * plan.mfu_ceiling:.1f}%"
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def report(
    cfg: RunConfig,
    world: int,
    hw: Hardware,
    *,
    find: bool = False,
    as_json: bool = False,
    check: Any = None,
) -> tuple[str, bool]:
    """(the printed report, whether some plan fits). ``find`` searches every layout."""
    model_cfg = model_config(cfg)
    run = run_shape(cfg, model_cfg)
    refused: list[tuple[str, str]] = []
    seq = run.seq_len if models.task_of(model_cfg) in ("causal_lm", "masked_lm") else None
    if find:
        plans, refused = search(run, cfg.parallel, world, hw, check)
    else:
        layout = cfg.parallel.validate(
            world, model_cfg, seq_len=seq, local_batch_size=run.batch_size
        )
        if check is not None:
            check(layout)
        plans = [plan_layout(run, layout, hw)]
    if cfg.distill.teacher:
        for plan in plans:
            plan.notes.append(
                f"the distillation teacher '{cfg.distill.teacher}' is not counted: its "
                "weights (on every rank) and logits come on top"
            )
    fits = any(p.fits for p in plans)
    precision = resolve_precision(cfg.train.precision, hw.device_type)
    head = {
        "model": cfg.model.name if not cfg.model.init else cfg.model.init,
        "parameters": _count(model_cfg),
        "world_size": world,
        "nproc_per_node": hw.nproc_per_node,
        "precision": precision,
        "batch_size": run.batch_size,
        "seq_len": run.seq_len,
        "device": dataclasses.asdict(hw),
    }
    if as_json:
        body = {**head, "plans": [p.to_dict() for p in plans],
                "refused": [{"layout": n, "reason": r} for n, r in refused]}  # fmt: skip
        return json.dumps(body, indent=1), fits
    shape = f"batch {run.batch_size}" + (f" x seq {run.seq_len}" if seq else "")
    lines = [
        f"baobab plan: {head['model']} ({_count_text(head['parameters'])} parameters) on "
        f"{world} rank(s), {hw.nproc_per_node} per node, {hw.device_type}, {precision}, "
        f"{shape} per data-parallel rank"
    ]
    if not find:
        lines.append(describe(plans[0], hw))
        if not fits:
            lines.append(not_fitting(plans[0]) + " Try baobab plan --search.")
        return "\n".join(lines), fits
    good = [p for p in plans if p.fits]
    lines.append(
        f"{len(good)} of {len(plans)} layouts fit, fastest first; each trains on the same "
        f"global batch ({plans[0].tokens_per_step if plans else 0:,} tokens a step; batch: "
        "per data-parallel rank); sizes per rank:"
    )
    lines.append(table(good) if good else "(none)")
    lines += ["does not fit: " + not_fitting(p) for p in plans if not p.fits]
    lines += [f"impossible: {name}: {why}" for name, why in refused]
    return "\n".join(lines), fits


def _count_text(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _count(model_cfg: Any) -> int:
    """Parameters of the whole model (tied weights once), from the one-block probe."""
    shapes = param_shapes(model_cfg, None, 1, False)
    return sum(p.numel for p in shapes.root) + shapes.n_layer * sum(p.numel for p in shapes.block)
