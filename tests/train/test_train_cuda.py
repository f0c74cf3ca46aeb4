"""Training on a CUDA GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs these):
gpt-nano through the CLI's own path in bf16 autocast on the GPU, against the same run in
fp32 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import lm_args

from baobab.cli import parse_run_config
from baobab.train import run

pytestmark = pytest.mark.cuda


def test_bf16_training_on_cuda_follows_the_cpu_run(tiny_corpus, tmp_path):
    steps = ["--train.max_steps", "8"]
    cpu = run(parse_run_config(lm_args(tiny_corpus, tmp_path / "cpu", *steps,
                                       "--train.device", "cpu", "--train.precision", "fp32")))  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    gpu = run(parse_run_config(lm_args(tiny_corpus, tmp_path / "cuda", *steps,
                                       "--train.device", "cuda", "--train.precision", "bf16")))  # fmt: skip
    assert torch.cuda.max_memory_allocated() > 0  # the run's tensors lived on the GPU
    # Same seeded init and batches: the first loss differs by bf16 rounding of the logits
    # only (~0.4% per element, averaged), and the run learns as the fp32 one does.
    assert gpu.losses[0] == pytest.approx(cpu.losses[0], rel=1e-2)
    assert gpu.losses[-1] < gpu.losses[0]
    assert gpu.losses[-1] == pytest.approx(cpu.losses[-1], rel=5e-2)
    assert gpu.checkpoint is not None and gpu.checkpoint.is_dir()
    records = [json.loads(line) for line in (tmp_path / "cuda" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert mfus and all(0 < m <= 1 for m in mfus)  # against the GPU's bf16 peak
