"""Weight-only int8/int4 quantization: error bounds, logits, save/load, sizes, perplexity."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from baobab.export import export_checkpoint, load_exported
from baobab.export import quantize as q
from baobab.export.quant_report import format_report, quantization_report
from baobab.models import build_model


@pytest.fixture(scope="module")
def corpus(tiny_corpus) -> Path:
    """The shared byte-level corpus of standard-library modules (tests/conftest.py)."""
    return tiny_corpus


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """gpt-nano trained 60 steps on the byte corpus, exported as fp32."""
    from baobab.cli import main

    root = tmp_path_factory.mktemp("quant")
    threads = torch.get_num_threads()  # one thread: a shared, busy CPU stalls OpenMP barriers
    code = main(
        ["train", "--model.name", "gpt-nano", "--data.path", str(corpus), "--data.seq_len", "64",
         "--data.batch_size", "8", "--train.max_steps", "60", "--optim.lr", "3e-3",
         "--train.eval_batches", "2", "--train.log_every", "60", "--schedule.warmup_steps", "5",
         "--train.run_dir", str(root / "run"), "--train.progress", "false", "--train.threads", "1"]
    )  # fmt: skip
    torch.set_num_threads(threads)
    assert code == 0
    return export_checkpoint(root / "run", root / "fp32")


def _weight(out: int, inp: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, 3] = 0.7  # an outlier in one row / group
    return w


def test_int8_per_channel_error_is_at_most_half_a_step():
    lin = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_weight(40, 96))
    m = q.Int8WeightOnlyLinear.from_linear(lin)
    assert m.weight.dtype == torch.int8 and m.scales.shape == (40,)
    assert m.bias.dtype == torch.float32
    err = (m.dequantize() - lin.weight).abs()  # (out, in)
    assert (err <= m.scales[:, None] / 2 * (1 + 1e-5)).all()
    # forward (torch's fused kernel, bf16 activations): tests/export/test_quant_fused.py


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_group_wise_error_is_at_most_half_a_step(group_size, symmetric):
    lin = nn.Linear(256, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_weight(24, 256))
    m = q.Int4WeightOnlyLinear.from_linear(lin, group_size, symmetric)
    groups = 256 // group_size
    assert m.weight.dtype == torch.uint8 and m.weight.shape == (24, 128)  # two per byte
    assert m.scales.shape == (24, groups)
    assert (m.zeros is None) == symmetric
    err = (m.dequantize() - lin.weight).abs().view(24, groups, group_size)
    assert (err <= m.scales[..., None] / 2 * (1 + 1e-5) + 1e-7).all()
    values = q.unpack_int4(m.weight)
    assert values.max() <= 15
    assert torch.equal(q.unpack_int4(values[:, 0::2] | (values[:, 1::2] << 4)), values)


def test_quantized_logits_stay_close_and_the_head_stays_tied():
    torch.manual_seed(0)
    model = build_model("gpt-nano").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        ref = model(x).flatten()
        for bits, bound in ((8, 0.999), (4, 0.99)):
            qm = q.quantize_model(copy.deepcopy(model), bits)
            assert type(qm.output) is nn.Linear and qm.output.weight is qm.tok_embeddings.weight
            assert not any(type(m) is nn.Linear for n, m in qm.named_modules() if n != "output")
            cos = nn.functional.cosine_similarity(qm(x).flatten(), ref, dim=0)
            assert cos > bound, (bits, float(cos))


def test_save_load_round_trip_is_bit_identical_and_does_not_requantize(
    trained, tmp_path, monkeypatch
):
    x = torch.randint(0, 256, (2, 24))
    for bits in (8, 4):
        out = q.quantize_export(trained, tmp_path / f"int{bits}", bits)
        assert sorted(p.name for p in out.iterdir()) == [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        ]
        config = json.loads((out / "config.json").read_text())
        expected_group = 64 if bits == 4 else None
        assert config["quantization"] == {
            "bits": bits,
            "group_size": expected_group,
            "skip": ["output", "lm_head"],
            "symmetric": bits == 8,
        }
        fp32, _ = load_exported(trained)
        expected = q.quantize_model(fp32, bits)
        with monkeypatch.context() as patch:

            def refuse(*args, **kwargs):
                raise AssertionError("load_quantized quantized again")

            patch.setattr(q, "quantize_int8", refuse)
            patch.setattr(q, "quantize_int4", refuse)
            loaded, loaded_config = q.load_quantized(out)
        assert loaded_config == config and not loaded.training
        assert loaded.output.weight is loaded.tok_embeddings.weight
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="is not a quantized export; load it with load_exported"):
        q.load_quantized(trained)
    with pytest.raises(ValueError, match="is already quantized; quantize the unquantized export"):
        q.quantize_export(tmp_path / "int8", tmp_path / "again", 4)
    assert not (tmp_path / "again").exists()


def test_the_head_can_be_quantized_too(trained, tmp_path):
    out = q.quantize_export(trained, tmp_path / "int8-head", 8, skip=())
    loaded, config = q.load_quantized(out)
    assert config["quantization"]["skip"] == []
    assert type(loaded.output) is q.Int8WeightOnlyLinear
    assert loaded.tok_embeddings.weight.dtype == torch.float32  # lookups stay exact
    expected = q.quantize_model(load_exported(trained)[0], 8, skip=())
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)


def _linear_bytes(path: Path) -> int:
    """Bytes of the swapped linears' tensors (everything but embeddings, norms, head)."""
    total = 0
    with safe_open(path / "model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118
            if ".attention.w" in key or ".feed_forward.w" in key:
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def test_file_sizes(trained, tmp_path):
    fp32 = _linear_bytes(trained)
    n = fp32 // 4  # weights of the swapped linears
    int8 = _linear_bytes(q.quantize_export(trained, tmp_path / "i8", 8))
    int4 = _linear_bytes(q.quantize_export(trained, tmp_path / "i4", 4, group_size=64))
    int4s = _linear_bytes(q.quantize_export(trained, tmp_path / "i4s", 4, symmetric=True))
    # gpt-nano: d_model 64, ffn 192, 2 layers; 4-byte scales per output row (int8) or group.
    rows = 2 * (64 + 32 + 32 + 64 + 192 + 64 + 192)
    assert int8 == n + 4 * rows and int8 / fp32 < 0.27  # 1/4 plus scales
    assert int4 == n // 2 + 2 * 4 * (n // 64) and int4 / fp32 <= 0.16  # 1/8 + scales, zeros
    assert int4s == n // 2 + 4 * (n // 64) and int4s / fp32 <= 0.141
    sizes = [(p / "model.safetensors").stat().st_size for p in (trained, tmp_path / "i8")]
    assert sizes[1] < sizes[0]


def test_perplexity_within_targets(trained, corpus, tmp_path):
    dirs = [q.quantize_export(trained, tmp_path / f"int{b}", b) for b in (8, 4)]
    rows = quantization_report(trained, dirs, corpus, seq_len=64, batches=6, measure_memory=False)
    assert [r["bits"] for r in rows] == [None, 8, 4]
    fp32, int8, int4 = rows
    assert fp32["val_ppl"] < 40  # trained: far below the 256-way uniform guess
    assert abs(int8["ppl_change_pct"]) < 2, rows
    assert abs(int4["ppl_change_pct"]) < 10, rows
    assert int8["file_bytes"] < fp32["file_bytes"] and int4["file_bytes"] < int8["file_bytes"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    print(format_report(rows))
    assert "int8" in format_report(rows)


def test_bad_settings_are_one_sentence(trained, tmp_path):
    model = build_model("gpt-nano", n_layer=1)
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 3"):
        q.quantize_model(model, 3)
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128, got 48"):
        q.quantize_model(model, 4, group_size=48)
    with pytest.raises(ValueError, match="in_features 96 is not divisible by group_size 64"):
        q.Int4WeightOnlyLinear(96, 8, group_size=64)
    odd = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 8))
    with pytest.raises(ValueError, match="layer '1' has in_features 96, which is not divisible"):
        q.quantize_model(odd, 4, group_size=64)
    assert all(type(m) is nn.Linear for m in odd)  # validated before anything was swapped
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 2"):
        q.quantize_export(trained, tmp_path / "bad", 2)
    assert not (tmp_path / "bad").exists()
