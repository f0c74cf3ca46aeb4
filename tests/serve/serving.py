"""Helpers for the server tests: the tiny reciting model, and real servers on free ports.

The language model is gpt-nano trained for a few seconds to recite ``TEXT`` byte by byte
(byte tokenizer: token id == byte), so greedy outputs are known in advance and full of
multi-byte characters.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

# Every 2-byte window of TEXT (cyclically) is followed by one byte only: quick to learn.
TEXT = "🌳 naïve 漢字! "
MODEL_CONTEXT = 512  # max_seq_len of the served model: room for long streams
API_KEY = "test-key-1"
# 10 MiB of KV cache: ~20k tokens of the tiny model (the 1 GiB default costs seconds to fill).
TEST_ENGINE = {"kv_cache_memory_gib": 0.01}


def train_reciter(seed: int = 0) -> torch.nn.Module:
    """gpt-nano that continues TEXT (greedy) for a few recitals."""
    from baobab.models import build_model

    torch.manual_seed(seed)
    ids = torch.tensor(list((TEXT * 80).encode()))
    model = build_model("gpt-nano", max_seq_len=MODEL_CONTEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared machine
    try:
        for _ in range(160):
            starts = torch.randint(0, len(ids) - 65, (8,)).tolist()
            x = torch.stack([ids[s : s + 64] for s in starts])  # (B, T)
            y = torch.stack([ids[s + 1 : s + 65] for s in starts])
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def export_reciter(root: Path) -> Path:
    """Train, checkpoint and ``baobab export`` the reciter under ``root``; the export dir."""
    from baobab.checkpoint import save_checkpoint
    from baobab.data import byte_tokenizer
    from baobab.export import export_checkpoint

    model = train_reciter()
    tokenizer = byte_tokenizer().save(root / "tokenizer.json")
    meta = {
        "model": {"name": "gpt-nano", "family": "gpt", "config": {"max_seq_len": MODEL_CONTEXT}},
        "objective": "causal_lm",
    }
    ckpt = save_checkpoint(root / "run", 1, [model], [], {"step": 1}, meta, tokenizer)
    return export_checkpoint(ckpt, root / "export")


LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def export_classifier(root: Path) -> Path:
    """An untrained resnet18-digits (1x8x8 images, 10 classes) exported with label names."""
    import json

    from baobab.checkpoint import save_checkpoint
    from baobab.export import export_checkpoint
    from baobab.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18-digits").eval()
    meta = {"model": {"name": "resnet18-digits", "family": "resnet", "config": {}}}
    ckpt = save_checkpoint(
        root / "run", 1, [model], [], {"step": 1}, {**meta, "objective": "classification"}
    )
    out = export_checkpoint(ckpt, root / "export")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "labels": LABELS}))  # names, not ids
    return out


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    app: object
    server: object  # a baobab.serve.http_command.DrainingServer

    @property
    def state(self):
        return self.app.state.baobab

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(
    app, wait_healthy: bool = True, drain_timeout: float = 10, request_timeout: float = 30
) -> Iterator[RunningServer]:
    """``baobab serve``'s server on 127.0.0.1 and a free port, in a thread; drained on exit."""
    from baobab.serve.http_command import DrainingServer, server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(
        app, log_level="warning", drain_timeout=drain_timeout, request_timeout=request_timeout
    )
    server = DrainingServer(config, app.state.baobab, drain_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", app, server)
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        if wait_healthy:
            wait_until_healthy(running.url)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become healthy within {timeout} s")


def poll(predicate, timeout: float = 30, every: float = 0.02) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (a bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def served_app(export: Path, api_keys=(), **engine_options):
    """The app of ``baobab serve`` over ``export`` (loaded in the background, as the CLI does)."""
    from baobab.serve.chat import ChatTemplate
    from baobab.serve.config import EngineConfig
    from baobab.serve.launch import load_served_model
    from baobab.serve.server import build_app

    config = EngineConfig(**{**TEST_ENGINE, **engine_options})
    return build_app(
        lambda: load_served_model(str(export), config),
        api_keys=api_keys,
        chat_template=ChatTemplate.for_export(export),
        shutdown_timeout=5,
    )


def metric_values(text: str, name: str) -> dict[tuple, float]:
    """{labels (sorted items): value} of the samples called ``name`` in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }
