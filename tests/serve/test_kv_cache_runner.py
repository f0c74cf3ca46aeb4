"""KV cache sizing and the model runner: cached logits equal the full forward, and a
request's logits are bit-for-bit the same whatever else is in the batch."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from engine_helpers import (
    GPT2,
    LLAMA,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
)

from baobab.export.quantize import quantize_model
from baobab.models import get_config
from baobab.models.common.rope import rotation_sin
from baobab.serve.kv_cache import KVCache, num_blocks_for, token_bytes
from baobab.serve.runner import (
    ComposedGELU,
    ComposedSiLU,
    ModelRunner,
    PackedLinear,
    SeqInput,
    _FusedPart,
)

VARIANTS = {"llama": LLAMA, "gpt2": GPT2}


def test_blocks_are_what_the_budget_buys():
    cfg = get_config("gpt-nano", max_seq_len=128)
    per_token = token_bytes(cfg, torch.float32)
    assert per_token == 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 4
    assert num_blocks_for(cfg, torch.float32, 1000 * per_token, block_size=16) == 62
    with pytest.raises(ValueError, match="kv_cache_memory_gib is too small"):
        num_blocks_for(cfg, torch.float32, 127 * per_token, block_size=16)
    cache = KVCache(cfg, 8, 16, torch.float32, "cpu")
    assert cache.k[0].shape == (cfg.n_kv_head, 129, cfg.head_dim)  # + the scratch position
    assert cache.nbytes == 129 * per_token


def runner_for(model, pack: bool = True, chunk: int = 8) -> ModelRunner:
    return ModelRunner(model, num_blocks=40, block_size=16, prefill_chunk_size=chunk,
                       pack_weights=pack)  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pack", [True, False])
def test_chunked_prefill_and_decode_match_the_full_forward(variant, pack):
    model = random_gpt(scale=0.05, **VARIANTS[variant])
    ids = torch.randint(0, 259, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)[0]  # (T, V)
    runner = runner_for(model, pack)
    tokens = ids[0].tolist()
    got = [
        runner.execute([SeqInput(96, 0, tokens[:13], True)], all_logits=True),  # 8 + 5
        runner.execute([SeqInput(96, 13, tokens[13:30], True)], all_logits=True),  # 3 + 8 + 6
    ]
    for t in range(30, 40):  # decode one token at a time
        got.append(runner.execute([SeqInput(96, t, [tokens[t]], True)]))
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [True, False])
def test_linear_rows_do_not_depend_on_the_batch(threads, packed):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    module, multiple = (PackedLinear(linear), 1) if packed else (linear, 4)
    x = torch.randn(64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            alone = module(torch.cat([x[None], torch.randn(multiple - 1, 64)]))[0]
            torch.testing.assert_close(alone, linear(x), rtol=0, atol=1e-5)
            for m in (2, 3, 5, 8, 13, 64, 100):
                m = -(-m // multiple) * multiple
                for row in (0, m // 2, m - 1):
                    batch = torch.randn(m, 64)
                    batch[row] = x
                    assert torch.equal(module(batch)[row], alone), (m, row)
    finally:
        torch.set_num_threads(before)


def _alone_and_batched(runner: ModelRunner, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one request decoded alone, then again among random batch mates."""
    rng = random.Random(seed)
    tokens = [rng.randrange(259) for _ in range(60)]
    prompt = 27
    alone = [runner.execute([SeqInput(0, 0, tokens[:prompt], True)])]
    alone += [runner.execute([SeqInput(0, t, [tokens[t]], True)]) for t in range(prompt, 60)]
    # Batched: same chunk rule (multiples of 8), elsewhere in the cache, prefill over
    # several steps, among batch mates at other positions (cache bases 100, 300, 400).
    spans = [(0, 8), (8, 24), (24, 27)] + [(t, t + 1) for t in range(27, 60)]
    mates = {base: [rng.randrange(259) for _ in range(100)] for base in (100, 300, 400)}
    done = dict.fromkeys(mates, 0)
    batched = []
    for a, b in spans:
        seqs = []
        for slot, ids in mates.items():
            n = rng.choice([0, 1, 1, 2, 5, 9])
            if n and done[slot] + n <= len(ids):
                seqs.append(SeqInput(slot, done[slot], ids[done[slot] : done[slot] + n], n < 3))
                done[slot] += n
        at = rng.randrange(len(seqs) + 1)
        seqs.insert(at, SeqInput(200, a, tokens[a:b], b >= prompt))
        out = runner.execute(seqs)
        if b >= prompt:
            row = sum(s.sample for s in seqs[:at])
            batched.append(out[row : row + 1])
    return torch.cat(alone), torch.cat(batched)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pack", [True, False])
