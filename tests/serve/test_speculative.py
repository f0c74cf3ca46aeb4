"""Speculative decoding: n-gram and draft-model proposals verified in one target forward;
greedy output is the same as without, sampled output keeps the target's distribution."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from engine_helpers import (
    LLAMA,
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
    scripted_gpt,
    tokens_of,
)
from prometheus_client import generate_latest
from scipy.stats import chisquare

from baobab.serve import EngineConfig, SamplingParams, load_served_model
from baobab.serve.metrics import ServerMetrics
from baobab.serve.speculative import NgramProposer, accept


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match():
    propose = NgramProposer(1, 3).propose
    assert propose([5, 6, 7, 8, 9, 5, 6, 7], 2) == [8, 9]  # the 3-gram 5 6 7
    assert propose([1, 2, 9, 2, 8, 2], 3) == [8, 2]  # latest 1-gram match; what is left
    assert propose([1, 2, 3], 2) == []
    # ids whose bytes match across a token boundary are not a match: 256 = 00 01 00 00
    assert propose([256, 0, 7, 1], 1) == []
    assert propose([1, 4, 1], 1) == [4]


def test_greedy_acceptance_keeps_the_agreeing_prefix_then_the_target_token():
    logits = torch.eye(5)[[1, 2, 4, 3]]  # argmaxes 1, 2, 4, 3
    greedy = SamplingParams(temperature=0)
    assert accept(logits, [1, 2, 3], None, greedy, None) == [1, 2, 4]
    assert accept(logits, [1, 2, 4], None, greedy, None) == [1, 2, 4, 3]
    assert accept(logits, [0], None, greedy, None) == [1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tiny = {"vocab_size": 8, "n_layer": 1, **LLAMA}
    return {
        "target": export_gpt(root / "target", random_gpt(seed=1, **LLAMA)),
        "draft": export_gpt(root / "draft", random_gpt(seed=2, n_layer=1, **LLAMA)),
        "tiny": export_gpt(root / "tiny", random_gpt(seed=3, scale=0.15, **tiny)),
        "tiny-draft": export_gpt(root / "tiny-draft", random_gpt(seed=4, scale=0.15, **tiny)),
        "short": export_gpt(root / "short", random_gpt(seed=2, max_seq_len=64, **LLAMA)),
        # position p predicts 7 + p % 6: a model that continues the cycles of CYCLES
        "cycle": export_gpt(root / "cycle", scripted_gpt([7 + p % 6 for p in range(128)])),
    }


def engine(export, **options):
    config = {"kv_cache_memory_gib": 0.01, "max_num_batched_tokens": 32, "prefill_chunk_size": 8,
              "separate_process": False, **options}  # fmt: skip
    return load_served_model(export, EngineConfig(**config)).engine


def serve(e, prompts, **params):
    for i, ids in enumerate(prompts):
        e.add_request(str(i), ids, SamplingParams(**{"ignore_eos": True, **params}))
    return run_to_completion(e)


CYCLES = [[7, 8, 9, 10, 11, 12] * 4, [7, 8, 9, 10, 11], [7, 8, 9] + [50, 51, 52] * 5]
RANDOM = [[7, 8, 9, 10, 11, 12] * 4, [40, 41] * 9 + [40], list(range(60, 90))]


@pytest.mark.parametrize(
    "target, prompts, how",
    [("cycle", CYCLES, {"speculative": "ngram"}), ("target", RANDOM, {"draft": "draft"}),
     ("target", RANDOM, {"draft": "target"})],
)  # fmt: skip
def test_greedy_output_is_the_same_as_without_speculation(exports, target, prompts, how):
    options = {k: str(exports[v]) if k == "draft" else v for k, v in how.items()}
    plain = serve(engine(exports[target]), prompts, max_tokens=20, temperature=0)
    e = engine(exports[target], num_speculative_tokens=3, **options)
    fast = serve(e, prompts, max_tokens=20, temperature=0)
    assert {r: tokens_of(o) for r, o in fast.items()} == {r: tokens_of(o) for r, o in plain.items()}
    assert {r: "".join(x.text for x in o) for r, o in fast.items()} == {
        r: "".join(x.text for x in o) for r, o in plain.items()
    }
    spec = e.stats().spec
    assert spec.drafts > 0  # an unrelated random draft is rarely right; the others often
    assert spec.accepted_tokens > 0 or how == {"draft": "draft"}
    if how == {"draft": "target"}:  # its own draft: every proposal is kept
        assert spec.acceptance_rate == 1.0 and spec.tokens_per_step > 3  # k = 3, less at the end


def joint(model, prompt: list[int], temperature: float) -> np.ndarray:
    """p(t1, t2 | prompt) of ``model`` sampled at ``temperature``: (V, V)."""
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, -1)
        rows = [torch.softmax(model(torch.tensor([prompt + [t]]))[0, -1] / temperature, -1)
                for t in range(first.numel())]  # fmt: skip
    return (first[:, None] * torch.stack(rows)).double().numpy()


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``probs``, cells expecting under 5 pooled."""
    expected = probs.ravel() * counts.sum()
    small = expected < 5
    observed = np.append(counts.ravel()[~small], counts.ravel()[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return float(chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)


def test_sampled_output_keeps_the_target_distribution(exports):
    from baobab.export import load_exported

    prompt, temperature, n = [1, 2, 3], 1.5, 2400
    e = engine(exports["tiny"], draft=str(exports["tiny-draft"]), num_speculative_tokens=1)
    outputs = {}
    for start in range(0, n, 300):  # within max_num_seqs + max_queue (64 + 256)
        for i in range(start, start + 300):
            params = SamplingParams(max_tokens=3, temperature=temperature, seed=i)
            e.add_request(str(i), prompt, params)
        outputs |= run_to_completion(e)
    counts = np.zeros((8, 8))
    for out in outputs.values():
        t1, t2 = tokens_of(out)[:2]  # t2 is the verified step's: a kept proposal or not
        counts[t1, t2] += 1
    spec = e.stats().spec
    assert spec.drafts == n and spec.acceptance_rate < 0.8  # the draft really differs
    target = joint(load_exported(exports["tiny"])[0], prompt, temperature)
    draft = joint(load_exported(exports["tiny-draft"])[0], prompt, temperature)
    assert chi_square_p(counts, target) > 1e-3
    assert chi_square_p(counts, draft) < 1e-6  # the test tells the two apart


def test_a_draft_that_does_not_match_the_target_is_refused(exports, tmp_path):
    with pytest.raises(ValueError, match="vocabulary .*vocab_size 8.* differs"):
        engine(exports["target"], draft=str(exports["tiny"]))
    with pytest.raises(ValueError, match="context length .*max_seq_len 64.* differs"):
        engine(exports["target"], draft=str(exports["short"]))
    other = tmp_path / "other"
    shutil.copytree(exports["draft"], other)
    (other / "tokenizer.json").write_text(
        (other / "tokenizer.json").read_text().replace("<|", "<|x")
    )
    with pytest.raises(ValueError, match="tokenizer differs"):
        engine(exports["target"], draft=str(other))
    with pytest.raises(ValueError, match="leave speculative 'off'"):
        EngineConfig(speculative="ngram", draft=str(other))


def test_metrics_report_acceptance_and_tokens_per_step(exports):
    e = engine(exports["cycle"], speculative="ngram", num_speculative_tokens=3)
    serve(e, CYCLES, max_tokens=20, temperature=0)
    metrics = ServerMetrics(lambda: ("m", e.stats()))
    text = generate_latest(metrics.registry).decode()
    spec = e.stats().spec
    assert (
        f'baobab_spec_decode_accepted_tokens_total{{model="m"}} {float(spec.accepted_tokens)}'
        in text
    )
    assert f'baobab_spec_decode_acceptance_ratio{{model="m"}} {spec.acceptance_rate}' in text
    assert 1 < spec.tokens_per_step <= 4
