"""The engine over exported tiny gpts: greedy parity with ``generate``, batch independence,
seeds, stop strings and ids, length, logprobs, UTF-8 streaming, abort."""

from __future__ import annotations

import os
import random

import pytest
import torch
from engine_helpers import (
    GPT2,
    LLAMA,
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
    scripted_gpt,
    text_of,
    tokens_of,
)

from baobab.export import load_exported
from baobab.models.sampling import generate
from baobab.serve import (
    EngineConfig,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    load_served_model,
)
from baobab.serve.config import ALL_CORES_MIN_WEIGHT_BYTES

PROMPT = b"abcd"  # the scripted model's prompt: its output starts at position 3
SCRIPT_TEXT = "hi 漢字🌳 naïve <END> after"
EOT = 256


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("engine")
    script = [ord(".")] * (len(PROMPT) - 1) + list(SCRIPT_TEXT.encode()) + [EOT]
    return {
        "llama": export_gpt(root / "llama", random_gpt(seed=1, **LLAMA)),
        "gpt2": export_gpt(root / "gpt2", random_gpt(seed=2, **GPT2)),
        "script": export_gpt(root / "script", scripted_gpt(script)),
    }


def engine_for(export, **options):
    options = {"kv_cache_memory_gib": 0.02, "max_num_batched_tokens": 32,
               "prefill_chunk_size": 8, "separate_process": False, **options}  # fmt: skip
    return load_served_model(export, EngineConfig(**options)).engine


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def serve_all(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    return run_to_completion(engine)


def one_at_a_time(engine, requests) -> dict[str, list]:
    return {rid: serve_all(engine, {rid: req})[rid] for rid, req in requests.items()}


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_greedy_equals_generate(exports, variant):
    engine = engine_for(exports[variant])
    model, _ = load_exported(exports[variant])
    for i, ids in enumerate(prompts(3, seed=7)):
        out = serve_all(engine, {str(i): (ids, greedy())})[str(i)]
        assert tokens_of(out) == generate(model, ids, 24, temperature=0)
        assert out[-1].finish_reason == "length" and out[-1].completion_tokens == 24
        assert [o.finished for o in out] == [False] * 23 + [True]


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_concurrent_greedy_equals_one_at_a_time(exports, variant):
    requests = {str(i): (ids, greedy(max_tokens=8 + i % 9, logprobs=2))
                for i, ids in enumerate(prompts(16, seed=3))}  # fmt: skip
    alone = one_at_a_time(engine_for(exports[variant]), requests)
    together = serve_all(engine_for(exports[variant], max_num_seqs=16), requests)
    for rid in requests:
        assert tokens_of(together[rid]) == tokens_of(alone[rid])
        assert [o.logprobs for o in together[rid]] == [o.logprobs for o in alone[rid]]


def test_seed_gives_the_same_text_whatever_the_batch(exports):
    engine = engine_for(exports["llama"], max_num_seqs=8)
    ids = prompts(1, seed=11)[0]

    def params(seed):
        return SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.95,
                              seed=seed, ignore_eos=True)  # fmt: skip

    alone = tokens_of(serve_all(engine, {"x": (ids, params(5))})["x"])
    mates = {f"m{i}": (p, params(None)) for i, p in enumerate(prompts(5, seed=12))}
    crowd = serve_all(engine, {**mates, "x": (ids, params(5)), "y": (ids, params(6))})
    assert tokens_of(crowd["x"]) == alone
    assert tokens_of(crowd["y"]) != alone


def test_prompt_ids_must_be_tokens_but_sampling_covers_the_model_vocabulary(tmp_path):
    export = export_gpt(tmp_path, random_gpt(seed=3, vocab_size=320))  # tokenizer: 259 ids
    engine = engine_for(export)
    with pytest.raises(ValueError, match=r"outside the vocabulary \(ids 0..258\)"):
        engine.add_request("a", [1, 300], greedy())
    hot = SamplingParams(max_tokens=60, temperature=5.0, seed=0, ignore_eos=True)
    out = serve_all(engine, {"b": ([1, 2, 3], hot)})["b"]
    assert max(tokens_of(out)) >= 259  # as Hugging Face would; such ids decode to ""
    assert "".join(o.text for o in out) == engine.tokenizer.decode(tokens_of(out), True)


def test_multibyte_text_streams_whole_characters(exports):
    engine = engine_for(exports["script"])
    out = serve_all(engine, {"a": (list(PROMPT), SamplingParams(max_tokens=60, temperature=0))})
    out = out["a"]
    assert text_of(out) == SCRIPT_TEXT  # the script ends with <|endoftext|>
    assert out[-1].finish_reason == "stop" and out[-1].token_ids == [EOT]
    assert all("\ufffd" not in o.text for o in out)
    assert len(tokens_of(out)) == len(SCRIPT_TEXT.encode()) + 1
    texts = [o.text for o in out]
    tree = texts.index("🌳")
    assert texts[tree - 3 : tree] == ["", "", ""]  # 4 bytes, one character


def test_stop_strings_end_the_text_before_them(exports):
    engine = engine_for(exports["script"])
    params = SamplingParams(max_tokens=60, temperature=0, stop=["<END>", "zzz"])
    out = serve_all(engine, {"a": (list(PROMPT), params)})["a"]
    assert text_of(out) == "hi 漢字🌳 naïve "
    assert out[-1].finish_reason == "stop"
    assert tokens_of(out) == list("hi 漢字🌳 naïve <END>".encode())  # up to the last byte of it


