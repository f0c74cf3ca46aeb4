"""GGUF export: read back with llama.cpp's ``gguf`` package, rebuilt, logits equal to baobab's.

The file's tensors, shapes, types and metadata are checked against llama.cpp's conventions
as the ``gguf`` package itself names them; a baobab gpt rebuilt from the file's tensors
(q/k un-permuted, q8_0 dequantized by the same package) is compared with the original.
Tolerances (``TOLERANCE``, max |logit difference| with max |logit| about 2 at these
shapes): f32 1e-5, f16 2e-3, q8_0 5e-2.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import pytest
import torch

from baobab import cli
from baobab.data.tokenizer import EOT, Tokenizer, train_bpe
from baobab.export import save_exported
from baobab.export.gguf import GGUF_FILE, MODELFILE, OLLAMA_DEFAULT_TEMPLATE, model_from_gguf
from baobab.models import build_model, get_config
from baobab.serve.chat import DEFAULT_TEMPLATE, TEMPLATE_FILE, ChatTemplate

# In-dims 64 and 96 are multiples of q8_0's block of 32; vocab 304 > the tokenizer's ids.
TINY = dict(
    vocab_size=304, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=96, max_seq_len=64,
    rope_theta=50000.0, norm_eps=1e-6,
)  # fmt: skip
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 5e-2}
Q = gguf.GGMLQuantizationType
TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "hello world, hello gguf! " * 20]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(TEXT, 300)


def _export(tmp_path, tokenizer, name="exp", **overrides):
    torch.manual_seed(0)
    cfg = get_config("gpt", **{**TINY, **overrides})
    model = build_model(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that every tensor is checked
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok_file = tokenizer.save(tmp_path / "tokenizer.json")
    described = {"name": "gpt", "family": "gpt", "config": dataclasses.asdict(cfg)}
    return save_exported(model, tmp_path / name, described, "causal_lm", None, tok_file), model


def _cli(source, out, *flags: str) -> int:
    """``baobab export --checkpoint SOURCE --out OUT FLAGS``'s exit status."""
    return cli.main(["export", "--checkpoint", str(source), "--out", str(out), *flags])


def _field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("gguf_type, tie", [("f32", False), ("f16", True), ("q8_0", False)])
def test_gguf_reads_back_with_llama_cpp_names_and_logits(tmp_path, tokenizer, gguf_type, tie):
    export, model = _export(tmp_path, tokenizer, tie_embeddings=tie)
    out = tmp_path / "g"
    assert _cli(export, out, "--format", "gguf", "--gguf-type", gguf_type) == 0
    reader = gguf.GGUFReader(out / GGUF_FILE)
    cfg = model.cfg

    names = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | (set() if tie else {"output.weight"})
    for i in range(cfg.n_layer):
        expected |= {
            f"blk.{i}.{k}.weight"
            for k in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        }
    assert set(names) == expected
    kv = cfg.n_kv_head * cfg.head_dim
    assert names["token_embd.weight"].shape.tolist() == [64, 304]  # (in, out): innermost first
    assert names["blk.0.attn_k.weight"].shape.tolist() == [64, kv]
    assert names["blk.1.ffn_down.weight"].shape.tolist() == [96, 64]
    assert names["output_norm.weight"].shape.tolist() == [64]
    matrix = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[gguf_type]
    for name, t in names.items():
        assert t.tensor_type == (Q.F32 if name.endswith("norm.weight") else matrix), name

    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[gguf_type]
    assert _field(reader, "llama.context_length") == 64
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.feed_forward_length") == 96
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.rope.freq_base") == 50000.0
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == 304 and tokens[303] == "[PAD303]"
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eot_id] == gguf.TokenType.CONTROL and types[303] == gguf.TokenType.UNUSED
    assert types[vocab["h"]] == gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(merges) > 0
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.eot_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eot_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == DEFAULT_TEMPLATE

    x = torch.randint(0, 304, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model_from_gguf(out / GGUF_FILE, cfg)(x) - model(x)).abs().max().item()
    print(
        f"max |logit diff| {gguf_type}: {diff:.3g} of max |logit| {model(x).abs().max().item():.3g}"
    )
    assert diff <= TOLERANCE[gguf_type], diff


def test_ollama_writes_a_modelfile_beside_the_gguf(tmp_path, tokenizer):
    export, _ = _export(tmp_path, tokenizer)
    out = tmp_path / "o"
    assert _cli(export, out, "--format", "ollama", "--gguf-type", "q8_0") == 0
    assert sorted(p.name for p in out.iterdir()) == [MODELFILE, GGUF_FILE]
    text = (out / MODELFILE).read_text()
    assert text.splitlines()[0] == "FROM ./model.gguf"
    assert f'TEMPLATE """{OLLAMA_DEFAULT_TEMPLATE}"""' in text
    assert f'PARAMETER stop "{EOT}"' in text and "PARAMETER num_ctx 64" in text
    # The Go template, expanded for one conversation (range over the messages, then the
    # rest), gives the text baobab's default Jinja template renders.
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]
    head, rest = OLLAMA_DEFAULT_TEMPLATE.split("{{ range .Messages }}")
    body, tail = rest.split("{{ end }}")
    go = head + "".join(
        body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
        for m in messages
    )
    assert ChatTemplate().render(messages) == go + tail
    # An existing GGUF directory is replaced only with --overwrite true.
    assert _cli(export, out, "--format", "gguf") == 2
    assert _cli(export, out, "--format", "gguf", "--overwrite", "true") == 0
    assert sorted(p.name for p in out.iterdir()) == [GGUF_FILE]


def test_gguf_refuses_non_llama_models_and_writes_nothing(tmp_path, tokenizer, capsys):
    gpt2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True)
    export, _ = _export(tmp_path, tokenizer, "gpt2", **gpt2)
    assert _cli(export, tmp_path / "g", "--format", "gguf") == 2
    assert "GGUF export writes Llama-style gpt models" in capsys.readouterr().err
    custom, _ = _export(tmp_path, tokenizer, "custom")
    (custom / TEMPLATE_FILE).write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert _cli(custom, tmp_path / "o", "--format", "ollama") == 2
    assert "Go template" in capsys.readouterr().err
    for bad in (["--gguf-type", "q4_0"], ["--format", "onnx"], ["--dtype", "float16"]):
        args = ["--format", "gguf", *bad] if bad[0] != "--format" else bad
        assert _cli(custom, tmp_path / "o", *args) == 2
        assert capsys.readouterr().err.count("error: ") == 1
    assert not (tmp_path / "g").exists() and not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".tmp-*"))
