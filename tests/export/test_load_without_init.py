"""Every loader builds the model on meta and assigns the stored tensors: no random init is
drawn and then overwritten (the issue's "never a random init that is then overwritten").

Observed with a dispatch mode that records every random ATen op while a loader runs, then
the loaded tensors are compared with the saved ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from baobab.checkpoint import load_trained_model, save_checkpoint
from baobab.export import load_exported, save_exported
from baobab.export.hf_export import export_hf
from baobab.export.hf_import import import_hf
from baobab.export.quantize import load_quantized, quantize_export
from baobab.models import build_model

TINY = {"n_layer": 1, "max_seq_len": 32}
DESCRIBED = {"name": "gpt-nano", "family": "gpt", "config": TINY}
RANDOM_OPS = {"normal", "normal_", "uniform", "uniform_", "bernoulli", "bernoulli_", "random_",
              "exponential_", "rand", "randn", "randint", "randperm", "multinomial"}  # fmt: skip


class RandomOps(TorchDispatchMode):
    """Records the name of every random op on real tensors dispatched while active (a
    meta-device module's constructor dispatches its init ops on meta, drawing nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        on_meta = any(isinstance(a, torch.Tensor) and a.is_meta for a in args)
        if func.overloadpacket.__name__ in RANDOM_OPS and not on_meta:  # meta draws nothing
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _load(loader, *args, **kwargs):
    with RandomOps() as seen:
        model, *_ = loader(*args, **kwargs)
    assert seen.calls == [], f"{loader.__name__} drew random numbers: {sorted(set(seen.calls))}"
    return model


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noinit") / "export"
    save_exported(build_model("gpt-nano", seed=1, **TINY), out, DESCRIBED, "causal_lm")
    return out


def test_load_exported_assigns_exactly_the_saved_tensors(export_dir: Path) -> None:
    model = _load(load_exported, export_dir)
    saved = load_file(export_dir / "model.safetensors")
    state = model.state_dict()
    assert saved.keys() <= state.keys() and len(saved) == len(state) - 1  # the tied head
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert model.output.weight is model.tok_embeddings.weight  # the tie survives assign
    assert torch.equal(model.rope_cos, build_model("gpt-nano", seed=0, **TINY).rope_cos)


def test_quantized_hf_and_checkpoint_loaders_draw_no_random_numbers(
    export_dir: Path, tmp_path: Path
) -> None:
    reference = load_exported(export_dir)[0]
    _load(load_quantized, quantize_export(export_dir, tmp_path / "int8", bits=8))
    export_hf(reference, tmp_path / "hf")
    imported = _load(import_hf, tmp_path / "hf")
    x = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(imported(x), reference(x), rtol=0, atol=1e-5)
    save_checkpoint(tmp_path / "run", 1, [reference], [], {"step": 1}, {"model": DESCRIBED})
    restored = _load(load_trained_model, tmp_path / "run")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