def test_logits_are_bitwise_independent_of_batch_mates(variant, pack):
    # Block linears big enough to be packed (the head, 259 x 512, is not).
    model = random_gpt(**VARIANTS[variant], d_model=512, n_head=8, n_kv_head=8, ffn_hidden=512)
    runner = runner_for(model, pack)
    assert (runner.row_multiple, runner.head_multiple) == ((1, 4) if pack else (4, 4))
    alone, batched = _alone_and_batched(runner)
    assert torch.equal(alone, batched)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linears_run_unchanged_and_stay_batch_invariant(bits):
    model = random_gpt(scale=0.05)
    ids = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(2))
    quantize_model(model, bits=bits)
    with torch.no_grad():
        expected = model(ids)[0]
    runner = runner_for(copy.deepcopy(model))
    assert runner.row_multiple == 1  # torch's fused int8/int4 kernels: rows not padded
    # int8's per-channel weights stack: wq/wk/wv run as one kernel call (int4 stays apart)
    assert isinstance(runner.model.layers["0"].attention.wq, _FusedPart) == (bits == 8)
    got = runner.execute([SeqInput(16, 0, ids[0].tolist(), True)], all_logits=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    alone, batched = _alone_and_batched(runner)
    assert torch.equal(alone, batched)


def test_reused_cache_positions_hold_only_the_new_request():
    model = random_gpt(scale=0.05)
    runner = runner_for(model)
    runner.execute([SeqInput(0, 0, list(range(30)), True)])  # a first request at 0..29
    ids = [5, 6, 7, 8]
    got = runner.execute([SeqInput(0, 0, ids, True)], all_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(got, model(torch.tensor([ids]))[0], rtol=0, atol=1e-5)


def test_runner_refuses_positions_past_the_context_and_non_gpt_models():
    runner = runner_for(random_gpt(max_seq_len=16))
    with pytest.raises(ValueError, match="past the model's context of 16 tokens"):
        runner.execute([SeqInput(0, 10, list(range(7)), True)])
    with pytest.raises(ValueError, match="serves gpt models"):
        ModelRunner(torch.nn.Linear(2, 2), 1, 16, 8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_swapped_modules_compute_the_model_feed_forward_and_attention(variant):
    """The runner's swaps (fused linears, composed activations, no dropout) leave each
    block computing what the model's own modules compute."""
    model = random_gpt(**VARIANTS[variant])
    block = copy.deepcopy(model.layers["0"])
    h = torch.randn(1, 3, model.cfg.d_model)
    cos, sin = model.rope_cos[None, None, :3], rotation_sin(model.rope_sin[None, None, :3])
    with torch.no_grad():
        expected = block.feed_forward(h), block.attention(h, cos, sin)
    runner = runner_for(model, pack=False)
    swapped = runner.model.layers["0"]
    act = ComposedSiLU if variant == "llama" else ComposedGELU
    assert isinstance(swapped.feed_forward.act, act)
    assert isinstance(swapped.attention.wk, _FusedPart)
    assert not any(isinstance(m, torch.nn.Dropout) for m in runner.model.modules())
    with torch.inference_mode():
        got = swapped.feed_forward(h), swapped.attention(h, cos, sin)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gathered", ["all", "up-to-64-keys", "none"])
def test_batched_decode_attention_is_bitwise_independent_of_batch_mates(threads, gathered):
    """Decodes share one attention computation per key bucket, or attend on their own past
    ``gather_max_bytes`` (runner docstring): a request's logits are the same bits alone and
    among 0-15 decoding mates of any lengths, across a bucket boundary (64 -> 128 keys),
    with grouped-query attention, at 1 and 2 threads."""
    torch.set_num_threads(threads)  # the autouse fixture restores the count
    model = random_gpt(**LLAMA, n_head=4, n_kv_head=2)
    row_bytes = 2 * model.cfg.n_kv_head * model.cfg.head_dim * 4
    limit = {"all": 2**30, "up-to-64-keys": 64 * row_bytes, "none": 0}[gathered]
    runner = ModelRunner(model, num_blocks=140, block_size=16, prefill_chunk_size=8,
                         pack_weights=False, gather_max_bytes=limit)  # fmt: skip
    assert runner.gather_max_keys == {"all": 2**30 // row_bytes, "up-to-64-keys": 64,
                                      "none": 0}[gathered]  # fmt: skip
    rng = random.Random(threads)
    tokens = [rng.randrange(259) for _ in range(72)]
    prefill = [SeqInput(0, a, tokens[a : a + 8], False) for a in range(0, 56, 8)]
    for seq in prefill:
        runner.execute([seq])
    alone = [runner.execute([SeqInput(0, t, [tokens[t]], True)]) for t in range(56, 72)]
    for seq in prefill:  # the same keys again, then decode among mates
        runner.execute([seq])
    for t, expected in zip(range(56, 72), alone):
        mates = [SeqInput(128 * (j + 1), rng.randrange(100), [rng.randrange(259)], True)
                 for j in range(rng.randrange(16))]  # fmt: skip
        at = rng.randrange(len(mates) + 1)
        out = runner.execute([*mates[:at], SeqInput(0, t, [tokens[t]], True), *mates[at:]])
        assert torch.equal(out[at : at + 1], expected), (t, len(mates), at)
