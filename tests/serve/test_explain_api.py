"""POST /v1/explain against real servers on loopback: the CLI's JSON, the bounds (400, 429),
the API key (401), and completions untouched while an explanation runs."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from serving import API_KEY, TEXT, metric_values, poll, serve_in_thread, served_app

PERIOD = len(TEXT.encode())  # bytes (= tokens) in one recital of TEXT
AFTER_TREE = (TEXT * 8)[1:]  # what the reciting model says after "🌳"


def explain_body(**overrides) -> dict:
    # The reciter is so sure of itself that IG from a zero baseline needs many steps to
    # converge: a loose max_delta keeps these requests small.
    body = {"prompt": "🌳 naï", "target": "ve", "methods": ["ig", "occlusion"], "max_delta": 10}
    return {**body, **overrides}


def test_an_explanation_is_the_json_of_the_cli(lm_server, lm_export):
    from baobab.data.tokenizer import Tokenizer
    from baobab.explain import explain
    from baobab.export.open import open_model

    body = explain_body(contrast="vx", ig_steps=64, top_k=3)
    with lm_server.client() as client:
        got = client.post("/v1/explain", json=body)
    assert got.status_code == 200, got.text
    answer = got.json()
    assert answer.pop("object") == "explanation"
    assert answer.pop("model") == lm_server.state.served.model_name
    model = open_model(lm_export).model.float().eval()
    tokenizer = Tokenizer.load(lm_export / "tokenizer.json")
    expected = explain(
        model,
        tokenizer,
        prompt=body["prompt"],
        target="ve",
        contrast="vx",
        methods=["ig", "occlusion"],
        ig_steps=64,
        max_delta=10,
        top_k=3,
    ).to_json()
    assert answer.keys() == expected.keys()
    [step], [want] = answer["steps"], expected["steps"]
    assert step["context_ids"] == list("🌳 naï".encode()) == want["context_ids"]
    assert step["target"] == "ve" and step["contrast"] == "vx"
    for a, b in zip(step["attributions"], want["attributions"], strict=True):
        assert a["method"] == b["method"]
        torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]))
    assert answer["logit_lens"]["top_ids"] == expected["logit_lens"]["top_ids"]
    weights = torch.tensor(answer["attention"]["weights"])  # (L, H, T, T)
    torch.testing.assert_close(weights, torch.tensor(expected["attention"]["weights"]))
    with lm_server.client() as client:
        metrics = client.get("/metrics").text
    assert (
        metric_values(metrics, "baobab_explanations_total")[
            (("model", lm_server.state.served.model_name), ("outcome", "ok"))
        ]
        >= 1
    )


def test_work_over_the_limit_is_400_naming_both_numbers(lm_server):
    prompt = TEXT * 8  # 8 * PERIOD byte tokens, + 2 of the target "ve"
    with lm_server.client() as client:
        got = client.post("/v1/explain", json=explain_body(prompt=prompt, ig_steps=1024))
        assert got.status_code == 400
        error = got.json()["error"]
        assert f"{8 * PERIOD + 2} tokens x 1024 integration steps" in error["message"]
        assert "131072" in error["message"] and error["param"] == "ig_steps"
        # A completion's tokens are explained in turn: 40 contexts of 100 to 139 tokens.
        body = {"prompt": "a" * 100, "completion": "b" * 40, "ig_steps": 32}
        got = client.post("/v1/explain", json=body)
        assert got.status_code == 400
        assert (
            f"{40 * 100 + 40 * 41 // 2} tokens (over the 40 completion tokens, each explained"
            in got.json()["error"]["message"]
        )
        # The bounds on one request's shape are in the schema: a 400 before any tokenizing.
        for bad, param in (
            ({"ig_steps": 0}, "ig_steps"),
            ({"ig_steps": 2049}, "ig_steps"),
            ({"methods": ["saliency"]}, "methods.0"),
            ({"completion": "x"}, "completion"),  # beside a target
            ({"prompt": ""}, "prompt"),
        ):
            got = client.post("/v1/explain", json=explain_body(**bad))
            assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text


def test_integrated_gradients_that_do_not_converge_are_400(lm_server):
    with lm_server.client() as client:
        got = client.post("/v1/explain", json=explain_body(ig_steps=1, max_delta=1e-9))
    assert got.status_code == 400
    assert "raise ig_steps" in got.json()["error"]["message"]


def test_completions_run_unchanged_beside_an_explanation(lm_server):
    """A greedy stream gives the same text while a long explanation is sliced between its
    steps, and the explanation still completes."""
    explained: dict = {}
    served = lm_server.state.served
    # Each of the completion's 20 tokens explained in turn after 40 to 59 tokens.
    long = explain_body(prompt=TEXT * 2, target=None, completion=TEXT, ig_steps=128)

    def run() -> None:
        with lm_server.client() as client:
            explained["response"] = client.post("/v1/explain", json=long)

    thread = threading.Thread(target=run)
    thread.start()
    assert poll(lambda: served.stats().explanations == 1)
    with lm_server.client() as client:
        body = {"prompt": "🌳", "max_tokens": 3 * PERIOD, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    import json

    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)
    assert text == AFTER_TREE[: 3 * len(TEXT)]
    thread.join(timeout=120)
    assert explained["response"].status_code == 200, explained["response"].text


@pytest.fixture(scope="module")
def keyed_server(lm_export):
    """An in-process engine (its core reachable) behind an API key, one explanation at most."""
    app = served_app(lm_export, api_keys=[API_KEY], separate_process=False, explain_max_queue=1)
    with serve_in_thread(app) as running:
        yield running


def test_explain_needs_the_api_key(keyed_server):
    with keyed_server.client() as client:
        got = client.post("/v1/explain", json=explain_body())
        assert got.status_code == 401
        assert got.json()["error"]["code"] == "invalid_api_key"
        keyed = client.post(
            "/v1/explain", json=explain_body(), headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert keyed.status_code == 200, keyed.text


def test_a_full_explanation_queue_is_429(keyed_server):
    """With explain_max_queue 1, a second explanation while the first is held is refused;
    the first then completes."""
    served = keyed_server.state.served
    explanations = served.core.explanations
    gate, original = threading.Event(), explanations.runner
    explanations.runner = lambda spec, progress: (gate.wait(60), original(spec, progress))[1]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    first: dict = {}

    def run() -> None:
        with keyed_server.client(headers=headers) as client:
            first["response"] = client.post("/v1/explain", json=explain_body())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert poll(lambda: served.stats().explanations == 1)
        with keyed_server.client(headers=headers) as client:
            refused = client.post("/v1/explain", json=explain_body())
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert refused.headers["Retry-After"] == "1"
            assert "explanations_pending" in client.get("/metrics").text
    finally:
        gate.set()
        thread.join(timeout=60)
        explanations.runner = original
    assert first["response"].status_code == 200, first["response"].text
    assert poll(lambda: served.stats().explanations == 0)


def test_a_classifier_server_refuses_explanations(image_export):
    with serve_in_thread(served_app(image_export)) as srv:
        got = httpx.post(f"{srv.url}/v1/explain", json=explain_body(), timeout=30)
    assert got.status_code == 400
    assert "explanations over HTTP are for language models" in got.json()["error"]["message"]
