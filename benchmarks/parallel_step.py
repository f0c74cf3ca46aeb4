"""What a parallel layout costs per step: compute vs communication time, and the bytes
each collective moves, measured by torch's profiler on the real trainer step.

    python benchmarks/parallel_step.py --model gpt-nano --nproc 2 \
        --layouts dp_shard=2 dp_replicate=2,dp_shard=1 tp=2,dp_shard=1 pp=2,dp_shard=1

Each layout runs under torchrun (gloo on CPU, NCCL on GPUs) on the same global batch. The
communication time is the time spent inside collective calls (``gloo:*`` / ``nccl:*``
profiler events) on rank 0; compute is the rest of the step. Bytes are each collective's
input buffer on rank 0. Prints a table, writes JSON and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

COLLECTIVE_PREFIXES = ("gloo:", "nccl:")


def layout_flags(layout: str) -> list[str]:
    """``tp=2,dp_shard=1`` -> ``--parallel.tp 2 --parallel.dp_shard 1``."""
    flags = []
    for item in filter(None, layout.split(",")):
        key, _, value = item.partition("=")
        flags += [f"--parallel.{key.strip()}", value.strip()]
    return flags


def worker(args: argparse.Namespace) -> None:
    """One rank: build the trainer as ``baobab train`` would, profile a few steps."""
    from torch.profiler import ProfilerActivity, profile

    from baobab.cli import parse_run_config
    from baobab.train import build_trainer
    from baobab.train import distributed as bdist

    cfg = parse_run_config(
        ["--model.name", args.model, "--model.overrides.tie_embeddings", "false",
         "--data.path", args.data, "--data.seq_len", str(args.seq_len), "--data.batch_size", str(args.local_batch),
         "--train.max_steps", "1000", "--train.progress", "false", "--train.run_dir", args.run_dir,
         "--schedule.name", "constant", *layout_flags(args.layout)]
    )  # fmt: skip
    trainer = build_trainer(cfg)
    for part in trainer.parts:
        part.to(trainer.device)
    for _ in range(args.warmup):
        trainer._train_step()
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if trainer.device.type == "cuda" else []
    )
    bdist.barrier()
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer._train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / args.steps
    comm_us, calls, nbytes = 0.0, defaultdict(int), defaultdict(int)
    for event in prof.events():
        if event.name.startswith(COLLECTIVE_PREFIXES):
            comm_us += (
                event.cpu_time_total if trainer.device.type == "cpu" else event.device_time_total
            )
            calls[event.name] += 1
            shape = event.input_shapes[0] if event.input_shapes and event.input_shapes[0] else []
            dtype = event.input_dtypes[0] if getattr(event, "input_dtypes", None) else "float"
            nbytes[event.name] += _numel(shape) * _dtype_size(dtype)
    if bdist.is_main():
        comm_s = comm_us / 1e6 / args.steps
        result = {
            "layout": args.layout,
            "strategy": trainer.parallel.cfg.strategy_name if trainer.parallel else "single",
            "world_size": bdist.world_size(),
            "step_s": step_s,
            "comm_s": min(comm_s, step_s),
            "compute_s": max(step_s - comm_s, 0.0),
            "collectives_per_step": {k: v / args.steps for k, v in calls.items()},
            "bytes_per_step": {k: v / args.steps for k, v in nbytes.items()},
        }
        Path(args.out).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _dtype_size(name: str) -> int:
    name = str(name).lower()
    if "bfloat16" in name or "half" in name or "float16" in name:
        return 2
    if "double" in name or "long" in name or "int64" in name:
        return 8
    if "byte" in name or "bool" in name or "char" in name:
        return 1
    return 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-nano")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["dp_replicate=2,dp_shard=1", "dp_shard=2", "tp=2,dp_shard=1", "pp=2,dp_shard=1"],
    )
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/parallel_step.json")
    # worker mode (set by this script when it re-launches itself under torchrun)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--local-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from baobab import data as bdata

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        files = [str(p) for p in bdata.stdlib_files()[:60]]
        bdata.prepare(
            bdata.PrepareConfig(
                inputs=files, out=str(corpus), tokenizer="bytes", val_fraction=0.1, progress=False
            )
        )
        for layout in args.layouts:
            flags = dict(item.split("=") for item in layout.split(","))
            dp = int(flags.get("dp_replicate", 1)) * int(
                flags.get("dp_shard", args.nproc // _product(flags))
            )
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   __file__, "--worker", "--layout", layout, "--model", args.model, "--data", str(corpus),
                   "--seq-len", str(args.seq_len), "--local-batch", str(args.global_batch // dp),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--run-dir", str(Path(tmp) / "run"),
                   "--out", str(out)]  # fmt: skip
            done = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            if done.returncode != 0:
                print(f"{layout}: failed\n{done.stderr[-2000:]}")
                continue
            results.append(json.loads(out.read_text()))
    print(
        f"\n{args.model}, global batch {args.global_batch} x {args.seq_len} tokens, {args.nproc} processes"
    )
    print(
        f"{'layout':<22} {'step ms':>9} {'compute ms':>11} {'comm ms':>9}  bytes/step by collective (rank 0)"
    )
    for r in results:
        moved = ", ".join(
            f"{k.split(':')[1]} {v / 1e6:.2f} MB" for k, v in sorted(r["bytes_per_step"].items())
        )
        print(
            f"{r['strategy']:<22} {1e3 * r['step_s']:>9.1f} {1e3 * r['compute_s']:>11.1f} {1e3 * r['comm_s']:>9.1f}  {moved}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"model": args.model, "nproc": args.nproc, "results": results}, indent=2)
    )
    _plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _product(flags: dict[str, str]) -> int:
    n = 1
    for key in ("dp_replicate", "tp", "pp"):
        n *= int(flags.get(key, 1))
    return n


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["strategy"] for r in results]
    compute = [1e3 * r["compute_s"] for r in results]
    comm = [1e3 * r["comm_s"] for r in results]
    ax.barh(names, compute, label="compute")
    ax.barh(names, comm, left=compute, label="communication")
    ax.set_xlabel("ms per step (rank 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
