"""Hugging Face GPT-2 export and import, BERT import: same logits as transformers within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from baobab.data import byte_tokenizer  # noqa: E402
from baobab.export.hf_export import export_hf  # noqa: E402
from baobab.export.hf_import import import_hf, read_safetensors  # noqa: E402
from baobab.models import build_model  # noqa: E402

GPT2_VARIANT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True)


def _perturbed(model):
    with torch.no_grad():  # biases and norms away from their init so every tensor is checked
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_import_matches_transformers_logits(tmp_path, tie):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100, n_positions=40, n_embd=32, n_layer=2, n_head=4,
        tie_word_embeddings=tie,
    )  # fmt: skip
    hf = _perturbed(transformers.GPT2LMHeadModel(cfg))
    hf.save_pretrained(tmp_path / "gpt2")
    model, meta = import_hf(tmp_path / "gpt2")
    config = meta["model"]["config"]
    assert (config["position"], config["norm"], config["mlp"], config["bias"]) == (
        "learned", "layernorm", "gelu", True,
    )  # fmt: skip
    assert config["tie_embeddings"] is tie and meta["missing"] == []
    assert (model.output.weight is model.tok_embeddings.weight) is tie
    x = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_variant_exports_as_gpt2_transformers_loads(tmp_path, tie):
    torch.manual_seed(5)
    tok = byte_tokenizer()
    model = _perturbed(
        build_model("gpt", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=4, d_model=32,
                    ffn_hidden=80, max_seq_len=40, norm_eps=1e-6, tie_embeddings=tie, **GPT2_VARIANT)
    )  # fmt: skip
    out = export_hf(model, tmp_path / "hf", tokenizer_file=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_embd"], config["n_layer"], config["n_head"]) == (32, 2, 4)
    assert (config["n_positions"], config["n_inner"], config["layer_norm_epsilon"]) == (
        40,
        80,
        1e-6,
    )
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is tie
    assert config["eos_token_id"] == tok.eot_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eot_id
    stored = read_safetensors(out)
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, 3 out)
    assert ("lm_head.weight" in stored) is not tie
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("héllo\tworld") == tok.encode("héllo\tworld")


def test_gpt2_import_then_export_gives_back_the_same_tensors(tmp_path):
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    _perturbed(transformers.GPT2LMHeadModel(cfg)).save_pretrained(tmp_path / "gpt2")
    model, _ = import_hf(tmp_path / "gpt2")
    export_hf(model, tmp_path / "again")
    original, again = read_safetensors(tmp_path / "gpt2"), read_safetensors(tmp_path / "again")
    assert set(again) == set(original)
    for name, tensor in original.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)


def test_sharded_safetensors_load(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    hf = _perturbed(transformers.GPT2LMHeadModel(cfg))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _ = import_hf(tmp_path / "sharded")
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)


def _bert_config():
    return transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
    )  # fmt: skip


def test_bert_mlm_import_matches_transformers_logits(tmp_path):
    torch.manual_seed(3)
    hf = _perturbed(transformers.BertForMaskedLM(_bert_config()))
    hf.save_pretrained(tmp_path / "bert")
    model, meta = import_hf(tmp_path / "bert")
    assert meta["model"]["family"] == "bert" and meta["missing"] == []
    x = torch.randint(0, 120, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 6:] = 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-4)
        ours = model(x, attention_mask=mask, token_type_ids=types)
        theirs = hf(x, attention_mask=mask, token_type_ids=types).logits
        # Padded positions' own logits are meaningless; compare the kept ones.
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=0, atol=1e-4)


def test_bert_model_weights_load_the_encoder(tmp_path):
    torch.manual_seed(4)
    hf = _perturbed(transformers.BertModel(_bert_config(), add_pooling_layer=True))
    hf.save_pretrained(tmp_path / "bert-base")
    model, meta = import_hf(tmp_path / "bert-base")
    assert meta["architecture"] == "BertModel"
    assert all(k.startswith("mlm_head.") for k in meta["missing"]) and meta["missing"]
    assert any("pooler" in k for k in meta["ignored"])
    torch.testing.assert_close(
        model.layers["1"].feed_forward.w2.weight, hf.encoder.layer[1].output.dense.weight
    )
