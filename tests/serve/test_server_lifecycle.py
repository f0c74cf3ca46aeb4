"""Start-up, health, SIGTERM drain and exit: ``baobab serve`` as a real process, and the same
server in a thread where a process is not needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from serving import (
    MODEL_CONTEXT,
    TEST_ENGINE,
    free_port,
    poll,
    serve_in_thread,
    served_app,
    wait_until_healthy,
)

from baobab.cli import main

REPO = Path(__file__).resolve().parents[2]


def sse_payloads(lines) -> list[dict]:
    """The JSON events of an SSE stream, up to ``data: [DONE]`` (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return events
        events.append(json.loads(line.removeprefix("data: ")))
    raise AssertionError("the stream ended without data: [DONE]")


def test_sigterm_lets_streams_finish_then_exits_0(lm_export):
    port = free_port()
    command = [sys.executable, "-m", "baobab", "serve", str(lm_export),
               "--port", str(port), "--drain_timeout", "60", "--log_level", "warning",
               "--engine.kv_cache_memory_gib", str(TEST_ENGINE["kv_cache_memory_gib"])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url)
        body = {"prompt": "🌳", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)

            def refused() -> bool:  # the listening socket closes at once
                try:
                    httpx.get(f"{url}/health", timeout=2)
                except httpx.ConnectError:
                    return True
                return False

            assert poll(refused, timeout=20)
            events = sse_payloads([first, *lines])
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        tokens = sum(len(e["choices"][0]["text"].encode()) for e in events)
        assert tokens >= 150  # the stream ran to its end (the text of 200 bytes, give or take)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr


def test_drain_timeout_aborts_what_is_left(lm_export):
    with serve_in_thread(served_app(lm_export), drain_timeout=0) as srv:
        body = {"prompt": "🌳", "max_tokens": MODEL_CONTEXT - 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            srv.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
            events = sse_payloads([first, *lines])
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        assert srv.state.served.stats().running == 0


def test_health_is_503_while_loading_then_200(lm_export):
    from baobab.serve.chat import ChatTemplate
    from baobab.serve.config import EngineConfig
    from baobab.serve.launch import load_served_model
    from baobab.serve.server import build_app

    go = threading.Event()

    def slow_load():
        assert go.wait(60)
        return load_served_model(str(lm_export), EngineConfig(**TEST_ENGINE))

    app = build_app(slow_load, chat_template=ChatTemplate())
    with serve_in_thread(app, wait_healthy=False) as srv, srv.client() as http:
        r = http.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert http.get("/v1/models").status_code == 503
        assert http.get("/metrics").status_code == 200
        go.set()
        wait_until_healthy(srv.url)
        assert (
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        )


def test_engine_failure_is_503_and_turns_health_503(lm_export, monkeypatch):
    """A fault injected into the real engine's step (an in-process engine, to reach it): the
    open stream gets an error event, later requests a 503, and /health says 503."""
    app = served_app(lm_export, separate_process=False)
    with serve_in_thread(app) as srv, srv.client() as http:
        body = {"prompt": "🌳", "max_tokens": MODEL_CONTEXT - 8, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(lines)

            def broken_step():
                raise RuntimeError("injected fault")

            monkeypatch.setattr(srv.state.served.engine, "step", broken_step)
            events = sse_payloads([first, *lines])
        assert "injected fault" in events[-1]["error"]["message"]
        assert http.get("/health").status_code == 503
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "injected fault" in r.json()["error"]["message"]


def test_cli_refuses_bad_exports_in_one_sentence(tmp_path, capsys, lm_export):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((lm_export / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    port = str(free_port())
    assert main(["serve", str(broken), "--port", port, "--log_level", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the model could not be loaded")
    assert main(["serve", str(lm_export), "--port", "70000"]) == 2


@pytest.mark.parametrize("flag", ["--max_queue", "--drain_timeout"])
def test_cli_refuses_bad_numbers(capsys, lm_export, flag):
    assert main(["serve", str(lm_export), flag, "-1"]) == 2
    assert flag.removeprefix("--") in capsys.readouterr().err
