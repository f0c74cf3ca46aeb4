"""What one request may cost the server: its body size, its text's length, and the time its
client may take to send it (``baobab/serve/limits.py``, ``prompts.py``)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

import httpx
import pytest
from serving import MODEL_CONTEXT, metric_values, serve_in_thread
from test_server_errors import assert_error

from baobab.cli import main
from baobab.serve.chat import ChatTemplate
from baobab.serve.limits import DEFAULT_MAX_BODY_MIB
from baobab.serve.server import build_app

MIB = 1 << 20


def rss_bytes() -> int:
    """Resident memory of this process, which runs the server (in a thread) too."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_big_body_is_413_while_health_keeps_answering(lm_server):
    """A 24 MiB chat message streamed without Content-Length (the issue's 20 MB message froze
    /health for 13-17 s and left the process 2.2 GB larger)."""
    url = lm_server.url
    health_client = httpx.Client(base_url=url, timeout=60)
    assert health_client.get("/health").status_code == 200  # its connection is open now
    baseline = rss_bytes()
    started, chunk = threading.Event(), b"a" * MIB

    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        started.set()
        for _ in range(24):
            yield chunk
            time.sleep(0.02)  # the upload lasts >= 0.5 s, however fast the machine
        yield b'"}]}'

    big: dict = {}

    def send_big() -> None:
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=120) as http:
            big["response"] = http.post(
                f"{url}/v1/chat/completions", content=body(), headers=headers
            )
        big["at"] = time.monotonic()

    thread = threading.Thread(target=send_big)
    thread.start()
    try:
        assert started.wait(timeout=60)
        health = health_client.get("/health")
        health_at = time.monotonic()
    finally:
        thread.join(timeout=120)
        health_client.close()
    assert health.status_code == 200
    message = assert_error(big["response"], 413)
    assert f"{DEFAULT_MAX_BODY_MIB:g} MiB" in message and "--max_body_mib" in message
    assert health_at < big["at"]  # /health was not queued behind the big request
    assert rss_bytes() - baseline < 200 * MIB
    # A declared Content-Length over the limit is refused before the body is read.
    declared = httpx.post(f"{url}/v1/completions", content=b" " * (9 * MIB), timeout=60)
    assert_error(declared, 413)
    assert httpx.get(f"{url}/health").status_code == 200
    rejected = metric_values(httpx.get(f"{url}/metrics").text, "baobab_requests_rejected_total")
    assert sum(v for k, v in rejected.items() if ("reason", "body_too_large") in k) >= 2


def chat(content: str | list, n_messages: int = 1) -> dict:
    return {"messages": [{"role": "user", "content": content}] * n_messages}


def test_text_that_cannot_fit_is_refused_before_tokenizing(lm_server):
    with lm_server.client() as http:
        # 600,000 characters of a byte-level tokenizer are at least 600,000 tokens.
        r = http.post("/v1/chat/completions", json=chat("a" * 600_000))
        message = assert_error(r, 400, "max_tokens")
        assert f"maximum context length is {MODEL_CONTEXT} tokens" in message
        assert "600000 characters" in message and r.json()["error"]["code"] == (
            "context_length_exceeded"
        )
        r = http.post("/v1/completions", json={"prompt": "é" * 400, "max_tokens": 200})
        assert "at least 600 tokens" in assert_error(r, 400, "max_tokens")
        # Length limits on message content: one message, its parts, all messages together.
        r = http.post("/v1/chat/completions", json=chat("a" * 1_000_001))
        assert "1000000 characters" in assert_error(r, 400, "messages.0.content")
        parts = [{"type": "text", "text": "a" * 600_000}] * 2
        assert "1200000 characters" in assert_error(
            http.post("/v1/chat/completions", json=chat(parts)), 400, "messages"
        )
        r = http.post("/v1/chat/completions", json=chat("a" * 600_000, n_messages=2))
        assert_error(r, 400, "messages")
        # A text that fits is still served.
        r = http.post("/v1/chat/completions", json={**chat("a" * 100), "max_tokens": 2})
        assert r.status_code == 200, r.text


@contextlib.contextmanager
def idle_server(request_timeout: float):
    """A server whose model never finishes loading (/health: 503): enough to test the HTTP
    layer, without loading a model."""
    release = threading.Event()

    def load():
        release.wait(timeout=120)
        raise RuntimeError("the test is over")

    app = build_app(load, chat_template=ChatTemplate())
    with serve_in_thread(app, wait_healthy=False, request_timeout=request_timeout) as srv:
        try:
            yield srv
        finally:
            release.set()


def test_slow_clients_are_cut_off_after_the_request_timeout():
    """One byte every 0.2 s once held a connection forever: now each request must arrive,
    headers and body, within --request_timeout (1 s here) of its first byte."""
    with idle_server(request_timeout=1.0) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        silent, heads, bodies = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        bodies.sendall(head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        trickles = {heads: iter(head * 100), bodies: iter(b'{"prompt": "' + b"a" * 988)}
        received = {s: b"" for s in (silent, heads, bodies)}
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + 10  # the bound is 1 s: 10 s leaves room for a slow machine
        try:
            while len(closed) < 3 and time.monotonic() < deadline:
                for sock, data in trickles.items():
                    if not received[sock]:  # (not once answered: a byte sent then is reset)
                        with contextlib.suppress(OSError):  # reset once the server closed
                            sock.send(bytes([next(data)]))
                readable, _, _ = select.select(
                    [s for s in received if s not in closed], [], [], 0.2
                )
                for sock in readable:
                    try:
                        chunk = sock.recv(65536)
                    except OSError:
                        chunk = b""
                    received[sock] += chunk
                    if not chunk:
                        closed.add(sock)
        finally:
            for sock in received:
                sock.close()
        assert len(closed) == 3, f"connections still open after 10 s: {received}"
        answer = received[silent]
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
        assert b'"code":"request_timeout"' in answer and b"--request_timeout" in answer
        for sock in trickles:  # a reset may beat the 408 here: a bare close also counts
            assert received[sock] in (b"", answer), received[sock]

        # A keep-alive connection may idle between requests longer than the timeout.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for i in range(2):
                time.sleep(1.3 * i)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed an idle keep-alive connection"
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 503 ")  # still loading


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max_body_mib", "0"), ("--request_timeout", "-1")],
)
def test_cli_refuses_bad_limits(capsys, lm_export, flag, value):
    assert main(["serve", str(lm_export), flag, value]) == 2
    assert flag.removeprefix("--") in capsys.readouterr().err
