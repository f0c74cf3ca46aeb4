"""Export: consolidated safetensors + config.json that rebuild the model exactly, atomically."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from baobab.checkpoint import save_checkpoint
from baobab.export import export_checkpoint, load_exported
from baobab.models import build_model

META = {
    "model": {"name": "gpt-nano", "family": "gpt", "config": {"n_layer": 1}},
    "objective": "causal_lm",
    "run": {"ignored": True},
}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("gpt-nano", n_layer=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: the weights must really load
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"fake": true}')
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "run", 4, [model], [opt], {"step": 4}, META, tok)
    return ckpt, model.eval()


def test_round_trip_gives_identical_logits(checkpoint, tmp_path):
    ckpt, model = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"name": "gpt-nano", "family": "gpt", "config": {"n_layer": 1}}
    assert (config["objective"], config["step"], config["dtype"]) == ("causal_lm", 4, "float32")
    assert "baobab_version" in config
    loaded, loaded_config = load_exported(out)
    assert loaded_config == config and not loaded.training
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:  # the tied matrix is stored once
        assert sum(k in ("tok_embeddings.weight", "output.weight") for k in f.keys()) == 1  # noqa: SIM118


def test_dtype_cast(checkpoint, tmp_path):
    ckpt, model = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "bf16", dtype="bfloat16")
    loaded, config = load_exported(out)
    assert config["dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    torch.testing.assert_close(
        loaded.tok_embeddings.weight, model.tok_embeddings.weight.to(torch.bfloat16), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        export_checkpoint(ckpt, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_refuses_to_overwrite_unless_told(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an export .* even --overwrite true does not"):
        export_checkpoint(ckpt, out, overwrite=True)  # only an export is ever replaced
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_checkpoint(ckpt, empty)  # an empty directory is fine
    with pytest.raises(ValueError, match="already holds an export; pass --overwrite true"):
        export_checkpoint(ckpt, empty)
    export_checkpoint(ckpt, empty, overwrite=True)
    assert (empty / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_missing_export_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not an exported model: it has no config.json"):
        load_exported(tmp_path)


def test_loading_an_export_needs_no_distributed_checkpoint(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    out = export_checkpoint(ckpt, tmp_path / "export")
    code = (
        "import sys; from baobab.export import load_exported; "
        f"load_exported({str(out)!r}); "
        "assert 'torch.distributed.checkpoint' not in sys.modules, 'DCP was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