def test_stop_token_ids_and_eos(exports):
    engine = engine_for(exports["script"])
    space = ord(" ")
    out = serve_all(engine, {"a": (list(PROMPT), SamplingParams(temperature=0, max_tokens=60,
                                                                stop_token_ids=[space]))})["a"]  # fmt: skip
    assert text_of(out) == "hi" and out[-1].token_ids == [space]
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens == 3
    ignore = SamplingParams(
        temperature=0, max_tokens=len(SCRIPT_TEXT.encode()) + 3, ignore_eos=True
    )
    out = serve_all(engine, {"b": (list(PROMPT), ignore)})["b"]
    assert EOT in tokens_of(out) and out[-1].finish_reason == "length"
    assert text_of(out) == SCRIPT_TEXT + ".."  # special tokens are not shown


def test_max_tokens_gives_length(exports):
    engine = engine_for(exports["script"])
    out = serve_all(engine, {"a": (list(PROMPT), SamplingParams(temperature=0, max_tokens=4))})
    # cut inside 漢: the ended request shows its last, incomplete bytes as U+FFFD
    assert text_of(out["a"]) == "hi \ufffd" and out["a"][-1].finish_reason == "length"
    assert [o.completion_tokens for o in out["a"]] == [1, 2, 3, 4]
    assert all(o.prompt_tokens == len(PROMPT) for o in out["a"])


def test_logprobs_are_log_softmax_of_the_raw_logits(exports):
    engine = engine_for(exports["llama"])
    model, _ = load_exported(exports["llama"])
    ids = prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=3, temperature=0.7, seed=1, logprobs=5, ignore_eos=True)
    out = serve_all(engine, {"a": (ids, params)})["a"]
    context = list(ids)
    for o in out:
        (lp,) = o.logprobs
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([context]))[0, -1], -1)
        assert lp.token_id == o.token_ids[0]
        assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=1e-4)
        top = sorted(lp.top.values(), reverse=True)
        assert top[0] == pytest.approx(expected.max().item(), abs=1e-4) and len(top) <= 5
        context.append(lp.token_id)


def test_full_vocabulary_logprobs_sum_to_one():
    from baobab.serve.sampler import top_logprobs

    logits = torch.randn(3, 259)
    for lp, _ in top_logprobs(logits, [0, 5, 7], [259, 259, 0]):
        assert lp <= 0
    (_, top), *_ = top_logprobs(logits, [0], [259])
    assert len(top) == 259 and sum(torch.tensor([v for _, v in top]).exp()) == pytest.approx(1)


def test_abort_frees_the_cache_at_once(exports):
    engine = engine_for(exports["llama"], max_num_seqs=2)
    for rid in ("a", "b", "c"):
        engine.add_request(rid, [1, 2, 3], greedy(max_tokens=50))  # 53 tokens: 4 blocks
    engine.step()
    assert engine.stats().kv_cache_blocks_used == 8 and engine.stats().waiting == 1
    final = engine.abort("a")
    assert final.finished and final.finish_reason == "abort" and final.completion_tokens == 1
    assert engine.stats().kv_cache_blocks_used == 4
    engine.step()  # the freed blocks go to the waiting request
    assert engine.stats().kv_cache_blocks_used == 8 and engine.stats().waiting == 0
    assert engine.abort("a") is None
    for rid in ("b", "c"):
        engine.abort(rid)
    assert engine.stats().kv_cache_usage == 0 and not engine.has_unfinished()


def test_bad_requests_are_refused_with_one_sentence(exports):
    engine = engine_for(exports["llama"], max_queue=1, max_num_seqs=1)
    with pytest.raises(PromptTooLongError, match="maximum context length is 128 tokens"):
        engine.add_request("a", [1] * 100, greedy(max_tokens=29))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("a", [], greedy())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [1, -1], greedy())
    engine.add_request("a", [1], greedy())
    engine.add_request("b", [1], greedy())  # one slot + one queue place
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request("c", [1], greedy())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefill_chunk_size": 512}, "prefill_chunk_size must be at most max_num_batched_tokens"),
        ({"block_size": 0}, "EngineConfig.block_size must be a positive number"),
        ({"max_num_seqs": 2.5}, "EngineConfig.max_num_seqs must be a positive integer"),
        ({"dtype": "int8"}, "EngineConfig.dtype must be one of"),
        ({"threads": -1}, "EngineConfig.threads must be 0"),
    ],
)
def test_engine_config_refuses_bad_values_with_one_sentence(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_automatic_threads_leave_a_core_to_http_only_for_small_models():
    cores = len(os.sched_getaffinity(0))
    auto = EngineConfig()
    assert auto.num_threads(weight_bytes=10 * 2**20) == max(1, cores - 1)
    assert auto.num_threads(weight_bytes=ALL_CORES_MIN_WEIGHT_BYTES) == cores
    assert EngineConfig(threads=3).num_threads(weight_bytes=2**40) == 3


def test_a_cache_smaller_than_one_full_context_is_refused(exports):
    with pytest.raises(ValueError, match="kv_cache_memory_gib is too small"):
        engine_for(exports["llama"], kv_cache_memory_gib=0.00001)
