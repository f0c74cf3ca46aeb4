"""The training loop: objectives, stopping rules, resume, full-batch GD, bad numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from baobab import data as bdata
from baobab.cli import parse_run_config
from baobab.models import build_model
from baobab.optim import OptimConfig, build_optimizer
from baobab.train import Trainer, TrainerConfig, TrainingError, run


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def lm_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--model.name", "gpt-nano", "--data.kind", "tokens", "--data.path", str(corpus),
        "--data.seq_len", "32", "--data.batch_size", "4", "--optim.name", "adamw", "--optim.lr", "0.003",
        "--schedule.name", "cosine", "--schedule.warmup_steps", "2",
        "--train.run_dir", str(run_dir), "--train.log_every", "1", "--train.progress", "false", *extra,
    ]  # fmt: skip


def test_seed_mlp_recipe_lowers_mse(tmp_path):
    cfg = parse_run_config(
        [
            "--recipe",
            "seed-mlp",
            "--train.run_dir",
            str(tmp_path),
            "--train.max_epochs",
            "15",
            "--train.progress",
            "false",
        ]
    )
    result = run(cfg)
    record = losses(tmp_path)
    assert result.loss < record[min(record)]
    assert result.val["val_loss"] < record[min(record)]


def test_resume_replays_the_same_losses(tiny_corpus, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(parse_run_config(lm_args(tiny_corpus, whole, "--train.max_steps", "12")))
    first = run(
        parse_run_config(
            lm_args(tiny_corpus, split, "--train.max_steps", "12", "--train.save_every", "5")
        )
    )
    assert first.step == 12
    # Drop everything after step 5 and continue from that checkpoint.
    for ckpt in (split / "checkpoints").iterdir():
        if ckpt.name != "step_00000005":
            import shutil

            shutil.rmtree(ckpt)
    (split / "metrics.jsonl").unlink()
    resumed = run(
        parse_run_config(
            lm_args(tiny_corpus, split, "--train.max_steps", "12", "--train.resume", "true")
        )
    )
    expected = losses(whole)
    assert resumed.losses == [expected[s] for s in range(6, 13)]  # bit-identical on CPU


def test_full_batch_gd_is_one_exact_update_per_epoch(tmp_path):
    dataset = bdata.make_regression(n=70, seed=3)
    torch.manual_seed(0)
    model = build_model("mlp")
    reference = build_model("mlp")
    reference.load_state_dict(model.state_dict())
    loader = bdata.DataLoader(
        dataset, batch_size=16, shuffle=True, drop_last=False
    )  # 5 batches, last partial
    cfg = TrainerConfig(run_dir=str(tmp_path), max_epochs=3, progress=False, log_every=1)
    trainer = Trainer(
        model,
        build_optimizer(model, OptimConfig(name="gd", lr=0.1)),
        loader,
        cfg=cfg,
        objective="regression",
        full_batch=True,
    )
    result = trainer.fit()
    assert result.step == 3 and len(result.losses) == 3
    # Reference: plain gradient descent on the mean squared error of all 70 samples.
    x, y = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for expected in result.losses:
        loss = torch.mean((reference(x) - y.reshape(-1, 1)) ** 2)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_target_loss_stops_early(tmp_path):
    cfg = parse_run_config(
        [
            "--recipe",
            "seed-mlp",
            "--train.run_dir",
            str(tmp_path),
            "--train.max_epochs",
            "50",
            "--train.target_loss",
            "1e9",
            "--train.progress",
            "false",
        ]
    )
    assert run(cfg).step == 1


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    args = ["--recipe", "seed-mlp", "--train.run_dir", str(tmp_path), "--train.max_epochs", "50",
            "--train.save_every", "2", "--train.progress", "false", "--optim.lr", "1e6"]  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"non-finite .* at step \d+; stopped, the last good checkpoint is"
    ):
        run(parse_run_config(args))
    from baobab.checkpoint import latest_checkpoint, load_trained_model

    model, _ = load_trained_model(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_existing_run_dir_is_not_overwritten(tiny_corpus, tmp_path):
    run(parse_run_config(lm_args(tiny_corpus, tmp_path, "--train.max_steps", "4")))
    with pytest.raises(ValueError, match="already holds a run; pass --train.resume true"):
        run(parse_run_config(lm_args(tiny_corpus, tmp_path, "--train.max_steps", "4")))


@pytest.mark.parametrize(
    ("model", "objective_args"),
    [("gpt-nano", []), ("lstm-tiny", []), ("bert-tiny", ["--model.overrides.max_seq_len", "64"])],
)
def test_language_model_families_learn(tiny_corpus, tmp_path, model, objective_args):
    args = lm_args(
        tiny_corpus,
        tmp_path,
        "--train.max_steps",
        "30",
        "--train.eval_every",
        "30",
        "--model.name",
        model,
        *objective_args,
    )
    result = run(parse_run_config(args))
    assert result.losses[-1] < result.losses[0] - 0.5
    assert math.isfinite(result.val["val_loss"])
    assert ("val_ppl" in result.val) or ("val_acc" in result.val)


def test_digits_resnet_learns(tmp_path):
    args = ["--recipe", "digits-resnet", "--train.run_dir", str(tmp_path), "--train.max_epochs", "2",
            "--model.overrides.width", "8", "--train.progress", "false", "--train.eval_every", "0"]  # fmt: skip
    result = run(parse_run_config(args))
    assert result.val["val_acc"] > 0.3  # 10 classes: chance is 0.1


def test_npz_arrays_and_image_folder_train(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)).astype(np.float32)
    np.savez(tmp_path / "xy.npz", x=x, y=x @ rng.normal(size=(10, 1)).astype(np.float32))
    args = ["--recipe", "seed-mlp", "--data.kind", "arrays", "--data.path", str(tmp_path / "xy.npz"),
            "--train.max_epochs", "30", "--train.run_dir", str(tmp_path / "arrays"), "--train.progress", "false"]  # fmt: skip
    result = run(parse_run_config(args))
    assert result.losses[-1] < result.losses[0] / 2

    for label, value in (("dark", 40), ("light", 215)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(value, 20, size=(10, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    args = ["--model.name", "resnet18-digits", "--model.overrides.width", "8", "--data.kind", "images",
            "--data.path", str(tmp_path / "images"), "--data.image_size", "8", "--data.batch_size", "8",
            "--data.val_fraction", "0.25", "--optim.lr", "0.01", "--schedule.name", "constant",
            "--train.max_epochs", "6", "--train.run_dir", str(tmp_path / "img"), "--train.progress", "false"]  # fmt: skip
    result = run(parse_run_config(args))
    assert result.losses[-1] < result.losses[0] / 2  # two classes that differ in brightness
    assert 0.0 <= result.val["val_acc"] <= 1.0
