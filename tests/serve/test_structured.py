"""Structured output (``response_format``): every choice of a tiny gpt, sampled at
temperature 1 under many seeds, parses and validates against its JSON schema, through the
official ``openai`` client and a real server; unsupported or malformed formats are 400s;
grammar rows leave their batch mates' tokens alone.

The grammar does not force closure: a model that never picks ``"`` inside a string writes
it until max_tokens. So SCHEMA's instances are bounded (maxLength, maxItems, enums, ranges,
multipleOf): any model, here the shared reciting one (whose engine runs in its own process,
so the grammar crosses the pipe), ends each choice with "stop" well inside max_tokens. A
``json_object`` is unbounded; it is sampled from a random gpt that leans towards closing
characters (``"``, ``}`` and ``]`` get a few logits more: :func:`closing_gpt`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from engine_helpers import (
    BYTE_VOCAB,
    GPT2,
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    run_to_completion,
    text_of,
    tokens_of,
)
from serving import serve_in_thread, served_app

from baobab.serve import EngineConfig, SamplingParams, load_served_model
from baobab.serve.structured import grammar_for

MODEL_VOCAB = 512  # past the byte tokenizer's 259: ids a grammar row must never sample
MAX_TOKENS = 200  # instances of SCHEMA are at most ~110 tokens; chosen outputs ~20-100
SEEDS = 16  # choices per request (n), seeds seed..seed+15

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "score": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 4}},
            "required": ["ok", "note"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "owner"],
    "additionalProperties": False,
}  # fmt: skip
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


def closing_gpt(seed: int, boost: float = 6.0) -> torch.nn.Module:
    """A random gpt (MODEL_VOCAB ids) whose logits for ``"``, ``}`` and ``]`` are ``boost``
    higher: the final layernorm's channel 0 is the constant 1, read only by those rows."""
    model = random_gpt(seed, vocab_size=MODEL_VOCAB, max_seq_len=256, tie_embeddings=False, **GPT2)
    with torch.no_grad():
        model.norm.weight[0], model.norm.bias[0] = 0.0, 1.0
        model.output.weight[:, 0] = 0.0
        model.output.weight[list(b'"}]'), 0] = boost
    return model


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return export_gpt(tmp_path_factory.mktemp("structured"), closing_gpt(seed=3))


@pytest.fixture(scope="module")
def closing_server(export):
    with serve_in_thread(served_app(export, separate_process=False)) as running:
        yield running


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def assert_valid(texts: list[str], schema: dict) -> None:
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > len(texts) // 2, texts  # the seeds gave different instances


def test_json_schema_choices_validate_on_chat_and_completions(lm_server):
    client = client_of(lm_server)
    chat = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format=JSON_SCHEMA,
        n=SEEDS,
        seed=0,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
    )
    assert {c.finish_reason for c in chat.choices} == {"stop"}
    assert_valid([c.message.content for c in chat.choices], SCHEMA)

    completion = client.completions.create(
        model="",
        prompt="A person: ",
        n=SEEDS,
        seed=100,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        extra_body={"response_format": JSON_SCHEMA},  # vLLM's extension of completions
    )
    assert {c.finish_reason for c in completion.choices} == {"stop"}
    assert_valid([c.text for c in completion.choices], SCHEMA)


def test_json_object_choices_parse_streamed_and_logprobs_stay_raw(closing_server):
    stream = client_of(closing_server).chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Some JSON, please."}],
        response_format={"type": "json_object"},
        n=SEEDS,
        seed=7,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        stream=True,
        logprobs=True,
        top_logprobs=5,
    )
    texts, reasons, first = [""] * SEEDS, [None] * SEEDS, [None] * SEEDS
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
            if c.logprobs and c.logprobs.content and first[c.index] is None:
                first[c.index] = c.logprobs.content[0]
    assert set(reasons) == {"stop"}
    assert_valid(texts, {"type": "object"})
    # The grammar allows only "{" first, so masked logprobs would give it 0.0; they are the
    # raw model's (as vLLM reports them), where "{" is far from the likeliest token.
    for lp in first:
        assert lp.token == "{" and lp.logprob < lp.top_logprobs[0].logprob - 1
        assert "{" not in {t.token for t in lp.top_logprobs}


@pytest.mark.parametrize(
    ("schema", "construct"),
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, '["not"]'),
        ({"type": "string", "pattern": "(?=x)y"}, "look-around"),
        ({"type": "string", "format": "colour"}, "Unknown format: colour"),
    ],
)
def test_an_unsupported_schema_is_a_400_naming_the_construct(lm_server, schema, construct):
    with pytest.raises(openai.BadRequestError) as caught:
        client_of(lm_server).chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
    error = caught.value.body
    assert error["param"] == "response_format" and error["type"] == "invalid_request_error"
    assert "is not supported" in error["message"] and construct in error["message"]
    assert "\n" not in error["message"]


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format"),
        ("json", "response_format"),
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "s"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}, "response_format.json_schema.schema"),
    ],
)  # fmt: skip
def test_a_malformed_response_format_is_a_400(lm_server, response_format, param):
    for route, body in [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        r = httpx.post(f"{lm_server.url}{route}", json={**body, "response_format": response_format})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith(param), r.json()


def test_grammar_rows_leave_their_batch_mates_alone(export):
    """Greedy and seeded requests sample the same tokens alone as beside grammar rows; the
    grammar rows stay inside the tokenizer's vocabulary and end as valid instances."""
    config = EngineConfig(kv_cache_memory_gib=0.02, separate_process=False, max_num_seqs=16)
    engine = load_served_model(export, config).engine
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 30))] for _ in range(4)]
    mates = {
        f"m{i}": SamplingParams(max_tokens=40, temperature=1.0 if i % 2 else 0.0, seed=i,
                                ignore_eos=True)
        for i in range(4)
    }  # fmt: skip
    grammar = grammar_for(JSON_SCHEMA)
    structured = {
        f"g{i}": SamplingParams(MAX_TOKENS, temperature=1.0, seed=50 + i, grammar=grammar)
        for i in range(6)
    }

    alone = {}
    for (rid, params), ids in zip(mates.items(), prompts):
        engine.add_request(rid, ids, params)
        alone[rid] = tokens_of(run_to_completion(engine)[rid])
    for (rid, params), ids in zip(mates.items(), prompts):
        engine.add_request(rid, ids, params)
    for rid, params in structured.items():
        engine.add_request(rid, prompts[0], params)
    crowd = run_to_completion(engine)

    assert {rid: tokens_of(crowd[rid]) for rid in mates} == alone
    assert any(t >= BYTE_VOCAB for rid in mates for t in alone[rid])  # the model's full vocab
    for rid in structured:
        assert max(tokens_of(crowd[rid])) < BYTE_VOCAB and crowd[rid][-1].finish_reason == "stop"
    assert_valid([text_of(crowd[rid]) for rid in structured], SCHEMA)
