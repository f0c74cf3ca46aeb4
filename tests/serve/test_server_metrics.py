"""/metrics: Prometheus text that prometheus_client parses, every series labelled with the
model; counters move with traffic; a client that disconnects mid-stream frees its slot."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import MODEL_CONTEXT, metric_values, poll

FAMILIES = {
    "baobab_requests_running",
    "baobab_requests_waiting",
    "baobab_kv_cache_usage_ratio",
    "baobab_prompt_tokens",
    "baobab_generation_tokens",
    "baobab_time_to_first_token_seconds",
    "baobab_inter_token_latency_seconds",
    "baobab_e2e_request_latency_seconds",
}


def scrape(http: httpx.Client) -> str:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def one(text: str, name: str, **labels) -> float:
    values = [v for k, v in metric_values(text, name).items() if set(labels.items()) <= set(k)]
    return sum(values)


def test_metrics_parse_and_are_labelled_with_the_model(lm_server):
    model = lm_server.state.served.model_name
    with lm_server.client() as http:
        before = scrape(http)
        r = http.post("/v1/completions", json={"prompt": "🌳", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200
        after = scrape(http)
    families = list(text_string_to_metric_families(after))
    assert {f.name for f in families} >= FAMILIES
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels.get("model") == model for s in samples)
    grew = {
        name: one(after, name) - one(before, name)
        for name in (
            "baobab_prompt_tokens_total",
            "baobab_generation_tokens_total",
            "baobab_time_to_first_token_seconds_count",
            "baobab_e2e_request_latency_seconds_count",
        )
    }
    assert grew == {
        "baobab_prompt_tokens_total": 4,
        "baobab_generation_tokens_total": 5,
        "baobab_time_to_first_token_seconds_count": 1,
        "baobab_e2e_request_latency_seconds_count": 1,
    }
    gaps = one(after, "baobab_inter_token_latency_seconds_count") - one(
        before, "baobab_inter_token_latency_seconds_count"
    )
    assert 1 <= gaps <= 4  # five tokens, at most four gaps between them
    assert 0 <= one(after, "baobab_kv_cache_usage_ratio") <= 1


def test_disconnect_mid_stream_frees_the_slot(lm_server):
    body = {"prompt": "🌳", "max_tokens": MODEL_CONTEXT - 8, "ignore_eos": True, "stream": True}
    with lm_server.client() as metrics:
        aborted = one(scrape(metrics), "baobab_requests_finished_total", finish_reason="abort")
        http = httpx.Client(base_url=lm_server.url, timeout=60)
        with http, http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            running = scrape(metrics)
            assert one(running, "baobab_requests_running") == 1
            assert one(running, "baobab_kv_cache_usage_ratio") > 0
        # leaving the block closed the connection mid-stream
        assert poll(lambda: one(scrape(metrics), "baobab_requests_running") == 0, timeout=30)
        freed = scrape(metrics)
        assert one(freed, "baobab_kv_cache_usage_ratio") == 0
        assert one(freed, "baobab_requests_finished_total", finish_reason="abort") == aborted + 1


def test_disconnect_while_waiting_for_a_whole_answer_aborts_it(lm_server):
    # 8 choices of ~500 tokens: 4,000 tokens, far more than the engine makes in 0.3 s.
    body = {"prompt": "🌳", "max_tokens": MODEL_CONTEXT - 8, "ignore_eos": True, "n": 8}
    with lm_server.client() as metrics:
        aborted = one(scrape(metrics), "baobab_requests_finished_total", finish_reason="abort")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=0.3)

        def freed() -> bool:
            text = scrape(metrics)
            return (
                one(text, "baobab_requests_running") == 0
                and one(text, "baobab_requests_finished_total", finish_reason="abort")
                == aborted + 8
            )

        assert poll(freed, timeout=30)
