"""Checkpoints are complete or absent; pruning and resolution; mismatches are refused."""

from __future__ import annotations

import pytest
import torch

from baobab.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_state,
    load_weights,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from baobab.models import build_model


def save(run_dir, step, model, keep_last=3):
    state = {
        "step": step,
        "optimizer": {"state": {}, "param_groups": []},
        "rng": {"torch": torch.get_rng_state()},
    }
    return save_checkpoint(
        run_dir, step, model, state, {"model": {"name": "gpt-nano"}}, keep_last=keep_last
    )


def test_keep_last_and_latest(tmp_path):
    model = build_model("gpt-nano")
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_checkpoint(tmp_path) == latest_checkpoint(tmp_path)
    assert read_meta(tmp_path)["step"] == 4
    assert load_state(tmp_path)["step"] == 4


def test_a_crashed_save_is_ignored_and_swept(tmp_path):
    model = build_model("gpt-nano")
    good = save(tmp_path, 5, model)
    crashed = tmp_path / "checkpoints" / ".tmp-step_00000006-999"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    half = tmp_path / "checkpoints" / "step_00000007"  # no meta.json: never completed
    half.mkdir()
    assert latest_checkpoint(tmp_path) == good
    save(tmp_path, 8, model)
    assert not crashed.exists()


def test_weights_round_trip_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    model = build_model("gpt-nano")
    save(tmp_path, 1, model)
    torch.manual_seed(1)
    other = build_model("gpt-nano")
    load_weights(tmp_path, other)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert other.output.weight.data_ptr() == other.tok_embeddings.weight.data_ptr()


def test_mismatched_model_is_refused(tmp_path):
    save(tmp_path, 1, build_model("gpt-nano"))
    with pytest.raises(ValueError, match="does not match the model"):
        load_weights(tmp_path, build_model("gpt-nano", d_model=32))
    with pytest.raises(ValueError, match="does not match the model"):
        load_weights(tmp_path, build_model("gpt-nano", n_layer=3))


def test_resolve_refuses_a_plain_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint nor a run directory"):
        resolve_checkpoint(tmp_path)
