"""The training loop under each kind of layout trains like one process at the same global
batch (CPU, gloo).

Each layout runs ``baobab train`` under torchrun for 20 steps of a tiny GPT; its per-step
losses must equal the single-process run's within 1e-5 (relative) and its final
parameters within ``adam_tolerance`` of tests/numerics.py (1e-5, with an allowance scaled
by the sum of the learning rates for the few elements where Adam amplifies rounding).
Checkpoints saved under one layout resume under another. The workers of most layouts run
with other ATen/oneDNN/MKL kernels than the reference (``KERNELS``), as on another CPU.

The numerics of every layout (DDP, ZeRO-2, HSDP, each pipeline schedule, every hybrid) are
checked by ``tests/parallel/test_parallel_equivalence.py`` against ``parallelize()``
directly. Here each run costs a torchrun launch, so the list holds one layout per path
through the loop: data sharded over dp ranks (FSDP-2, and FSDP-4 in the resharding test),
the same data on every tp rank (TP-2), a pipeline with two stages per rank (interleaved),
and the hybrids of dp with tp and with pp.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import KERNELS, adam_tolerance, assert_losses_close, assert_tensors_close, lr_sum

from baobab.checkpoint import load_trained_model
from baobab.cli import main

GLOBAL_BATCH, STEPS = 8, 20


def base_args(
    corpus: Path, run_dir: Path, batch: int = GLOBAL_BATCH, steps: int = STEPS
) -> list[str]:
    return [
        "--model.name", "gpt-nano", "--model.overrides.tie_embeddings", "false", "--model.overrides.n_layer", "4",
        "--data.path", str(corpus), "--data.seq_len", "32", "--data.batch_size", str(batch),
        "--optim.name", "adamw", "--optim.lr", "0.003", "--optim.weight_decay", "0.1", "--optim.grad_clip_norm", "1.0",
        "--schedule.name", "cosine", "--schedule.warmup_steps", "2", "--train.max_steps", str(steps),
        "--train.log_every", "1", "--train.progress", "false", "--train.run_dir", str(run_dir),
    ]  # fmt: skip


def torchrun(
    nproc: int, args: list[str], timeout: int = 240, kernels: str = "inherited"
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "baobab",
        "train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **KERNELS[kernels]}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


def assert_same_run(run_dir: Path, reference: Path, first_step: int = 1) -> None:
    assert_losses_close(losses(run_dir), losses(reference)[first_step - 1 :])
    model, _ = load_trained_model(run_dir)
    ref_model, _ = load_trained_model(reference)
    tol = adam_tolerance(lr_sum(records(reference)))  # every step's AdamW update, resumed or not
    assert_tensors_close(model.state_dict(), ref_model.state_dict(), tol, "parameters")


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *base_args(tiny_corpus, run_dir)]) == 0
    return run_dir


# name -> (processes, flags, dp degree, the workers' kernels: see tests/numerics.py)
LAYOUTS = {
    "FSDP-2": (2, ["--parallel.dp_shard", "2"], 2, "inherited"),
    "TP-2": (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"], 1, "default"),
    "PP-2-interleaved": (2, ["--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_microbatches", "2"], 1, "avx2"),
    "FSDP-2xTP-2": (4, ["--parallel.dp_shard", "2", "--parallel.tp", "2"], 2, "avx2"),
    "PP-2xFSDP-2": (4, ["--parallel.pp", "2", "--parallel.dp_shard", "2", "--parallel.pp_microbatches", "2"], 2, "default"),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tiny_corpus, tmp_path):
    nproc, flags, dp, kernels = LAYOUTS[layout]
    run_dir = tmp_path / layout
    args = [*base_args(tiny_corpus, run_dir, batch=GLOBAL_BATCH // dp), *flags]
    torchrun(nproc, args, kernels=kernels)
    assert_same_run(run_dir, reference)


def test_resharding_resume(reference, tiny_corpus, tmp_path):
    """10 steps under FSDP-4, then the next 10 under TP-2 and under one process."""
    fsdp = tmp_path / "fsdp4"
    args = [
        *base_args(tiny_corpus, fsdp, batch=GLOBAL_BATCH // 4),
        "--parallel.dp_shard",
        "4",
        "--train.save_every",
        "10",
    ]
    torchrun(4, [*args, "--train.keep_last", "2"], kernels="avx2")
    assert_same_run(fsdp, reference)
    for name in ("tp2", "single"):
        run_dir = tmp_path / name
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(
            fsdp / "checkpoints" / "step_00000010", run_dir / "checkpoints" / "step_00000010"
        )
        args = [*base_args(tiny_corpus, run_dir), "--train.resume", "true"]
        if name == "tp2":
            torchrun(
                2, [*args, "--parallel.tp", "2", "--parallel.dp_shard", "1"], kernels="default"
            )
        else:
            assert main(["train", *args]) == 0
        assert_same_run(run_dir, reference, first_step=11)


def test_bert_tensor_parallel_matches_single_process(tiny_corpus, tmp_path):
    args = [
        "--model.name", "bert-tiny", "--model.overrides.max_seq_len", "64", "--model.overrides.d_model", "64",
        "--model.overrides.ffn_hidden", "128", "--data.path", str(tiny_corpus), "--data.seq_len", "32",
        "--data.batch_size", "8", "--optim.lr", "0.001", "--optim.grad_clip_norm", "1.0",
        "--schedule.warmup_steps", "2", "--train.max_steps", str(STEPS), "--train.log_every", "1",
        "--train.progress", "false",
    ]  # fmt: skip
    single, tp = tmp_path / "single", tmp_path / "tp2"
    assert main(["train", *args, "--train.run_dir", str(single)]) == 0
    tp_args = [*args, "--train.run_dir", str(tp), "--parallel.tp", "2", "--parallel.dp_shard", "1"]
    torchrun(2, tp_args, kernels="default")
    assert_same_run(tp, single)


def test_lora_finetune_under_fsdp_matches_single_process(reference, tiny_corpus, tmp_path):
    """Frozen base weights and trainable adapters sharded together by FSDP2."""
    lora = ["--model.init", str(reference), "--lora.rank", "4", "--lora.targets", "[wq,wv,w2]"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp2"
    assert main(["train", *base_args(tiny_corpus, single, steps=8), *lora]) == 0
    args = base_args(tiny_corpus, fsdp, batch=GLOBAL_BATCH // 2, steps=8)
    torchrun(2, [*args, *lora, "--parallel.dp_shard", "2"], kernels="avx2")
    assert_same_run(fsdp, single)


def test_bf16_parameters_with_fp32_master_weights(reference, tiny_corpus, tmp_path):
    """FSDP2 mixed precision: bf16 compute, fp32 master weights and gradient reduction."""
    run_dir = tmp_path / "bf16"
    args = base_args(tiny_corpus, run_dir, batch=GLOBAL_BATCH // 2)
    torchrun(2, [*args, "--parallel.dp_shard", "2", "--train.precision", "bf16-params"])
    got, want = torch.tensor(losses(run_dir)), torch.tensor(losses(reference))
    assert not torch.equal(got, want)  # bf16 compute really ran
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    model, _ = load_trained_model(run_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights
