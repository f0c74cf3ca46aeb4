"""``baobab hf export|import``: baobab -> Hugging Face -> baobab by the command line, and one
sentence with exit 2 for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baobab.checkpoint import save_checkpoint
from baobab.cli import main
from baobab.data import byte_tokenizer
from baobab.export import load_exported, save_exported
from baobab.models import build_model

TINY = dict(vocab_size=byte_tokenizer().vocab_size, n_layer=2, n_head=4, d_model=32,
            ffn_hidden=48, max_seq_len=32)  # fmt: skip
VARIANTS = {
    "llama": dict(n_kv_head=2),
    "gpt2": dict(n_kv_head=4, norm="layernorm", mlp="gelu", position="learned", bias=True),
}


def _model(**variant):
    torch.manual_seed(0)
    model = build_model("gpt", **TINY, **variant)
    with torch.no_grad():  # biases and norms away from their init: every tensor must travel
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _baobab_dir(tmp_path: Path, model, kind: str) -> Path:
    """A baobab checkpoint (``kind="checkpoint"``) or export directory holding ``model``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok = byte_tokenizer().save(tmp_path / "tokenizer.json")
    described = {"name": "gpt", "family": "gpt", "config": dict(vars(model.cfg))}
    if kind == "export":
        return save_exported(model, tmp_path / "export", described, "causal_lm", 7, tok)
    meta = {"model": described, "objective": "causal_lm", "run": {}}
    return save_checkpoint(tmp_path / "run", 7, [model], [], {"step": 7}, meta, tok)


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(("variant", "kind"), [("llama", "checkpoint"), ("gpt2", "export")])
def test_round_trip_through_hugging_face_keeps_the_logits(capsys, tmp_path, variant, kind):
    model = _model(**VARIANTS[variant])
    source = _baobab_dir(tmp_path, model, kind)
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["hf", "export", str(source), "--out", str(hf)]) == 0
    arch = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[variant]
    assert capsys.readouterr().out.strip() == f"wrote {hf} ({arch})"
    assert json.loads((hf / "config.json").read_text())["architectures"] == [arch]
    assert main(["hf", "import", str(hf), "--out", str(back)]) == 0
    assert sorted(p.name for p in back.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded, config = load_exported(back)
    assert (config["objective"], config["dtype"]) == ("causal_lm", "float32")
    assert loaded.cfg == model.cfg
    x = torch.randint(0, TINY["vocab_size"], (2, 32))
    with torch.no_grad():  # renames, transposes and the c_attn split are exact
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert (back / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()


def test_dtype_flag_casts_both_ways(tmp_path):
    source = _baobab_dir(tmp_path, _model(**VARIANTS["gpt2"]), "export")
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["hf", "export", str(source), "--out", str(hf), "--dtype", "bfloat16"]) == 0
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["hf", "import", str(hf), "--out", str(back), "--dtype", "float16"]) == 0
    loaded, config = load_exported(back)
    assert config["dtype"] == "float16"
    assert all(p.dtype == torch.float16 for p in loaded.parameters())


def test_bad_input_is_one_sentence_and_exit_2(capsys, tmp_path):
    missing, out = tmp_path / "missing", tmp_path / "out"
    err = error_of(capsys, ["hf", "import", str(missing), "--out", str(out)])
    assert err == f"error: Hugging Face model directory '{missing}' does not exist."
    err = error_of(capsys, ["hf", "export", str(missing), "--out", str(out)])
    assert err == f"error: model directory '{missing}' does not exist"

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    err = error_of(capsys, ["hf", "import", str(pickled), "--out", str(out)])
    assert "holds only pickled pytorch_model.bin weights" in err

    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"]}')
    err = error_of(capsys, ["hf", "import", str(t5), "--out", str(out)])
    assert "T5ForConditionalGeneration is not supported; supported: LlamaForCausalLM" in err

    # LayerNorm with SwiGLU: a gpt variant neither Llama nor GPT-2 holds.
    mixed = _baobab_dir(tmp_path, _model(norm="layernorm", n_kv_head=4), "export")
    err = error_of(capsys, ["hf", "export", str(mixed), "--out", str(out)])
    assert "has no Hugging Face format" in err and "GPT2LMHeadModel needs mlp='gelu'" in err
    err = error_of(capsys, ["hf", "export", str(mixed), "--out", str(out), "--dtype", "int8"])
    assert "dtype must be one of float32, bfloat16, float16" in err
    assert not out.exists()

    # An existing directory is never overwritten unless asked, and stays as it was.
    assert main(["hf", "export", str(_baobab_dir(tmp_path / "ok", _model(), "export")),
                 "--out", str(tmp_path / "hf")]) == 0  # fmt: skip
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    err = error_of(capsys, ["hf", "import", str(tmp_path / "hf"), "--out", str(out)])
    assert "already exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
