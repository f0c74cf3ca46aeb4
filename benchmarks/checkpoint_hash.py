"""What checkpoint checksums cost: save and load with and without them, in the same run.

A gpt2-124m-shape model with its AdamW state (about 1.6 GB on disk, one process) is saved
with ``save_checkpoint`` and loaded back with ``load_checkpoint``, hashing as DCP writes
and verifying on load with XXH3-128 (baobab's default) and with sha256, and with neither
(the baseline: ``checksum.saving_with(None)``); rounds rotate which goes first so that
drift of a shared machine hits all. Each load reads the files its save has just written
(in the page cache, as in a run that resumes soon after saving). Also timed:
``verify_checkpoint``, the full pass a resume makes to choose its checkpoint (its load then
skips hashing), and each hash alone on one buffer. Prints a table and the ratios to the
baseline (best round of each); writes JSON.

    python benchmarks/checkpoint_hash.py [--model gpt2-124m] [--rounds 3] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baobab import models
from baobab.checkpoint import checksum, load_checkpoint, save_checkpoint, verify_checkpoint

MODES = ("plain", "xxh3_128", "sha256")  # plain: no checksums at all


def build(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = models.build_model(models.get_config(name))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # exp_avg and exp_avg_sq exist: the optimizer state a run saves
    opt.zero_grad(set_to_none=True)
    return model, opt


def one_round(mode: str, run_dir: Path, step: int, model, opt, meta: dict) -> dict[str, float]:
    """Save then load once in ``mode``; seconds of each (and of a resume's verify)."""
    state = {"step": step}
    with checksum.saving_with(None if mode == "plain" else mode):
        start = time.perf_counter()
        path = save_checkpoint(run_dir, step, [model], [opt], state, meta, keep_last=1)
        saved = time.perf_counter() - start
    quiet = contextlib.redirect_stderr(io.StringIO())  # the baseline's "no checksums" warning
    with quiet if mode == "plain" else contextlib.nullcontext():
        start = time.perf_counter()
        load_checkpoint(path, [model], [opt])
        loaded = time.perf_counter() - start
    times = {"save": saved, "load": loaded}
    if mode != "plain":
        start = time.perf_counter()
        assert verify_checkpoint(path) is None
        times["verify"] = time.perf_counter() - start
        checksum.take_verified(path)  # forget it: the next load must hash again
    return times


def hash_rate(algorithm: str, nbytes: int = 256 << 20) -> float:
    """Bytes per second of one hash over one buffer in memory (no I/O)."""
    buf = os.urandom(nbytes)
    digest = checksum.new_hash(algorithm)
    start = time.perf_counter()
    digest.update(buf)
    digest.hexdigest()
    return nbytes / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/checkpoint_hash.json")
    args = parser.parse_args()

    model, opt = build(args.model)
    meta = {"model": {"name": args.model, "family": "gpt", "config": {}}}
    times = {m: {"save": [], "load": [], "verify": []} for m in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run_dir, step = Path(tmp) / "run", 1
        one_round("plain", run_dir, step, model, opt, meta)  # warm up allocator and imports
        for r in range(args.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                step += 1
                for key, value in one_round(mode, run_dir, step, model, opt, meta).items():
                    times[mode][key].append(value)
            print(
                f"round {r + 1}: "
                + "  ".join(
                    f"{m} save {times[m]['save'][-1]:.2f}s load {times[m]['load'][-1]:.2f}s"
                    for m in MODES
                )  # fmt: skip
            )
        newest = run_dir / "checkpoints" / f"step_{step:08d}"
        nbytes = sum(p.stat().st_size for p in newest.iterdir())
    # Best of the rounds, as in train_throughput.py: on a shared machine the fastest round
    # is the one least disturbed; medians go to the JSON too.
    best = {m: {k: min(v) for k, v in t.items() if v} for m, t in times.items()}
    median = {m: {k: statistics.median(v) for k, v in t.items() if v} for m, t in times.items()}
    ratio = {m: {k: best[m][k] / best["plain"][k] for k in ("save", "load")} for m in MODES[1:]}
    rates = {m: hash_rate(m) for m in MODES[1:]}
    result = {
        "model": args.model,
        "params": models.count_params(model),
        "checkpoint_bytes": nbytes,
        "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads",  # fmt: skip
        "rounds": args.rounds,
        "default_hash": checksum.ALGORITHM,
        "hash_bytes_per_s": rates,
        "seconds": times,
        "best_seconds": best,
        "median_seconds": median,
        "ratio_over_plain": ratio,
    }
    print(f"\ncheckpoint of {args.model}: {nbytes / 1e9:.2f} GB")
    print(f"{'mode':<9} {'save s':>7} {'load s':>7} {'verify s':>9} {'save x':>7} {'load x':>7} {'hash GB/s':>10}")  # fmt: skip
    for m in MODES:
        row, r = best[m], ratio.get(m)
        print(
            f"{m:<9} {row['save']:>7.2f} {row['load']:>7.2f} "
            + (
                f"{row['verify']:>9.2f} {r['save']:>7.3f} {r['load']:>7.3f} {rates[m] / 1e9:>10.2f}"
                if r
                else f"{'-':>9} {'1':>7} {'1':>7} {'-':>10}"
            )  # fmt: skip
        )
    print(
        f"target: at most 1.10 for save and load with {checksum.ALGORITHM} (baobab's default); best of {args.rounds} rounds"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
