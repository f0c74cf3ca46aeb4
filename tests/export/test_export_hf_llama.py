"""Hugging Face Llama bridge: baobab gpt -> LlamaForCausalLM and back, logits within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from baobab.data import byte_tokenizer  # noqa: E402
from baobab.export.hf_export import export_hf  # noqa: E402
from baobab.export.hf_import import import_hf  # noqa: E402
from baobab.models import build_model  # noqa: E402

TINY = dict(vocab_size=300, n_layer=2, n_head=4, d_model=32, ffn_hidden=48, max_seq_len=32)


def _perturbed(model):
    with torch.no_grad():  # biases/norms away from their init so every tensor is checked
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "tie, n_kv_head, theta", [(True, 2, 10000.0), (False, 1, 500000.0), (True, 4, 10000.0)]
)
def test_export_matches_transformers_logits(tmp_path, tie, n_kv_head, theta):
    torch.manual_seed(0)
    model = _perturbed(
        build_model("gpt", **TINY, n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=theta)
    )
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie and config["num_key_value_heads"] == n_kv_head
    assert (out / "generation_config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-4)


def test_llama_import_matches_transformers_logits(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    model, meta = import_hf(tmp_path / "llama")
    assert meta["architecture"] == "LlamaForCausalLM" and meta["missing"] == []
    assert (
        meta["model"]["config"]["n_kv_head"] == 2 and not meta["model"]["config"]["tie_embeddings"]
    )
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


def test_export_writes_a_tokenizer_transformers_loads(tmp_path):
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = build_model("gpt", **{**TINY, "vocab_size": tok.vocab_size})
    out = export_hf(model, tmp_path / "hf", tokenizer_file=tok, dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    assert config["torch_dtype"] == "bfloat16"
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = "Hello, wörld!\n  tabs\tand spaces"
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eot_id and hf_tok.pad_token_id == tok.pad_id
    assert hf_tok.decode(tok.encode(text)) == text


def test_export_refuses_to_overwrite_and_mixed_variants(tmp_path):
    model = build_model("gpt", **TINY)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_hf(model, tmp_path / "hf", overwrite=True)  # not an export: never replaced
    assert (tmp_path / "hf" / "keep.txt").is_file()
    (tmp_path / "hf" / "keep.txt").unlink()
    export_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="already holds an export; pass --overwrite true"):
        export_hf(model, tmp_path / "hf")
    export_hf(model, tmp_path / "hf", overwrite=True)  # a Hugging Face directory is an export
    mixed = build_model("gpt", **TINY, norm="layernorm", position="learned", bias=True)
    with pytest.raises(ValueError) as info:  # LayerNorm with SwiGLU: neither Llama nor GPT-2
        export_hf(mixed, tmp_path / "other")
    assert str(info.value) == (
        "export_hf has no Hugging Face format for a gpt with norm='layernorm', position='learned', "
        "bias=True, mlp='swiglu', n_kv_head=2: LlamaForCausalLM needs norm='rmsnorm', "
        "position='rope', bias=False and GPT2LMHeadModel needs mlp='gelu', n_kv_head=4."
    )
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="needs a baobab 'gpt' model; got Bert"):
        export_hf(build_model("bert-tiny"), tmp_path / "other")


def test_import_refuses_unsupported_architectures_and_pickles(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(
        '{"architectures": ["T5ForConditionalGeneration"]}'
    )
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is not supported; supported: "
                       "LlamaForCausalLM, GPT2LMHeadModel"):  # fmt: skip
        import_hf(tmp_path / "t5")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="convert them to safetensors"):
        import_hf(tmp_path / "bin")
