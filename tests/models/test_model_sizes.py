"""Every named size builds on the meta device and reports parameter and FLOP counts."""

import pytest
import torch

from baobab.models import (
    build_model,
    count_params,
    forward_flops,
    get_config,
    model_names,
    training_flops_per_token,
)

# Exact where a reference count exists (torchvision ResNets, the seed MLP).
EXACT = {"mlp": 61, "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
APPROX = {"gpt2-124m": (124e6, 0.03), "llama-8b": (8.03e9, 0.03), "llama-1b": (1.24e9, 0.05)}


@pytest.mark.parametrize("name", model_names())
def test_every_size_builds_on_meta_and_counts(name: str) -> None:
    model = build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    n = count_params(model)
    assert 0 < count_params(model, exclude_embeddings=True) <= n
    if name in EXACT:
        assert n == EXACT[name]
    if name in APPROX:
        target, tol = APPROX[name]
        assert abs(n - target) / target < tol, n
    # Short sequences keep the suite fast; llama-8b at full length is checked below.
    seq_len = min(getattr(model.cfg, "max_seq_len", 1), 32)
    assert forward_flops(name, seq_len=seq_len) > 0
    assert training_flops_per_token(name, seq_len) > 0


def test_small_sizes_stay_small() -> None:
    assert count_params(build_model("gpt-nano", device="meta")) <= 1_000_000
    assert 2e6 <= count_params(build_model("gpt-mini", device="meta")) <= 3e6


def test_llama_8b_flops_match_the_analytic_count() -> None:
    cfg = get_config("llama-8b")
    T = cfg.max_seq_len
    model = build_model(cfg, device="meta")
    matmul_params = (
        count_params(model, exclude_embeddings=True) - (2 * cfg.n_layer + 1) * cfg.d_model
    )
    # 2 FLOPs per weight per token, plus QK^T and AV over the full T x T score matrix.
    expected = 2 * matmul_params * T + 4 * cfg.n_layer * T * T * cfg.d_model
    assert forward_flops(cfg) == expected
    assert training_flops_per_token(cfg) == pytest.approx(3 * expected / T)


def test_non_sequence_models_count_per_sample() -> None:
    # MLP 10 -> 5 -> 1: 2 * (50 + 5) multiply-adds for one sample.
    assert forward_flops("mlp") == 110
    assert forward_flops("mlp", batch=4) == 440
    assert training_flops_per_token("mlp") == 330


def test_recurrent_flops_scale_with_length() -> None:
    assert forward_flops("lstm-tiny", seq_len=10) == 10 * forward_flops("lstm-tiny", seq_len=1)
    # Counted one step at a time, the total still equals a direct count.
    cfg = get_config("lstm-tiny")
    model = build_model(cfg, device="meta").eval()
    with torch.device("meta"), torch.utils.flop_counter.FlopCounterMode(display=False) as c:
        model(torch.zeros(1, 7, dtype=torch.long))
    assert c.get_total_flops() == forward_flops(cfg, seq_len=7)
