"""trainer_state round-trips exactly through JSON + safetensors, with no pickle."""

from __future__ import annotations

import json
import math

import pytest
import torch

from baobab.checkpoint import load_trainer_state, save_trainer_state


def test_values_types_and_tensors_round_trip(tmp_path):
    state = {
        "step": 7,
        "scheduler": {"base_lrs": [0.003, 0.1], "_last_lr": [0.0029999999999999996, 1e-300]},
        "none": None,
        "flag": False,
        "betas": (0.9, 0.999),
        "by_id": {0: {"x": 1}, 3: "y"},
        "tag_lookalike": {"__tensor__": "not a tensor"},
        "specials": [math.inf, -math.inf],
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": [torch.arange(5, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)],
        },
        "scalar": torch.tensor(3, dtype=torch.int64),
        "half": torch.randn(2, 3).to(torch.bfloat16),
    }
    shared = torch.arange(4.0)
    state["views"] = [shared, shared[1:]]  # shared memory is stored as separate tensors
    save_trainer_state(state, tmp_path)
    json.loads((tmp_path / "trainer_state.json").read_text())  # strict JSON (no NaN tokens)
    loaded = load_trainer_state(tmp_path)

    tensors = lambda s: [s["rng"]["torch"], *s["rng"]["cuda"], s["scalar"], s["half"], *s["views"]]  # noqa: E731
    for a, b in zip(tensors(state), tensors(loaded)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    plain = {k: v for k, v in state.items() if k not in ("rng", "scalar", "half", "views")}
    assert {k: loaded[k] for k in plain} == plain
    assert type(loaded["betas"]) is tuple and list(loaded["by_id"]) == [0, 3]


def test_nan_round_trips(tmp_path):
    save_trainer_state({"loss": math.nan}, tmp_path)
    assert math.isnan(load_trainer_state(tmp_path)["loss"])


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"trainer_state\.data\.rank has type object"):
        save_trainer_state({"data": {"rank": object()}}, tmp_path)
