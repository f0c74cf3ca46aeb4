"""Prompt logprobs: ``echo`` + ``logprobs`` (+ ``max_tokens: 0``) on /v1/completions, in
the engine (each prompt token scored as its chunk is prefilled, nothing changed for the
batch mates) and over HTTP (OpenAI's legacy shape), and lm-evaluation-harness scoring a
multiple-choice task through ``local-completions`` as the model itself does."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch
from engine_helpers import (
    LLAMA,
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
    tokens_of,
)

from baobab.export import load_exported
from baobab.serve import EngineConfig, SamplingParams, load_served_model

TOL = 1e-4  # chunked paged attention vs one full forward: float rounding only


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one full forward over ``ids``: row i scores token i + 1 (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


# ---------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return export_gpt(tmp_path_factory.mktemp("prompt_lp"), random_gpt(seed=1, **LLAMA))


def engine_for(export):
    config = EngineConfig(kv_cache_memory_gib=0.02, max_num_batched_tokens=32,
                          prefill_chunk_size=8, separate_process=False)  # fmt: skip
    return load_served_model(export, config).engine


def test_prompt_logprobs_are_the_log_softmax_of_a_full_forward(llama):
    engine = engine_for(llama)
    ids = [(37 * i + 11) % 256 for i in range(30)]  # 4 prefill chunks of 8
    engine.add_request("a", ids, SamplingParams(max_tokens=0, prompt_logprobs=4))
    (out,) = run_to_completion(engine)["a"]
    assert out.finished and out.finish_reason == "length" and out.token_ids == []
    assert (out.prompt_tokens, out.completion_tokens) == (30, 0)
    assert not engine.has_unfinished() and engine.stats().kv_cache_blocks_used == 0
    scored = out.prompt_logprobs
    assert len(scored) == len(ids) and scored[0] is None  # nothing precedes the first token
    expected = full_logprobs(load_exported(llama)[0], ids)
    for i, lp in enumerate(scored[1:], start=1):
        assert lp.token_id == ids[i]
        assert lp.logprob == pytest.approx(expected[i - 1, ids[i]].item(), abs=TOL)
        top = list(lp.top.values())  # texts: bytes >= 128 all read U+FFFD, so <= 4 entries
        assert top == sorted(top, reverse=True) and 1 <= len(top) <= 4
        assert top[0] == pytest.approx(expected[i - 1].max().item(), abs=TOL)


def test_scoring_a_prompt_changes_no_bits_of_anything_else(llama):
    """The scored request's rows go through the head beside the others: the batch mates'
    tokens and logprobs, and its own generation, are those of runs without it."""
    engine = engine_for(llama)
    prompt = [(11 * i + 3) % 256 for i in range(21)]
    mates = {f"m{j}": [(5 * i + j) % 256 for i in range(3 + 7 * j)] for j in range(3)}
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    scoring = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2,
                             prompt_logprobs=3)  # fmt: skip

    def run(requests):
        for rid, (ids, params) in requests.items():
            engine.add_request(rid, ids, params)
        return run_to_completion(engine)

    alone = {rid: run({rid: (ids, greedy)})[rid] for rid, ids in mates.items()}
    alone["s"] = run({"s": (prompt, greedy)})["s"]
    scored_alone = run({"s": (prompt, scoring)})["s"]
    together = run({"s": (prompt, scoring), **{rid: (ids, greedy) for rid, ids in mates.items()}})
    for rid, outs in alone.items():
        assert tokens_of(together[rid]) == tokens_of(outs)
        assert [o.logprobs for o in together[rid]] == [o.logprobs for o in outs]  # bit for bit
    assert together["s"][0].prompt_logprobs == scored_alone[0].prompt_logprobs
    assert len(together["s"][0].prompt_logprobs) == len(prompt)
    assert all(o.prompt_logprobs is None for o in together["s"][1:])  # the first output only


# ---------------------------------------------------------------------------- over HTTP

PROMPT = "🌳 naïve"  # byte tokenizer: 11 tokens


@pytest.fixture(scope="module")
def client(lm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lm_server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reciter(lm_export):
    return load_exported(lm_export)[0]


def complete(client, **kw):
    return client.completions.create(model="", prompt=PROMPT, temperature=0, **kw)


def test_echo_with_max_tokens_0_returns_the_prompt_scored(client, reciter):
    out = complete(client, echo=True, logprobs=3, max_tokens=0)
    (choice,) = out.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    ids = list(PROMPT.encode())
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert lp.tokens == [bytes([t]).decode(errors="replace") for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    expected = full_logprobs(reciter, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=TOL)
        top = list(lp.top_logprobs[i].values())
        assert top == sorted(top, reverse=True) and 1 <= len(top) <= 3
        assert top[0] == pytest.approx(expected[i - 1].max().item(), abs=TOL)
    plain = complete(client, echo=True, max_tokens=0).choices[0]  # echo alone: no logprobs
    assert plain.text == PROMPT and plain.logprobs is None


def test_echo_covers_the_prompt_then_the_completion(client):
    prompt_only = complete(client, echo=True, logprobs=2, max_tokens=0).choices[0]
    generated = complete(client, logprobs=2, max_tokens=5).choices[0]
    both = complete(client, echo=True, logprobs=2, max_tokens=5).choices[0]
    assert both.text == PROMPT + generated.text
    for field in ("tokens", "token_logprobs", "top_logprobs"):
        assert getattr(both.logprobs, field) == (
            getattr(prompt_only.logprobs, field) + getattr(generated.logprobs, field)
        )
    # Offsets count the token texts, the prompt's (11 bytes, 11 texts) then the completion's.
    offsets = both.logprobs.text_offset
    assert offsets == [sum(map(len, both.logprobs.tokens[:i])) for i in range(len(offsets))]


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_a_stream_sends_the_echoed_prompt_first(client, max_tokens):
    whole = complete(client, echo=True, logprobs=2, max_tokens=max_tokens).choices[0]
    chunks = [c.choices[0] for c in complete(
        client, echo=True, logprobs=2, max_tokens=max_tokens, stream=True) if c.choices]  # fmt: skip
    first = chunks[0]
    assert first.text.startswith(PROMPT)
    assert (
        first.logprobs.tokens[: len(PROMPT.encode())]
        == whole.logprobs.tokens[: len(PROMPT.encode())]
    )
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [v for c in chunks for v in getattr(c.logprobs, field)]
        assert streamed == getattr(whole.logprobs, field)
    assert chunks[-1].finish_reason == whole.finish_reason == "length"


# ------------------------------------------------------------------ lm-evaluation-harness

# (context, choices, gold index): the reciter continues TEXT, so it picks TEXT's next bytes;
# some golds are wrong on purpose, so the accuracy is neither 0 nor 1.
DOCS = [  # contexts end in no whitespace: lm-eval would move it into the continuation
    ("🌳 na", ["ïve", "ive", "xyz"], 0),
    ("🌳 naïve 漢", ["字! ", "汉语 ", "!!"], 0),
    ("naïve 漢字!", [" 🌳", " 🌲", " a"], 0),
    ("漢字! 🌳", [" naïve", " naive", " knave"], 1),
    ("! 🌳 naïve", [" 漢字", " 字漢", " zz"], 2),
]

TASK_YAML = """\
task: baobab_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


