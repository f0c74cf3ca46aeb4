"""Memory that shrinks with the world: per-rank peak memory of FSDP-1, 2 and 4, beside the plan.

A Llama-shaped model of ~291M parameters (d_model 1024, 20 blocks, 16 heads over 4 kv
heads, SwiGLU 2816, vocabulary 32000, untied), whose parameters, gradients and AdamW state
dominate, trains a few steps in fp32 on the CPU (gloo) as ``baobab train`` builds it
(``build_trainer``: meta build, parallelize, per-shard materialisation). Every rank keeps
the same micro-batch, so only the sharded state should shrink. Each rank reports its peak
resident memory (VmHWM) above the interpreter's baseline (its resident memory after the
imports, the high-water mark reset there through /proc/self/clear_refs); ``baobab plan``'s
peak for the same run stands beside it. Target: at 4 ranks, every rank peaks at no more
than 0.35x the one-process peak. Writes a table, JSON and a PNG under benchmarks/results/.

    python benchmarks/memory_scaling.py [--ranks 1 2 4] [--steps 3] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(vocab_size=32000, n_layer=20, n_head=16, n_kv_head=4, d_model=1024,
             ffn_hidden=2816, max_seq_len=256, tie_embeddings=False)  # fmt: skip
TARGET = 0.35  # per-rank peak at 4 ranks over the one-process peak


def run_config(corpus: str, run_dir: str, seq_len: int, batch: int, steps: int):
    from baobab.optim import OptimConfig
    from baobab.parallel import ParallelConfig
    from baobab.train.config import DataConfig, ModelSpec, RunConfig, TrainerConfig

    return RunConfig(
        model=ModelSpec("gpt", overrides=dict(SHAPE)),
        data=DataConfig(path=corpus, seq_len=seq_len, batch_size=batch),
        optim=OptimConfig(name="adamw", lr=1e-4),
        train=TrainerConfig(
            run_dir=run_dir, max_steps=steps, precision="fp32", device="cpu", progress=False
        ),
        parallel=ParallelConfig(),  # FSDP over every rank
    )


def _status(key: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/self/status has no {key}")


def worker(out: Path, corpus: str, seq_len: int, batch: int, steps: int) -> None:
    """One rank: baseline after the imports, then build and train; report the peaks."""
    import torch
    import torch.distributed as dist

    from baobab.train.run import build_trainer

    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
    baseline = _status("VmRSS")
    rank = int(os.environ["RANK"])
    t0 = time.perf_counter()
    trainer = build_trainer(run_config(corpus, str(out / "run"), seq_len, batch, steps))
    built = _status("VmHWM") - baseline
    for _ in range(steps):
        trainer._train_step()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - baseline
    if dist.is_initialized():
        dist.barrier()
    result = {"rank": rank, "baseline": baseline, "peak_above_baseline": peak,
              "peak_after_build": built, "seconds": seconds}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, corpus: str, args) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", str(out), "--corpus", corpus,
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(world)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"FSDP-{world}: a rank exited with {codes}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def planned(corpus: str, world: int, args) -> dict:
    """``baobab plan``'s per-rank memory for the same run (FSDP over ``world`` ranks)."""
    from baobab.train.plan_memory import rank_memory
    from baobab.train.plan_report import model_config, run_shape

    cfg = run_config(corpus, "unused", args.seq_len, args.batch, args.steps)
    model_cfg = model_config(cfg)
    run = run_shape(cfg, model_cfg)
    layout = cfg.parallel.validate(world, model_cfg, seq_len=run.seq_len)
    return rank_memory(run, layout, 0, "cpu").parts()


def _corpus(root: Path) -> str:
    from baobab import data as bdata

    files = [str(p) for p in bdata.stdlib_files()[:40]]
    out = root / "corpus"
    bdata.prepare(bdata.PrepareConfig(inputs=files, out=str(out), tokenizer="bytes",
                                      val_fraction=0.1, workers=1, progress=False))  # fmt: skip
    return str(out)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    ranks = [r["ranks"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, [r["measured"] / gib for r in rows], "o-", label="measured (max over ranks)")
    ax.plot(ranks, [r["planned"] / gib for r in rows], "s--", label="baobab plan")
    one = rows[0]["measured"] / gib
    ax.plot(ranks, [one / n for n in ranks], ":", color="grey", label="1/N of one process")
    ax.axhline(TARGET * one, color="red", lw=0.8, label=f"target at 4 ranks ({TARGET}x)")
    ax.set_xlabel("ranks (FSDP)")
    ax.set_ylabel("per-rank peak above baseline (GiB)")
    ax.set_xticks(ranks)
    ax.set_title("~291M-parameter Llama, fp32 AdamW, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per rank")
    parser.add_argument("--out", default=str(RESULTS / "memory_scaling.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.corpus, args.seq_len, args.batch, args.steps)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(Path(tmp))
        for world in tqdm(args.ranks, desc="FSDP-1/2/4 runs", unit="run"):  # minutes each
            ranks = launch(world, Path(tmp) / f"fsdp{world}", corpus, args)
            plan = planned(corpus, world, args)
            measured = max(r["peak_above_baseline"] for r in ranks)
            rows.append({"ranks": world, "measured": measured, "planned": plan["peak"],
                         "per_rank": ranks, "plan_parts": plan})  # fmt: skip
    one = rows[0]["measured"] if rows[0]["ranks"] == 1 else None
    # built: the peak once the model is built and sharded, before the first step (no rank
    # should hold the whole model); measured: the peak over the whole run.
    print(f"{'ranks':>5}  {'built GiB':>9}  {'measured GiB':>12}  {'plan GiB':>9}  "
          f"{'plan/meas':>9}  {'x one':>6}")  # fmt: skip
    for row in rows:
        ratio = row["measured"] / one if one else float("nan")
        row["ratio_to_one_process"] = ratio
        built = max(r["peak_after_build"] for r in row["per_rank"])
        print(f"{row['ranks']:>5}  {built / 2**30:>9.2f}  {row['measured'] / 2**30:>12.2f}  "
              f"{row['planned'] / 2**30:>9.2f}  {row['planned'] / row['measured']:>9.2f}  "
              f"{ratio:>6.2f}")  # fmt: skip
    at4 = next((r["ratio_to_one_process"] for r in rows if r["ranks"] == 4), None)
    verdict = None if at4 is None else at4 <= TARGET
    if at4 is not None:
        print(f"target: 4 ranks <= {TARGET}x one process: {at4:.2f}x, "
              f"{'met' if verdict else 'NOT met'}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": SHAPE, "steps": args.steps, "seq_len": args.seq_len,
            "batch_per_rank": args.batch, "machine": platform.platform(),
            "cpus": os.cpu_count(), "target": TARGET, "target_met": verdict}  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    png = out.with_suffix(".png")
    _plot(rows, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
