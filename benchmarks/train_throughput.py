"""baobab's Trainer against a minimal hand-written PyTorch loop, in the same run.

Both train the same model (same init), on the same token windows, with the same batch,
AdamW and gradient clipping, for the same number of steps; rounds alternate between the
two so drift of a shared machine hits both. Prints tokens/s of each, their ratio and MFU
by baobab's one definition (``baobab.train.device``: the data-sheet peak of a known GPU for
the run's compute dtype, else a probe that load does not lower); writes JSON.

    python benchmarks/train_throughput.py [--model gpt-mini] [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baobab import data as bdata
from baobab import models
from baobab.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler
from baobab.train import Trainer, TrainerConfig, build_objective
from baobab.train.device import autocast_context, compute_dtype, mfu, peak_flops, pick_device


def baseline_loop(
    model, windows: np.ndarray, batch: int, steps: int, lr: float, device, precision: str
) -> float:
    """The loop a user would write by hand: nanoGPT-style; returns seconds for ``steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(windows), batch)
        xy = torch.from_numpy(windows[idx].astype(np.int64)).to(device)
        x, y = xy[:, :-1], xy[:, 1:]
        with autocast_context(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    _sync(device)
    return time.perf_counter() - start


def baobab_loop(
    model,
    data_dir: Path,
    seq_len: int,
    batch: int,
    steps: int,
    lr: float,
    precision: str,
    peak: float,
    flops: float,
) -> float:
    optim_cfg = OptimConfig(
        name="adamw", lr=lr, weight_decay=0.1, betas=(0.9, 0.95), grad_clip_norm=1.0
    )
    optimizer = build_optimizer(model, optim_cfg)
    loader = bdata.DataLoader(bdata.TokenWindows(data_dir, "train", seq_len), batch, seed=0)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainerConfig(
            run_dir=run_dir,
            max_steps=steps,
            precision=precision,
            progress=False,
            peak_flops=peak,
            log_every=10,
        )
        trainer = Trainer(
            model,
            optimizer,
            loader,
            cfg=cfg,
            objective=build_objective("causal_lm"),
            grad_clip_norm=1.0,
            flops_per_item=flops,
        )
        trainer.schedulers = [build_scheduler(optimizer, ScheduleConfig(name="constant"), steps)]
        start = time.perf_counter()
        trainer.fit()
        _sync(trainer.device)
        return time.perf_counter() - start


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-mini")
    parser.add_argument(
        "--data",
        default="data/stdlib-4096",
        help="a prepared corpus (made from the stdlib if missing)",
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    device = pick_device()
    data_dir = Path(args.data)
    if not (data_dir / "manifest.json").is_file():
        bdata.prepare_stdlib(data_dir, vocab_size=4096)
    manifest = bdata.Manifest.load(data_dir)
    model_cfg = models.get_config(args.model, vocab_size=manifest.vocab_size)
    flops = models.training_flops_per_token(model_cfg, args.seq_len)
    peak, peak_source = peak_flops(device, compute_dtype(device, args.precision))
    tokens_np = np.concatenate([np.asarray(m) for m in manifest.open_tokens("train")])
    n_windows = (len(tokens_np) - 1) // args.seq_len
    windows = np.lib.stride_tricks.as_strided(
        tokens_np,
        shape=(n_windows, args.seq_len + 1),
        strides=(tokens_np.strides[0] * args.seq_len, tokens_np.strides[0]),
    )

    def fresh_model():
        torch.manual_seed(0)
        return models.build_model(model_cfg).to(device)

    tokens_per_run = args.steps * args.batch * args.seq_len
    times = {"baseline": [], "baobab": []}
    warm = fresh_model()
    baseline_loop(
        warm, windows, args.batch, 3, 1e-3, device, args.precision
    )  # warm caches/allocator
    for r in range(args.rounds):
        times["baseline"].append(
            baseline_loop(
                fresh_model(), windows, args.batch, args.steps, 1e-3, device, args.precision
            )
        )
        times["baobab"].append(
            baobab_loop(
                fresh_model(),
                data_dir,
                args.seq_len,
                args.batch,
                args.steps,
                1e-3,
                args.precision,
                peak,
                flops,
            )
        )
        print(
            f"round {r + 1}: baseline {times['baseline'][-1]:.2f}s  baobab {times['baobab'][-1]:.2f}s"
        )
    tps = {k: tokens_per_run / min(v) for k, v in times.items()}
    utilisation = {k: mfu(v * flops, peak) for k, v in tps.items()}
    result = {
        "model": args.model,
        "params": models.count_params(fresh_model()),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "precision": args.precision,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "train_flops_per_token": flops,
        "peak_flops": peak,
        "peak_source": peak_source,
        "tokens_per_s": tps,
        "mfu": utilisation,
        "ratio_baobab_over_baseline": tps["baobab"] / tps["baseline"],
        "seconds": times,
    }
    print(f"\n{'loop':<10} {'tokens/s':>10} {'MFU':>7}")
    for k in ("baseline", "baobab"):
        print(f"{k:<10} {tps[k]:>10,.0f} {100 * utilisation[k]:>6.1f}%")
    print(
        f"ratio baobab/baseline: {result['ratio_baobab_over_baseline']:.3f}  (peak {peak / 1e9:.1f} GFLOP/s, {peak_source}; {result['device']})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    png = plot_rounds(times, tokens_per_run, result, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")


def plot_rounds(times: dict[str, list[float]], tokens: int, result: dict, out: Path) -> Path:
    """Tokens/s of each round for both loops, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = range(1, len(times["baseline"]) + 1)
    width = 0.38
    for offset, name in ((-width / 2, "baseline"), (width / 2, "baobab")):
        ax.bar([r + offset for r in rounds], [tokens / t for t in times[name]], width, label=name)
    ratio = result["ratio_baobab_over_baseline"]
    ax.set(
        xlabel="round",
        ylabel="tokens/s",
        title=f"{result['model']} training, baobab/baseline = {ratio:.3f}",
    )
    ax.set_xticks(list(rounds))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
