"""Periodic evaluation covers a fixed sample spread over the whole validation split.

The defect (issue 13, item 8): train.eval_batches took the first batches of the split, so a
split whose first samples are easy reported a validation loss far below the truth.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from baobab import data as bdata
from baobab.cli import parse_run_config
from baobab.commands import evaluate as evaluate_command
from baobab.data.sampler import spread_sample
from baobab.models import build_model
from baobab.optim import OptimConfig, build_optimizer
from baobab.train import Trainer, TrainerConfig, run
from baobab.train.evaluate import evaluate
from baobab.train.objectives import Regression


class RecordingDataset(bdata.ArrayDataset):
    """An in-memory dataset that remembers which samples each batch read."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__(x, y)
        self.reads: list[np.ndarray] = []

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append(np.asarray(indices).copy())
        return super().get_batch(indices)


def val_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_loss" in r]


def test_periodic_eval_uses_the_same_spread_sample(tmp_path):
    n, batch, eval_batches = 64, 4, 2  # a sample of 8 samples of 64
    count = batch * eval_batches
    x = np.random.default_rng(0).standard_normal((n, 10)).astype(np.float32)
    # Easy first samples, hard later ones: the first 2 batches would all score near 0.
    y = np.where(np.arange(n) < 16, 0.0, 10.0).astype(np.float32)[:, None]  # (n, 1)
    val = RecordingDataset(x, y)
    torch.manual_seed(0)
    model = build_model("mlp")
    cfg = TrainerConfig(
        run_dir=str(tmp_path), max_steps=4, eval_every=2, eval_batches=eval_batches,
        seed=3, progress=False, log_every=1,
    )  # fmt: skip
    trainer = Trainer(
        model, build_optimizer(model, OptimConfig(name="sgd", lr=0.01)),
        bdata.DataLoader(bdata.make_regression(n=32, seed=1), batch), cfg=cfg,
        objective="regression", val_loader=bdata.DataLoader(val, batch, shuffle=False, drop_last=False),
    )  # fmt: skip
    trainer.fit()

    # One sample from each eighth of the split: spread over all of it, not its head.
    sample = np.concatenate(val.reads[:eval_batches])
    strata = np.arange(count) * n // count
    assert np.all((sample >= strata) & (sample < strata + n // count)), sample.tolist()
    # Evaluations at steps 0, 2 and 4, each reading eval_batches batches: the same ones.
    assert len(val.reads) == 3 * eval_batches
    evaluations = [np.concatenate(val.reads[i : i + eval_batches]) for i in range(0, 6, 2)]
    assert all(np.array_equal(e, sample) for e in evaluations), "the sample changed"

    records = val_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(r["val_samples"] == count for r in records)
    # The last evaluation is the MSE of the final model over exactly that sample.
    with torch.no_grad():
        out = model(torch.from_numpy(x[sample]))
    want = float(torch.mean((out - torch.from_numpy(y[sample])) ** 2))
    assert records[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    assert want > 20  # mostly hard samples; the first 8 alone score under 1
    # The same sample at every call, from the seed alone; another seed draws another one.
    assert np.array_equal(spread_sample(n, count, seed=3), sample)
    assert not np.array_equal(spread_sample(n, count, seed=4), sample)

    # eval_batches 0: the whole split, in order.
    val.reads.clear()
    loader = bdata.DataLoader(val, batch, shuffle=False, drop_last=False)
    whole = evaluate(model, loader, Regression(), torch.device("cpu"), max_batches=0)
    assert np.array_equal(np.concatenate(val.reads), np.arange(n))
    assert whole["val_samples"] == n


def test_lm_eval_reports_tokens_and_eval_reproduces_it(tiny_corpus, tmp_path):
    seq_len, batch, eval_batches = 32, 4, 2
    cfg = parse_run_config([
        "--model.name", "gpt-nano", "--data.kind", "tokens", "--data.path", str(tiny_corpus),
        "--data.seq_len", str(seq_len), "--data.batch_size", str(batch),
        "--train.max_steps", "2", "--train.eval_every", "1", "--train.eval_batches", str(eval_batches),
        "--train.run_dir", str(tmp_path), "--train.progress", "false",
    ])  # fmt: skip
    result = run(cfg)
    records = val_records(tmp_path)
    tokens = eval_batches * batch * seq_len
    assert [r.get("val_tokens") for r in records] == [tokens] * 3
    assert result.val["val_tokens"] == tokens
    # `baobab eval --batches 2` draws the run's sample again from the checkpoint.
    again = evaluate_command(str(tmp_path), batches=eval_batches)
    assert again["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-6)
    assert again["val_tokens"] == tokens