def direct_choice_scores(model, context: str, choices: list[str]) -> list[float]:
    """Each choice's summed token logprobs given ``context`` (byte tokenizer: id == byte),
    from one full forward: what lm-eval's ``acc`` takes the argmax of."""
    scores = []
    for choice in choices:
        ctx, cont = list(context.encode()), list(choice.encode())
        ids = ctx + cont
        logprobs = full_logprobs(model, ids[:-1])  # row i scores ids[i + 1]
        scores.append(sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return scores


def test_lm_eval_multiple_choice_accuracy_equals_direct_scoring(
    lm_server, lm_export, reciter, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval  # slow to import: here, not at collection
    from lm_eval.tasks import TaskManager

    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in DOCS)
    )
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "baobab_choices.yaml").write_text(
        TASK_YAML.format(docs=docs, cache=tmp_path / "cache")
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{lm_server.url}/v1/completions",
            "model": "",
            # The export's tokenizer.json, loaded by transformers: nothing is downloaded.
            # Requests go as text (one prompt each): the server tokenizes them the same way.
            "tokenizer_backend": "huggingface",
            "tokenizer": str(lm_export),
            "tokenized_requests": False,
        },
        tasks=["baobab_choices"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    direct = [direct_choice_scores(reciter, c, ch) for c, ch, _ in DOCS]
    picked = [max(range(len(s)), key=s.__getitem__) for s in direct]
    expected_acc = sum(p == g for p, (_, _, g) in zip(picked, DOCS)) / len(DOCS)
    assert 0 < expected_acc < 1
    samples = sorted(results["samples"]["baobab_choices"], key=lambda s: s["doc_id"])
    for sample, scores in zip(samples, direct, strict=True):
        served = [ll for ll, _greedy in sample["filtered_resps"]]
        assert served == pytest.approx(scores, abs=1e-3)
    assert math.isclose(results["results"]["baobab_choices"]["acc,none"], expected_acc)
