"""Streaming latency of concurrent completions while ``/v1/explain`` runs (issue 16's bound:
no more than 20% slower).

One ``baobab serve`` (a child process, the default engine process) on a random gpt-mini
shaped export (byte tokenizer, so every id streams; ``logprobs: 0`` makes every token its
own event). For ``--rounds`` rounds (5), interleaved so that this shared machine's drifts
hit both arms alike:

- ``alone``: ``--concurrency`` (4) greedy streaming completions of ``--output-len`` (128)
  tokens each, started together;
- ``explaining``: the same, started once an explanation (integrated gradients with up to
  ``--ig-steps`` points for each of a ``--completion-len`` completion's tokens in turn,
  after a ``--prompt-len`` prompt; sized to outlast the streams at the engine's
  ``explain_share``) is running in the engine; the round then waits for the explanation
  to end, and records whether it was still running when the streams ended.

Per arm: the mean inter-token latency (each stream's span between its first and last
token over its tokens - 1, averaged) and the wall time of all streams; the table shows both
arms and their ratio per round, and the median ratio is the result (target <= 1.20).
Results: a table on stdout and ``benchmarks/results/explain_latency.json``.

    python benchmarks/explain_latency.py [--rounds 5] [--concurrency 4] [--output-len 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_peers import start_baobab  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_export(work: Path, seed: int) -> Path:
    """gpt-mini's shape with the byte tokenizer's vocabulary, random weights, exported."""
    import dataclasses

    from baobab import models
    from baobab.data.tokenizer import byte_tokenizer
    from baobab.export.artifact import save_exported

    tokenizer = byte_tokenizer()
    tokenizer.save(work / "tokenizer.json")
    torch.manual_seed(seed)
    cfg = models.get_config("gpt-mini", vocab_size=tokenizer.vocab_size)
    model = models.build_model(cfg)
    described = {"name": "gpt-mini", "family": "gpt", "config": dataclasses.asdict(cfg)}
    return save_exported(
        model, work / "export", described, "causal_lm", None, work / "tokenizer.json"
    )


def stream(url: str, prompt: str, output_len: int, out: list) -> None:
    """One greedy streaming completion; appends each token's arrival time to ``out``."""
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,  # every token is an event, even one that is part of a character
        "stream": True,
    }
    with (
        httpx.Client(timeout=600) as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                choice = json.loads(line[6:])["choices"][0]
                out += [now] * len((choice.get("logprobs") or {}).get("tokens") or [])


def streams(url: str, concurrency: int, output_len: int) -> dict:
    """``concurrency`` streams at once: mean inter-token latency (s) and wall time (s)."""
    arrivals: list[list[float]] = [[] for _ in range(concurrency)]
    start = time.perf_counter()
    threads = [
        threading.Thread(target=stream, args=(url, f"stream {i}: ", output_len, arrivals[i]))
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    itl = [(a[-1] - a[0]) / (len(a) - 1) for a in arrivals]
    assert all(len(a) == output_len for a in arrivals), [len(a) for a in arrivals]
    ttft = statistics.mean(a[0] - start for a in arrivals)
    return {"itl_s": statistics.mean(itl), "ttft_s": ttft, "wall_s": wall}


def explanation_body(prompt_len: int, completion_len: int, ig_steps: int) -> dict:
    text = "the quick brown fox jumps over the lazy dog " * 50
    return {"prompt": text[:prompt_len], "completion": text[:completion_len], "methods": ["ig"],
            "ig_steps": ig_steps, "max_delta": 1e6}  # fmt: skip


def pending(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("baobab_explanations_pending{"))
    return float(line.rsplit(" ", 1)[1])


def explaining_round(url: str, args, body: dict) -> dict:
    """The streams while an explanation runs; whether it outlasted them, and its time."""
    done: dict = {}

    def run() -> None:
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/explain", json=body, timeout=600)
        done.update(status=response.status_code, seconds=time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    while pending(url) < 1:
        time.sleep(0.005)
    time.sleep(0.05)  # taken in by the engine and running
    got = streams(url, args.concurrency, args.output_len)
    got["overlapped"] = "status" not in done
    thread.join()
    assert done["status"] == 200, done
    return {**got, "explain_s": done["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    body = explanation_body(args.prompt_len, args.completion_len, args.ig_steps)
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(Path(tmp), args.seed)
        work = sum(args.prompt_len + i + 1 for i in range(args.completion_len)) * args.ig_steps
        server, url = start_baobab(export, {"explain_max_work": max(work, 65536)})
        try:
            streams(url, args.concurrency, 16)  # warm-up: engine and the explanation model
            start = time.perf_counter()
            assert httpx.post(f"{url}/v1/explain", json=body, timeout=600).status_code == 200
            alone_explain = time.perf_counter() - start
            rounds = []
            for i in range(args.rounds):
                alone = streams(url, args.concurrency, args.output_len)
                busy = explaining_round(url, args, body)
                rounds.append({"alone": alone, "explaining": busy})
                print(f"round {i + 1}: itl {busy['itl_s'] / alone['itl_s']:.3f}x, "
                      f"wall {busy['wall_s'] / alone['wall_s']:.3f}x, ttft "
                      f"{alone['ttft_s'] * 1e3:.0f} / {busy['ttft_s'] * 1e3:.0f} ms",
                      flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=60)
    report(args, rounds, alone_explain)


def report(args, rounds: list[dict], alone_explain: float) -> None:
    print(f"\n{args.concurrency} streams x {args.output_len} tokens; explanation: IG with up "
          f"to {args.ig_steps} points for each of {args.completion_len} tokens after "
          f"{args.prompt_len} ({alone_explain:.2f} s on an idle engine)")  # fmt: skip
    print(f"{'round':>5} {'itl alone ms':>13} {'itl expl. ms':>13} {'ratio':>6} "
          f"{'wall alone s':>13} {'wall expl. s':>13} {'ratio':>6} {'overlap':>8}")  # fmt: skip
    itl_ratios, wall_ratios = [], []
    for i, r in enumerate(rounds):
        a, b = r["alone"], r["explaining"]
        itl_ratios.append(b["itl_s"] / a["itl_s"])
        wall_ratios.append(b["wall_s"] / a["wall_s"])
        print(f"{i + 1:>5} {a['itl_s'] * 1e3:>13.2f} {b['itl_s'] * 1e3:>13.2f} "
              f"{itl_ratios[-1]:>6.3f} {a['wall_s']:>13.2f} {b['wall_s']:>13.2f} "
              f"{wall_ratios[-1]:>6.3f} {str(b['overlapped']):>8}")  # fmt: skip
    result = {"itl_ratio": statistics.median(itl_ratios),
              "wall_ratio": statistics.median(wall_ratios), "target": 1.20}  # fmt: skip
    print(f"median ratio (explaining / alone): inter-token latency {result['itl_ratio']:.3f}, "
          f"wall {result['wall_ratio']:.3f} (target <= 1.20)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "explain_latency.json"
    out.write_text(json.dumps({"args": vars(args), "alone_explain_s": alone_explain,
                               "rounds": rounds, **result}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
