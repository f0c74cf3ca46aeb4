"""GPT: causality, GQA, limits, determinism, meta init, and parity with the HF Llama formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from baobab.models import GPT, build_model, count_params, get_config
from baobab.models.common import apply_rotary, materialize, rope_cos_sin

TINY = dict(
    vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=16
)


def tiny(**overrides) -> GPT:
    return build_model("gpt-nano", **{**TINY, **overrides})


def test_logits_shape_dtype_and_gqa_shapes() -> None:
    torch.manual_seed(0)
    model = tiny()
    attn = model.layers["0"].attention
    assert attn.wq.weight.shape == (32, 32)  # (n_head * head_dim, d_model)
    assert attn.wk.weight.shape == (16, 32)  # (n_kv_head * head_dim, d_model)
    assert attn.wv.weight.shape == (16, 32)
    assert attn.wq.bias is None and attn.wo.bias is None
    logits = model(torch.randint(0, 61, (3, 16)))
    assert logits.shape == (3, 16, 61) and logits.dtype == torch.float32


def test_parameter_names_follow_the_layout() -> None:
    names = set(dict(tiny().named_parameters(remove_duplicate=False)))
    for name in [
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight",
        "layers.1.attention.wq.weight", "layers.1.attention.wk.weight",
        "layers.1.attention.wv.weight", "layers.1.attention.wo.weight",
        "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight",
        "layers.1.feed_forward.w3.weight",
    ]:  # fmt: skip
        assert name in names
    assert not any("rope" in k for k in tiny().state_dict())  # RoPE tables are not persisted


def test_causal() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    idx = torch.randint(0, 61, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 61
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_too_long_sequence_refused() -> None:
    with pytest.raises(ValueError, match="sequence length 17 exceeds GPTConfig.max_seq_len=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_same_seed_same_weights_and_meta_init_matches() -> None:
    torch.manual_seed(3)
    a = tiny()
    torch.manual_seed(3)
    b = tiny()
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, ()))  # what build_model draws without a seed
    meta = materialize(build_model("gpt-nano", device="meta", **TINY), seed, "cpu")
    for other in (b, meta):
        for (name, p), q in zip(a.state_dict().items(), other.state_dict().values()):
            assert torch.equal(p, q), name
    for buf in ("rope_cos", "rope_sin"):
        assert torch.equal(getattr(a, buf), getattr(meta, buf))
    assert meta.output.weight is meta.tok_embeddings.weight  # tie survives to_empty
    assert count_params(meta) == count_params(a)


def test_init_statistics() -> None:
    torch.manual_seed(0)
    model = build_model(
        "gpt-nano", vocab_size=512, d_model=256, n_head=4, n_kv_head=4, ffn_hidden=512
    )
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * model.cfg.n_layer)
    assert model.layers["0"].feed_forward.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))
    untied = build_model("gpt-nano", tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert count_params(untied) == count_params(build_model("gpt-nano")) + 512 * 64


# --- Hugging Face Llama reference, written out from modeling_llama.py -------------------


def hf_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_cos_sin(dim: int, T: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    position_ids = torch.arange(T)[None, :]
    inv_freq_expanded = inv_freq[None, :, None].float().expand(1, -1, 1)
    freqs = (inv_freq_expanded @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[0], emb.sin()[0]


def test_rope_matches_hf_rotate_half() -> None:
    # Hand check: head_dim 4, position 1, theta 100 -> angles (1, 0.1) on the two halves.
    cos, sin = rope_cos_sin(4, 2, 100.0)
    q = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    rq, _ = apply_rotary(q, q, cos, sin)
    c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(0.1), math.sin(0.1)
    expected = torch.tensor([1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2])
    torch.testing.assert_close(rq[0, 0, 1], expected)
    torch.testing.assert_close(rq[0, 0, 0], q[0, 0, 0])  # position 0 is not rotated
    # And against HF's own expression at a realistic size.
    hcos, hsin = hf_cos_sin(64, 50, 500000.0)
    cos, sin = rope_cos_sin(64, 50, 500000.0)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)
    x = torch.randn(2, 3, 50, 64)
    torch.testing.assert_close(apply_rotary(x, x, cos, sin)[0], x * hcos + hf_rotate_half(x) * hsin)


def hf_llama_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """LlamaForCausalLM's forward (eager attention, repeat_kv) on the model's weights."""
    cfg = model.cfg
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    cos, sin = hf_cos_sin(D, T, cfg.rope_theta)

    def rms(x, w):
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    def repeat_kv(x, n_rep):
        b, h, t, d = x.shape
        return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)

    h = model.tok_embeddings.weight[idx]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for layer in model.layers.values():
        a, f = layer.attention, layer.feed_forward
        x = rms(h, layer.attention_norm.weight)
        q = (x @ a.wq.weight.T).view(B, T, H, D).transpose(1, 2)
        k = (x @ a.wk.weight.T).view(B, T, Hkv, D).transpose(1, 2)
        v = (x @ a.wv.weight.T).view(B, T, Hkv, D).transpose(1, 2)
        q, k = q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin
        k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
        w = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(D) + mask, dim=-1)
        h = h + (w @ v).transpose(1, 2).reshape(B, T, H * D) @ a.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        h = h + (F.silu(x @ f.w1.weight.T) * (x @ f.w3.weight.T)) @ f.w2.weight.T
    return rms(h, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_matches_hf_llama_reference(n_kv_head: int) -> None:
    torch.manual_seed(0)
    model = tiny(n_kv_head=n_kv_head, rope_theta=500000.0, tie_embeddings=False).eval()
    idx = torch.randint(0, 61, (2, 16))
    torch.testing.assert_close(model(idx), hf_llama_forward(model, idx), atol=1e-5, rtol=1e-4)


def test_pipeline_style_split_keeps_names_and_runs() -> None:
    torch.manual_seed(0)
    full = tiny().eval()
    idx = torch.randint(0, 61, (1, 8))
    stage0, stage1 = tiny().eval(), tiny().eval()
    stage0.load_state_dict(full.state_dict())
    stage1.load_state_dict(full.state_dict())
    del stage0.layers["1"]
    stage0.norm = stage0.output = None
    del stage1.layers["0"]
    stage1.tok_embeddings = None
    assert "layers.1.attention.wq.weight" in stage1.state_dict()
    torch.testing.assert_close(stage1(stage0(idx)), full(idx))


def test_get_config_carries_lm_fields() -> None:
    cfg = get_config("llama-8b")
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings) == (128256, 8192, False)


def test_sampling_survives_extreme_temperature_and_top_p():
    from baobab.models.sampling import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1e-30).tolist() == [1, 0]
    assert sample_next(logits, top_p=5e-324, generator=generator).tolist() == [1, 0]
