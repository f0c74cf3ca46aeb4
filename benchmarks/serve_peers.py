"""What ``serve_bench.py`` compares baobab with, and the servers it starts.

- :class:`HFBaseline`: ``transformers`` ``generate`` on the Hugging Face twin of an export,
  one prompt at a time, in one static batch of equal lengths, or in static batches padded
  to their longest request (left padding and an attention mask, as HF users batch);
- :func:`start_baobab`: ``baobab serve`` in a child process with ``--engine.X`` flags, and
  :func:`missing_engine_fields`, which names the EngineConfig fields a row needs that this
  baobab lacks (rows for features still being built are skipped with that reason);
- :func:`start_llama_server`: llama.cpp's ``llama-server`` (``$BAOBAB_LLAMA_SERVER``) on a
  GGUF file, with one slot per concurrent request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from baobab.serve.config import EngineConfig

LLAMA_SERVER_ENV, LLAMA_CPP_DIR_ENV = "BAOBAB_LLAMA_SERVER", "BAOBAB_LLAMA_CPP_DIR"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: subprocess.Popen, port: int, what: str, seconds: float = 300) -> str:
    """The server's base URL once ``/health`` answers 200; raises if it exits or times out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{what} exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"{what} did not become healthy within {seconds:.0f} s")


def missing_engine_fields(*names: str) -> str | None:
    """None when EngineConfig has every field in ``names``, else why a row is skipped."""
    have = {f.name for f in dataclasses.fields(EngineConfig)}
    missing = [name for name in names if name not in have]
    return f"EngineConfig has no {', '.join(missing)} field yet" if missing else None


def start_baobab(
    export: Path, engine: dict[str, object] | None = None
) -> tuple[subprocess.Popen, str]:
    """``baobab serve export --engine.KEY VALUE ...`` on a free loopback port; the process
    and its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "baobab", "serve", str(export), "--port", str(port)]
    for key, value in (engine or {}).items():
        cmd += [f"--engine.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return server, wait_healthy(server, port, f"baobab serve {export.name}")


def start_llama_server(
    binary: str, gguf: Path, slots: int, context: int
) -> tuple[subprocess.Popen, str]:
    """``llama-server`` on ``gguf`` with ``slots`` parallel slots of ``context`` tokens each and
    one thread per core (as baobab's engine takes for weights this size)."""
    port = free_port()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(slots * context), "-t", str(threads),
           "-tb", str(threads)]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return server, wait_healthy(server, port, f"llama-server on {gguf.name}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def greedy_texts(base: str, prompts: list[list[int]], output_len: int) -> list[str]:
    """Each prompt's greedy completion of exactly ``output_len`` tokens, one at a time."""
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    texts = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        request = urllib.request.Request(
            f"{base}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as r:
            texts.append(json.loads(r.read())["choices"][0]["text"])
    return texts


class HFBaseline:
    """``transformers`` ``generate`` on the Hugging Face twin of the export: greedy, exactly
    the asked-for new tokens (no early stop), in this process."""

    def __init__(self, hf_dir: Path, output_len: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.options = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        self.output_len = output_len

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        """One ``generate`` call over ``prompts`` as one batch (equal lengths: no padding);
        returns output tokens/s and the new ids of each prompt."""
        start = time.perf_counter()
        ids = self.model.generate(
            torch.tensor(prompts), max_new_tokens=self.output_len, **self.options
        )
        tok_s = len(prompts) * self.output_len / (time.perf_counter() - start)
        return tok_s, ids[:, len(prompts[0]) :].tolist()

    @torch.inference_mode()
    def padded_batches(self, requests: list[tuple[list[int], int]], batch: int) -> float:
        """``requests`` (prompt, output length) in static batches of ``batch`` in order, each
        left-padded to its longest prompt and generating its longest output; returns the
        tokens/s of what was asked for (a shorter request's extra tokens are waste)."""
        start = time.perf_counter()
        for first in range(0, len(requests), batch):
            group = requests[first : first + batch]
            longest = max(len(prompt) for prompt, _ in group)
            ids = torch.zeros(len(group), longest, dtype=torch.long)  # pad id 0, masked out
            mask = torch.zeros(len(group), longest, dtype=torch.long)
            for row, (prompt, _) in enumerate(group):
                ids[row, longest - len(prompt) :] = torch.tensor(prompt)
                mask[row, longest - len(prompt) :] = 1
            new = max(n for _, n in group)
            self.model.generate(ids, attention_mask=mask, max_new_tokens=new, **self.options)
        return sum(n for _, n in requests) / (time.perf_counter() - start)

    def one_at_a_time(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        """Each prompt on its own, one after another; returns the overall tokens/s."""
        start, outputs = time.perf_counter(), []
        for prompt in prompts:
            outputs += self.generate([prompt])[1]
        return len(prompts) * self.output_len / (time.perf_counter() - start), outputs
