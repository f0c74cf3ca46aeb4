"""Every refusal is a 4xx (or 503) in OpenAI's error shape, never a 500."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from serving import API_KEY, MODEL_CONTEXT, poll, serve_in_thread, served_app


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error["message"]


def test_prompt_over_the_context_names_both_numbers(lm_server):
    client = openai.OpenAI(base_url=f"{lm_server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="", prompt="a" * 500, max_tokens=100)
    message = info.value.body["message"]
    assert f"maximum context length is {MODEL_CONTEXT} tokens" in message
    assert "500 in the prompt" in message and "100 for the completion" in message
    assert info.value.body["code"] == "context_length_exceeded"
    with lm_server.client() as http:  # chat: the default max_tokens is what is left
        r = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 600}]}
        )
        assert str(MODEL_CONTEXT) in assert_error(r, 400, "max_tokens")


BAD_BODIES = [
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "1"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": [1, 2, 100000]}, "prompt"),  # outside the vocabulary
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),  # not implemented
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_out_of_range_parameters_are_400(lm_server, body, param):
    with lm_server.client() as http:
        assert_error(http.post("/v1/completions", json=body), 400, param)


def test_malformed_bodies_are_400(lm_server):
    with lm_server.client() as http:
        headers = {"Content-Type": "application/json"}
        for raw in (b"{bad json", b"", b"[1, 2]", b"null", '{"prompt": "\u00e9'.encode()):
            assert_error(http.post("/v1/completions", content=raw, headers=headers), 400)
        chat = [
            {"messages": []},
            {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
        ]
        for body in chat:
            assert_error(http.post("/v1/chat/completions", json=body), 400)


def test_wrong_model_and_route(lm_server):
    with lm_server.client() as http:
        r = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert "gpt-9" in assert_error(r, 404, "model")
        assert_error(http.get("/v1/nothing"), 404)
        assert_error(http.delete("/v1/models"), 405)
        image = base64.b64encode(b"not an image").decode()
        r = http.post("/v1/classify", json={"images": [image]})
        assert "generates text" in assert_error(r, 400)


def test_api_key_guards_every_route_but_health(lm_export):
    with serve_in_thread(served_app(lm_export, api_keys=[API_KEY, "second-key"])) as srv:
        routes = [("GET", r) for r in ("/v1/models", "/metrics", "/openapi.json", "/docs")] + [
            ("POST", r) for r in ("/v1/completions", "/v1/chat/completions", "/v1/classify")
        ]
        body = {"prompt": "🌳", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        with srv.client() as http:
            assert http.get("/health").status_code == 200
            for method, route in routes:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                    r = http.request(method, route, json=body, headers=headers)
                    assert_error(r, 401)
                    assert r.headers["WWW-Authenticate"] == "Bearer"
                for key in (API_KEY, "second-key"):
                    r = http.request(
                        method, route, json=body, headers={"Authorization": f"Bearer {key}"}
                    )
                    assert r.status_code != 401, route
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0)
        assert client.completions.create(model="", prompt="🌳", max_tokens=2).choices


def test_full_queue_is_429_with_retry_after(lm_export):
    """One slot, one queue place: a third concurrent request is refused, not queued."""
    app = served_app(lm_export, max_num_seqs=1, max_queue=1)
    with serve_in_thread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        long = {"prompt": "🌳", "max_tokens": MODEL_CONTEXT - 8, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # (kept: a dropped iterator closes the connection)
            next(lines)  # it holds the only slot
            second = httpx.Client(base_url=srv.url, timeout=60)
            with second, second.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # queued
                assert poll(lambda: srv.state.served.stats().waiting == 1, timeout=30)
                r = httpx.post(f"{srv.url}/v1/completions", json=long, timeout=60)
                assert "queue is full" in assert_error(r, 429)
                assert int(r.headers["Retry-After"]) >= 1


# Raw JSON text: a lone UTF-16 surrogate escape, which Python's json module decodes to a str
# that UTF-8 cannot carry (it once reached the tokenizer, or the 404's echo, and became 503).
LONE = "a\\udfffb"
CHAT, COMPLETE = "/v1/chat/completions", "/v1/completions"
USER = '{"messages": [{"role": "user", %s}]}'
SURROGATE_BODIES = [
    (CHAT, USER % '"content": "%s"', "messages.0.content"),
    (CHAT, USER % '"content": [{"type": "text", "text": "%s"}]', "messages.0.content.0.text"),
    (CHAT, USER % '"content": "x", "name": "%s"', "messages.0.name"),
    (COMPLETE, '{"prompt": "x", "model": "%s"}', "model"),
    (COMPLETE, '{"prompt": "%s"}', "prompt"),
    (COMPLETE, '{"prompt": "x", "stop": ["ok", "%s"]}', "stop.1"),
    (COMPLETE, '{"prompt": "x", "user": "%s"}', "user"),
    (COMPLETE, '{"prompt": "x", "%s": 1}', LONE),  # an unknown field's name
    ("/v1/classify", '{"images": ["%s"]}', "images.0"),
]


@pytest.mark.parametrize(("route", "template", "param"), SURROGATE_BODIES)
def test_lone_surrogates_are_400_naming_the_field(lm_server, route, template, param):
    raw = (template % LONE).encode()
    assert b"\\udfff" in raw
    with lm_server.client() as http:
        r = http.post(route, content=raw, headers={"Content-Type": "application/json"})
        message = assert_error(r, 400, param)
        assert "surrogate" in message and f"'{param}'" in message


def test_errors_echo_user_text_safely(lm_server):
    with lm_server.client() as http:
        r = http.post("/v1/completions", json={"prompt": "x", "model": "m" * 10_000})
        message = assert_error(r, 404, "model")
        assert len(message) < 300  # the echo of a long name is cut


BAD_PROMPT_LISTS = [
    (["a", "b"], "item 0 is a string; batches of prompts are not supported"),
    ([[1, 2], [3]], "item 0 is a list; batches of prompts are not supported"),
    ([1, 2, -3], "item 2 is -3"),
    ([1, 2.5], "item 1 is 2.5"),
    ([1, True], "item 1 is true"),
    ([1, None], "item 1 is null"),
    ([], "the list is empty"),
    ({"ids": [1]}, "a string or a list of token ids, not an object"),
]


@pytest.mark.parametrize(("prompt", "expected"), BAD_PROMPT_LISTS)
def test_bad_prompt_lists_say_what_is_wrong(lm_server, prompt, expected):
    with lm_server.client() as http:
        message = assert_error(http.post("/v1/completions", json={"prompt": prompt}), 400, "prompt")
        assert expected in message and "valid string" not in message


def test_openai_defaults_and_head_are_accepted(lm_server):
    client = openai.OpenAI(base_url=f"{lm_server.url}/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "🌳"}],
        max_tokens=2,
        response_format={"type": "text"},  # OpenAI's default
    )
    assert out.choices[0].finish_reason == "length"
    with lm_server.client() as http:
        r = http.post("/v1/completions", json={"prompt": "x", "response_format": {"type": "xml"}})
        assert_error(r, 400, "response_format.type")  # a type OpenAI does not define
        for route in ("/health", "/v1/models"):
            head, get = http.head(route), http.get(route)
            assert head.status_code == get.status_code == 200
            assert (
                head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
            )
