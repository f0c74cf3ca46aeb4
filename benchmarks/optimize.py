"""What compile, activation checkpointing and weight-only quantization buy, in one run.

Training (gpt-mini by default, the quickstart batch): eager vs per-block ``torch.compile``
vs full and selective activation checkpointing; tokens/s and peak memory. Each mode runs in
its own child process so peaks do not mix: on CUDA the peak is ``max_memory_allocated``;
on CPU it is the growth of the process's peak resident set (VmHWM, reset after set-up,
Linux only) over the timed steps, compile and warm-up included.

Inference (a trained checkpoint, by default the quickstart's): fp32 vs int8 vs int4 export;
file size, peak memory, forward tokens/s and held-out perplexity, via
``baobab.export.quantization_report``. The int8 and int4 linears run torch's fused kernels
with bf16 activations, so their perplexity change includes that rounding. Batch-1 decode
speed is ``benchmarks/serve_engine.py --quantized``'s.

    baobab quickstart                 # once, for the checkpoint and the prepared corpus
    python benchmarks/optimize.py [--model gpt-mini] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = {
    "eager": [],
    "compile": ["--blocks.compile", "true"],
    "compile-model": ["--blocks.compile_model", "true"],
    "ac-full": ["--blocks.activation_checkpointing", "full"],
    "ac-selective": ["--blocks.activation_checkpointing", "selective", "--blocks.ac_every", "2"],
}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child_train(args: argparse.Namespace) -> None:
    """One training mode: set up, reset the memory peak, run warm-up + timed steps."""
    from baobab.cli import parse_run_config
    from baobab.train import build_trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = parse_run_config(
            ["--recipe", "quickstart", "--model.name", args.model, "--data.path", args.data,
             "--data.batch_size", str(args.batch), "--train.run_dir", run_dir, "--train.progress", "false",
             "--schedule.name", "constant", *MODES[args.child_train]]
        )  # fmt: skip
        trainer = build_trainer(cfg)
        for part in trainer.parts:
            part.to(trainer.device)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # peak (VmHWM) := current RSS
            base = _status_kib("VmRSS") * 1024
        for _ in range(args.warmup):
            trainer._train_step()  # compile happens here
        start, items = time.perf_counter(), 0
        for _ in range(args.steps):
            items += trainer._train_step()[2]
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (
            torch.cuda.max_memory_allocated() - base if cuda else _status_kib("VmHWM") * 1024 - base
        )
    print(
        json.dumps({"mode": args.child_train, "tokens_per_s": items / elapsed, "peak_bytes": peak})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-mini")
    parser.add_argument(
        "--data",
        default="data/stdlib-4096",
        help="the prepared corpus (baobab quickstart makes it)",
    )
    parser.add_argument(
        "--checkpoint", default="runs/quickstart", help="a trained LM checkpoint or run directory"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/optimize.json")
    parser.add_argument("--child-train", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        child_train(args)
        return
    if not (Path(args.data) / "manifest.json").is_file():
        sys.exit(f"error: '{args.data}' holds no prepared corpus; run `baobab quickstart` first")

    training = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child-train", mode, "--model", args.model, "--data", args.data,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            continue
        training.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"train {mode:<13} {training[-1]['tokens_per_s']:>9,.0f} tok/s  peak {training[-1]['peak_bytes'] / 2**20:8.1f} MiB"
        )

    from baobab.export import export_checkpoint, quantization_report, quantize_export
    from baobab.export.quant_report import format_report

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_checkpoint(args.checkpoint, Path(tmp) / "fp32")
        quantized = [quantize_export(fp32, Path(tmp) / f"int{bits}", bits) for bits in (8, 4)]
        inference = quantization_report(fp32, quantized, args.data, seq_len=256, batches=20)
    print(
        f"\n{args.model}: training, batch {args.batch} x 256 tokens, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"{'mode':<14} {'tokens/s':>10} {'vs eager':>9} {'peak MiB':>9} {'vs eager':>9}")
    eager = next((r for r in training if r["mode"] == "eager"), None)
    for r in training:
        speed = r["tokens_per_s"] / eager["tokens_per_s"] if eager else float("nan")
        memory = (
            r["peak_bytes"] / eager["peak_bytes"] if eager and eager["peak_bytes"] else float("nan")
        )
        print(
            f"{r['mode']:<14} {r['tokens_per_s']:>10,.0f} {speed:>8.2f}x {r['peak_bytes'] / 2**20:>9.1f} {memory:>8.2f}x"
        )
    print(f"\ninference ({args.checkpoint}, held-out val split):")
    print(format_report(inference))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    out.write_text(
        json.dumps(
            {"model": args.model, "device": device, "training": training, "inference": inference},
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
