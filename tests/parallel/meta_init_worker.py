"""One rank of test_meta_init: ``python meta_init_worker.py OUT_DIR``.

Environment: RANK, WORLD_SIZE=2, MASTER_ADDR, MASTER_PORT. For each layout the rank builds
the model on meta, parallelises it and materialises its shards (torchtitan's order) under
torch's memory tracker, checks its start against the one-process init (OUT_DIR/ref.pt,
written by the test), trains STEPS steps on its share of the global batch and writes the
peak memory, what it holds, and the losses to OUT_DIR/rank{RANK}.json. The "from an
export" layout fills its shards from OUT_DIR/export (that init, saved by the test) as a
``--model.init`` fine-tune does, reading one tensor at a time, and does not train.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor

from baobab.export.artifact import open_exported
from baobab.models import build_model
from baobab.parallel import (
    ParallelConfig,
    build_mesh,
    dp_rank_and_size,
    materialize_parallel,
    parallelize,
)

# Tied embeddings (the tie must survive sharding); 4 blocks so that no single parameter
# is a large part of the model: 213,568 parameters, the largest (the embedding) 16,384.
MODEL = ("gpt-nano", {"n_layer": 4, "vocab_size": 256, "max_seq_len": 32})
SEED, STEPS, GLOBAL_BATCH, SEQ, LR = 1234, 20, 8, 16, 1e-3
# name -> (ParallelConfig fields, filled from OUT_DIR/export instead of by init rules)
LAYOUTS = {"FSDP-2": ({}, False), "TP-2": ({"tp": 2}, False), "FSDP-2 from an export": ({}, True)}


def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.flatten(0, 1).float(), targets.flatten())  # mean over tokens


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    vocab = MODEL[1]["vocab_size"]
    draw = lambda: torch.randint(vocab, (GLOBAL_BATCH, SEQ), generator=g)  # noqa: E731
    return [(draw(), draw()) for _ in range(STEPS)]  # (B, T) tokens, (B, T) targets


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, foreach=True)


def reference() -> dict:
    """The one-process run: build_model's init under SEED (the same per-name init), then
    STEPS AdamW steps on the whole global batch."""
    model = build_model(MODEL[0], seed=SEED, **MODEL[1])
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, losses = optimizer(model.parameters()), []
    for x, y in batches():
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"init": init, "losses": losses}


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def run_layout(name: str, ref: dict, out_dir: Path) -> dict:
    fields, from_export = LAYOUTS[name]
    cfg = ParallelConfig(**fields)
    mesh = build_mesh(cfg, "cpu")
    largest = [0]  # bytes of the largest full tensor the materialiser made

    def observe(_: str, full: torch.Tensor) -> None:
        largest[0] = max(largest[0], full.numel() * full.element_size())

    tracker = MemTracker()  # every tensor allocated while active, by its storage's bytes
    with tracker:
        model = build_model(MODEL[0], device="meta", **MODEL[1])
        pm = parallelize(model, mesh, cfg, loss_fn=loss_fn)
        weights = open_exported(out_dir / "export")[1] if from_export else None
        materialize_parallel(pm.parts, SEED, "cpu", weights=weights, observe=observe)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    part = pm.parts[0]
    held = sum(_bytes(t) for t in [*part.parameters(), *part.buffers()])
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in part.parameters()]
    start_equal = all(
        torch.equal(f, ref["init"][n]) for f, (n, _) in zip(full, part.named_parameters())
    )
    tied = part.output.weight is part.tok_embeddings.weight
    del full
    if from_export:
        return {"peak_bytes": peak, "held_bytes": held, "largest_full_bytes": largest[0],
                "start_equal": start_equal, "tied": tied, "dtensors": True}  # fmt: skip

    dp_rank, dp_size = dp_rank_and_size(mesh)
    share = GLOBAL_BATCH // dp_size
    opt, losses = optimizer(part.parameters()), []
    for x, y in batches():
        rows = slice(dp_rank * share, (dp_rank + 1) * share)
        loss = loss_fn(part(x[rows]), y[rows])  # local mean: FSDP averages over dp ranks
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach() / dp_size if pm.reports else torch.zeros(())
        dist.all_reduce(loss)  # each dp replica's mean counted once
        losses.append(loss.item())
    return {
        "peak_bytes": peak,
        "held_bytes": held,
        "largest_full_bytes": largest[0],
        "start_equal": start_equal,
        "tied": tied,
        "dtensors": all(isinstance(p, DTensor) for p in part.parameters()),
        "losses": losses,
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    ref = torch.load(out_dir / "ref.pt", weights_only=True)
    results: dict[str, dict] = {}
    for name in LAYOUTS:
        t0 = time.perf_counter()
        try:
            results[name] = run_layout(name, ref, out_dir)
            results[name]["seconds"] = time.perf_counter() - t0
        except Exception:  # report, then leave: peers blocked in a collective fail fast
            results[name] = {"error": traceback.format_exc()}
            (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
            sys.stdout.flush()
            os._exit(1)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
