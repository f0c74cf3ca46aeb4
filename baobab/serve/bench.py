"""``baobab bench serve``: load a running OpenAI-compatible server, like vLLM's ``bench serve``.

For each concurrency level, ``num_requests`` streaming completions of token-id prompts from
a seeded workload (``baobab.serve.bench_workloads``: fixed or random lengths, a shared
system prompt, or real text from a corpus) each ask for exactly their output length
(``ignore_eos``). At most ``concurrency`` requests are in flight at once. Reported per level:

- request and output-token throughput over the level's wall time;
- TTFT: time from sending a request to its first streamed token;
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1) per request;
- ITL: every gap between consecutive streamed token chunks;

as mean, p50 and p99. One warm-up request goes first and is not counted. The client is the
standard library's ``http.client`` in threads, so the benchmark needs nothing beyond
baobab itself.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from baobab.serve.bench_workloads import Workload, make_workload


@dataclass
class RequestTiming:
    ok: bool
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, end to end
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # seconds between token chunks
    error: str = ""


def _stream_completion(
    base: str, api_key: str | None, model: str, prompt: list[int], output_len: int, timeout: float
) -> RequestTiming:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    try:
        conn.request("POST", f"{url.path.rstrip('/')}/v1/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            return RequestTiming(False, error=f"HTTP {response.status}: {response.read()[:200]!r}")
        timing, last, chunks = RequestTiming(True), None, 0
        for raw in response:  # SSE: "data: {...}" lines separated by blank lines
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                timing.output_tokens = chunk["usage"]["completion_tokens"]
            if not any(c.get("text") for c in chunk.get("choices", [])):
                continue
            chunks += 1
            if last is None:
                timing.ttft = now - start
            else:
                timing.itl.append(now - last)
            last = now
        timing.latency = time.perf_counter() - start
        # A server that reports no usage (llama.cpp's, in some versions) streams one token per
        # chunk.
        timing.output_tokens = timing.output_tokens or chunks
        return timing
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
        return RequestTiming(False, error=str(err))
    finally:
        conn.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    array = np.asarray(values) * 1000.0  # milliseconds
    return {
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p99": float(np.percentile(array, 99)),
    }


def _server_model(base: str, api_key: str | None, timeout: float) -> str:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        conn.request("GET", f"{url.path.rstrip('/')}/v1/models", headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise ValueError(f"'{base}/v1/models' answered HTTP {response.status}")
        return json.loads(response.read())["data"][0]["id"]
    except OSError as err:
        raise ValueError(f"cannot reach a server at '{base}' ({err})") from None
    finally:
        conn.close()


def run_level(
    base: str,
    concurrency: int,
    num_requests: int,
    workload: Workload,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """One concurrency level of ``num_requests`` requests drawn from ``workload`` with
    ``seed``; returns its throughput and latency summary."""
    model = _server_model(base, api_key, timeout)
    requests = workload.requests(num_requests, seed)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        timings = list(
            pool.map(
                lambda r: _stream_completion(base, api_key, model, r[0], r[1], timeout), requests
            )
        )
    duration = time.perf_counter() - start
    done = [t for t in timings if t.ok]
    failed = [t.error for t in timings if not t.ok]
    tokens = sum(t.output_tokens for t in done)
    tpot = [(t.latency - t.ttft) / (t.output_tokens - 1) for t in done if t.output_tokens > 1]
    return {
        "workload": workload.kind,
        "concurrency": concurrency,
        "requests": len(timings),
        "completed": len(done),
        "failed": len(failed),
        "first_error": failed[0] if failed else None,
        "duration_s": duration,
        "input_tokens": sum(len(prompt) for prompt, _ in requests),
        "request_throughput": len(done) / duration,
        "output_token_throughput": tokens / duration,
        "ttft_ms": _percentiles([t.ttft for t in done]),
        "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles([gap for t in done for gap in t.itl]),
    }


def run_levels(
    base: str,
    levels: list[int],
    num_requests: int,
    workload: Workload,
    api_key: str | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One warm-up request, not counted, then :func:`run_level` for each concurrency in
    ``levels`` with ``num_requests`` requests (0: 4 x concurrency, at least 8)."""
    # The warm-up as vLLM's bench sends it: the server's first steps allocate and pick kernels.
    run_level(base, 1, 1, workload, api_key, seed - 1)
    return [
        run_level(base, c, num_requests or max(8, 4 * c), workload, api_key, seed + c)
        for c in levels
    ]


def format_table(levels: list[dict[str, Any]]) -> str:
    """A markdown table of run_level results."""
    rows = [
        "| concurrency | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        rows.append(
            f"| {r['concurrency']} | {r['request_throughput']:.2f} | "
            f"{r['output_token_throughput']:,.0f} | "
            f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
            f"{r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p99']:.1f} | "
            f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} | {r['failed']} |"
        )
    return "\n".join(rows)


def bench_serve(
    url: str = "http://127.0.0.1:8000",
    concurrency: int | list[int] | None = None,
    num_requests: int = 0,
    workload: str = "fixed",
    input_len: int = 32,
    output_len: int = 64,
    vocab: int = 256,
    random_range_ratio: float = 0.5,
    prefix_len: int = 512,
    corpus: str | None = None,
    tokenizer: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
    out: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark a running server: throughput, TTFT, TPOT and ITL at several concurrencies.

    Args:
        url: the server's base URL.
        concurrency: one level (``16``) or levels to run in order (``[1,4,16]``, the default).
        num_requests: requests per level (0: 4 x concurrency, at least 8).
        workload: ``fixed`` (random ids, fixed lengths), ``random`` (lengths uniform in
            [1 - r, 1 + r] x nominal), ``shared-prefix`` (one ``prefix_len``-token system
            prompt + distinct ``input_len``-token questions) or ``corpus`` (windows of real
            text from ``corpus``, encoded with ``tokenizer``).
        input_len: prompt length in tokens (nominal for ``random``; the question's for
            ``shared-prefix``).
        output_len: tokens generated per request (the server ignores end-of-text).
        vocab: random prompt ids are drawn from 3..vocab-1; keep it within the model's
            tokenizer.
        random_range_ratio: r of the ``random`` workload, in [0, 1) (vLLM's flag).
        prefix_len: tokens of the ``shared-prefix`` workload's system prompt.
        corpus: text files, a directory of them, or a prepared corpus (``corpus`` workload).
        tokenizer: the served model's tokenizer.json, or a directory holding one such as
            its export (``corpus`` workload).
        api_key: sent as a Bearer token when the server requires one.
        seed: seeds the prompts and lengths.
        out: also write the results as JSON to this file.
    """
    levels = [concurrency] if isinstance(concurrency, int) else (concurrency or [1, 4, 16])
    if any(c < 1 for c in levels) or num_requests < 0:
        raise ValueError("concurrency levels must be at least 1 and num_requests 0 or more")
    mix = make_workload(workload, input_len, output_len, vocab, random_range_ratio, prefix_len,
                        corpus, tokenizer, seed)  # fmt: skip
    results = run_levels(url, levels, num_requests, mix, api_key, seed)
    print(format_table(results))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    return results
