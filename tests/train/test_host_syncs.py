"""The host waits for the device at most once per step: never inside a training step, once
per read of the loss (logging steps), with a NaN step skipped on the device in between.

Counted on the CPU with the dispatcher (``host_syncs_worker.py`` says what counts as a
read): the same Python code runs on a GPU, where each such read is a synchronisation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from host_syncs_worker import instrument

from baobab.cli import parse_run_config
from baobab.train import build_trainer
from baobab.train.faults import INJECT_ENV

WORKER = Path(__file__).with_name("host_syncs_worker.py")


def args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    # 8 steps, the loss read at steps 4 and 8; step 3's loss is NaN (injected).
    return [
        "--model.name", "gpt-nano", "--data.path", str(corpus), "--data.seq_len", "32",
        "--data.batch_size", "4", "--optim.name", "adamw", "--optim.grad_clip_norm", "1.0",
        "--train.max_steps", "8", "--train.log_every", "4", "--train.progress", "false",
        "--train.run_dir", str(run_dir), "--train.eval_every", "0", "--train.threads", "1",
        *extra,
    ]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def skipped_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if r.get("event") == "skipped_step"]


@pytest.mark.parametrize("implementation", ["auto", "fused"])
def test_a_step_never_reads_the_device_and_a_logging_step_reads_once(
    tiny_corpus, tmp_path, monkeypatch, implementation
):
    """auto is AdamW's for-loop on a CPU (its update masked by the guard's verdict);
    fused takes the verdict as found_inf, like AMP."""
    monkeypatch.setenv(INJECT_ENV, "nan@3")
    run_dir = tmp_path / implementation
    trainer = build_trainer(parse_run_config(args(tiny_corpus, run_dir, "--optim.implementation", implementation)))  # fmt: skip
    counts = instrument(trainer)
    result = trainer.fit()
    assert counts["_train_step"] == [0] * 8, counts
    assert counts["_read"] == [1, 1], counts
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for x in result.losses[3:])
    assert skipped_steps(run_dir) == [3]  # reported at the read of step 4, in order


def test_fsdp_steps_never_read_the_device(tiny_corpus, tmp_path):
    """Two ranks sharding the model (FSDP-2): the loss, batch counts and gradient norm are
    all-reduced on the device, the NaN step is masked on each rank's shard."""
    run_dir = tmp_path / "fsdp"
    out = tmp_path / "reads.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), str(out), *args(tiny_corpus, run_dir, "--parallel.dp_shard", "2")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", INJECT_ENV: "nan@3"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        counts = json.loads(out.with_name(f"reads.rank{rank}.json").read_text())
        assert counts == {"_train_step": [0] * 8, "_read": [1, 1]}, (rank, counts)
    assert skipped_steps(run_dir) == [3]
    # The NaN update was undone on every shard: training went on from finite weights.
    losses = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    assert sorted(losses) == [4, 8] and all(math.isfinite(x) for x in losses.values())
