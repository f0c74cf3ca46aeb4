"""generate decodes with a KV cache and gives the tokens of the recompute it replaced: the
model re-run over the last max_seq_len tokens for every new token (greedy and seeded
sampling, inside the window and past it, where the window slides and is prefilled again);
the contiguous cache's chunked prefill equals the full forward."""

from __future__ import annotations

import pytest
import torch

from baobab.models import build_model
from baobab.models.common.attention import ContiguousKVCache
from baobab.models.sampling import generate, sample_next

TINY = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48,
            max_seq_len=16, tie_embeddings=False)  # fmt: skip
GPT2 = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_kv_head=4)
VARIANTS = {"llama": {}, "gpt2": GPT2}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards: threads only add scheduling noise on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(variant: str):
    torch.manual_seed(0)
    model = build_model("gpt-nano", **{**TINY, **VARIANTS[variant]}).eval()
    with torch.no_grad():  # twice the init's weights: confident predictions, few near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(2.0)
    return model


@torch.no_grad()
def recompute(model, ids, n, temperature=0.0, top_p=1.0, seed=0) -> list[int]:
    """The generate this module replaced: the whole window again for every token."""
    generator = torch.Generator().manual_seed(seed)
    context = list(ids)
    for _ in range(n):
        window = torch.tensor([context[-model.cfg.max_seq_len :]])
        token = sample_next(model(window)[:, -1], temperature, 0, top_p, generator)
        context.append(int(token))
    return context[len(ids) :]


def forward_lengths(model) -> list[int]:
    """Records how many tokens each forward of ``model`` runs."""
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_equal_the_recompute_inside_and_past_the_window(variant):
    model = tiny(variant)
    prompt = [3, 14, 15, 9, 26, 5]
    expected = recompute(model, prompt, 30)  # 6 + 30 tokens: 20 past max_seq_len = 16
    assert len(set(expected)) > 8  # not one repeated token: the comparison means something
    lengths = forward_lengths(model)
    assert generate(model, prompt, 30, temperature=0, max_context=16) == expected
    # The prompt once, then one token a step while the context fits; then the window of
    # 16 again each step (its positions moved). The recompute ran 6, 7, ..., 16, 16, ...
    assert lengths == [6] + [1] * 10 + [16] * 19
    long_prompt = list(range(1, 21))  # longer than the window from the start
    assert generate(model, long_prompt, 5, temperature=0) == recompute(model, long_prompt, 5)


def test_seeded_sampling_equals_the_recompute():
    model = tiny("llama")
    prompt = [7, 1, 8]
    for seed in (0, 1):
        got = generate(model, prompt, 24, temperature=0.9, top_p=0.95, seed=seed)
        assert got == recompute(model, prompt, 24, temperature=0.9, top_p=0.95, seed=seed)


def test_stop_ids_end_generation_and_an_empty_prompt_is_refused():
    model = tiny("llama")
    full = generate(model, [3, 4], 10, temperature=0)
    stop = full[4]
    assert generate(model, [3, 4], 10, temperature=0, stop_ids=(stop,)) == full[: full.index(stop)]
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(model, [], 3)


def test_chunked_prefill_through_the_cache_equals_the_full_forward():
    model = tiny("llama")
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids)
        cache = ContiguousKVCache(model.cfg.n_layer, 16)
        got = []
        for a, b in [(0, 5), (5, 6), (6, 13), (13, 16)]:  # chunks of 5, 1, 7 and 3 tokens
            cache.start = a
            got.append(model(ids[:, a:b], torch.arange(a, b)[None], attend=cache))
    torch.testing.assert_close(torch.cat(got, 1), expected, rtol=0, atol=1e-5)
    small = ContiguousKVCache(model.cfg.n_layer, 8)
    small.start = 7
    with pytest.raises(ValueError, match="do not fit a KV cache of 8 positions"):
        model(ids[:, :2], torch.arange(7, 9)[None], attend=small)
