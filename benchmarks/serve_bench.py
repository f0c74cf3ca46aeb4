"""Serving throughput and latency: ``baobab serve`` against Hugging Face ``generate``.

For each model (gpt-mini and the gpt2-124m shape by default):

1. the weights are written twice: as a baobab export (served by ``baobab serve`` in a child
   process on a loopback port) and as a Hugging Face directory (``baobab.export.export_hf``),
   which ``transformers`` loads in this process and warms up;
2. ``--rounds`` rounds (3) of:

   - ``baobab bench serve`` (``baobab.serve.bench``): random prompts of ``--input-len``
     tokens asking for exactly ``--output-len`` tokens, at concurrency 1, 4 and 16;
   - the copy bandwidth (STREAM-style, bytes read + written) just before and just after
     those levels; the higher of the two (the stricter limit) over the weight bytes read
     per token is the batch-1 limit the concurrency-1 decode rate is compared with;
   - HF ``generate`` (greedy, fixed output length) of one static batch of as many prompts
     as the top concurrency, while the server idles;

   this shared VM's speed moves by a quarter from minute to minute, so each ratio is taken
   within a round and the median round counts (every round is printed too);
3. HF ``generate`` of ``--hf-requests`` prompts one at a time, after the server stopped;
4. greedy text from the server must equal Hugging Face's on the same prompts.

gpt-mini uses the quickstart checkpoint when ``runs/quickstart`` exists (run ``baobab
quickstart`` first), otherwise a seeded random init; gpt2-124m is a seeded random init
with a byte-level BPE of its vocabulary size trained here on the standard library's
source, so that (nearly) every id it picks is text: time to first token is measured at the
first streamed text. Results: a table on stdout and JSON under
``benchmarks/results/``.

    python benchmarks/serve_bench.py [--models gpt-mini gpt2-124m] [--output-len 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from baobab import models
from baobab.data import stdlib_files
from baobab.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from baobab.export import export_hf
from baobab.export.artifact import save_exported
from baobab.serve.bench import format_table, run_levels
from baobab.serve.loader import weight_bytes

RESULTS = Path(__file__).parent / "results"


def make_exports(name: str, work: Path, seed: int) -> tuple[Path, Path, int]:
    """A baobab export and an HF directory of ``name``; returns them and the prompt vocab."""
    quickstart = Path("runs/quickstart")
    if name == "gpt-mini" and quickstart.is_dir():
        from baobab.checkpoint import load_trained_model, resolve_checkpoint

        ckpt = resolve_checkpoint(quickstart)
        model, meta = load_trained_model(ckpt)
        described, tokenizer_file = meta["model"], ckpt / "tokenizer.json"
    else:
        torch.manual_seed(seed)
        cfg = models.get_config(name)
        model = models.build_model(cfg)
        described = {"name": name, "family": "gpt", "config": dataclasses.asdict(cfg)}
        tokenizer_file = work / "tokenizer.json"
        tokenizer_for(cfg.vocab_size).save(tokenizer_file)
    tok = Tokenizer.load(tokenizer_file)
    # Prompt ids are 3..vocab-1 (baobab.serve.bench): a BPE's specials are 0-2, the byte
    # tokenizer's 256-258.
    vocab = tok.vocab_size - 3 if tok.eot_id == tok.vocab_size - 3 else tok.vocab_size
    export = save_exported(model, work / f"{name}-export", described, "causal_lm", None,
                           tokenizer_file)  # fmt: skip
    hf = export_hf(model, work / f"{name}-hf", tokenizer_file=tokenizer_file)
    return export, Path(hf), vocab


def tokenizer_for(vocab_size: int) -> Tokenizer:
    """Raw bytes for a vocabulary that small, else a BPE of ``vocab_size`` ids trained on the
    standard library's source (a random model picks ids all over its vocabulary; with a
    byte tokenizer those past 258 stream no text)."""
    if vocab_size <= 259:
        return byte_tokenizer()
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files())
    return train_bpe(texts, vocab_size, min_frequency=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "baobab", "serve", str(export), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not become healthy within 300 s")


def greedy_texts(base: str, prompts: list[list[int]], output_len: int) -> list[str]:
    texts = []
    for prompt in prompts:
        body = {"model": "x", "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        models_url = urllib.request.urlopen(f"{base}/v1/models", timeout=30)
        body["model"] = json.loads(models_url.read())["data"][0]["id"]
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
    ``output_len`` new tokens (no early stop), in this process."""

    def __init__(self, hf_dir: Path, output_len: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.options = dict(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                            pad_token_id=0)  # fmt: skip
        self.output_len = output_len

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        """One ``generate`` call over ``prompts`` as one batch (equal lengths: no padding);
        returns output tokens/s and the new ids of each prompt."""
        start = time.perf_counter()
        ids = self.model.generate(torch.tensor(prompts), **self.options)
        tok_s = len(prompts) * self.output_len / (time.perf_counter() - start)
        return tok_s, ids[:, len(prompts[0]) :].tolist()

    def one_at_a_time(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        """Each prompt on its own, one after another; returns the overall tokens/s."""
        start, outputs = time.perf_counter(), []
        for prompt in prompts:
            outputs += self.generate([prompt])[1]
        return len(prompts) * self.output_len / (time.perf_counter() - start), outputs


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy, counting the read and the write (STREAM)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def median_levels(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency level, the median over rounds of every number (and of every number
    in a nested summary such as ``tpot_ms``)."""
    merged = []
    for same_level in zip(*rounds):
        level = dict(same_level[0])
        for key, value in level.items():
            if isinstance(value, dict):
                level[key] = {k: statistics.median([r[key][k] for r in same_level]) for k in value}
            elif isinstance(value, float):
                level[key] = statistics.median([r[key] for r in same_level])
        merged.append(level)
    return merged


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    """``args.rounds`` rounds of: copy bandwidth, every concurrency level against the
    server, copy bandwidth again, HF's static batch; then HF one at a time and the greedy
    parity check. Each target is a ratio within one round (the two sides minutes apart, not
    tens of minutes), and the median round's ratio is the result."""
    export, hf_dir, vocab = make_exports(name, work, args.seed)
    top = max(args.concurrency)
    rng = random.Random(args.seed)
    singles, batch = ([[rng.randrange(3, vocab) for _ in range(args.input_len)]
                       for _ in range(n)] for n in (args.hf_requests, top))  # fmt: skip
    hf = HFBaseline(hf_dir, args.output_len)
    hf.generate(singles[:1])  # warm-ups: the first call at a shape allocates and picks kernels
    hf.generate(batch)
    weights = weight_bytes(export)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(export, port)
    rounds = []
    try:
        for r in range(args.rounds):
            before = copy_bandwidth()
            levels = run_levels(
                base, args.concurrency, 0, args.input_len, args.output_len, vocab, seed=args.seed
            )
            after = copy_bandwidth()
            hf_static, _ = hf.generate(batch)  # the server is idle meanwhile
            by_level = {level["concurrency"]: level for level in levels}
            decode_tok_s = 1000.0 / by_level[1]["tpot_ms"]["p50"]  # main() asks for level 1
            limit = max(before, after) / weights
            rounds.append({
                "levels": levels,
                "copy_bandwidth_before_after_gb_s": [before / 1e9, after / 1e9],
                "hf_static_batch_tok_s": hf_static,
                "vs_hf_static_batch": by_level[top]["output_token_throughput"] / hf_static,
                "batch1_decode_tok_s": decode_tok_s,
                "bandwidth_limit_tok_s": limit,
                "fraction_of_bandwidth_limit": decode_tok_s / limit,
            })  # fmt: skip
            print(
                f"{name} round {r + 1}/{args.rounds}: concurrency {top} "
                f"{by_level[top]['output_token_throughput']:,.0f} tok/s, HF static batch "
                f"{hf_static:,.0f} tok/s ({rounds[-1]['vs_hf_static_batch']:.2f}x); batch-1 "
                f"{decode_tok_s:.1f} tok/s = {rounds[-1]['fraction_of_bandwidth_limit']:.0%} of "
                f"{limit:.1f} (copy {before / 1e9:.1f} / {after / 1e9:.1f} GB/s)",
                flush=True,
            )
        served = greedy_texts(base, singles[: args.parity_prompts], args.output_len)
    finally:
        server.terminate()
        server.wait(timeout=120)
    hf_single, hf_ids = hf.one_at_a_time(singles)
    tok = Tokenizer.load(export / "tokenizer.json")
    hf_texts = [tok.decode(ids) for ids in hf_ids[: args.parity_prompts]]
    top_tok_s = statistics.median([
        next(lv for lv in rnd["levels"] if lv["concurrency"] == top)["output_token_throughput"]
        for rnd in rounds
    ])  # fmt: skip
    return {
        "model": name,
        "rounds": rounds,
        "levels": median_levels([rnd["levels"] for rnd in rounds]),
        "weight_mb": weights / 1e6,
        "hf_one_at_a_time_tok_s": hf_single,
        "vs_hf_one_at_a_time": top_tok_s / hf_single,
        **{
            key: statistics.median([rnd[key] for rnd in rounds])
            for key in (
                "hf_static_batch_tok_s",
                "vs_hf_static_batch",
                "batch1_decode_tok_s",
                "bandwidth_limit_tok_s",
                "fraction_of_bandwidth_limit",
            )
        },  # fmt: skip
        "greedy_equal_to_hf": served == hf_texts,
    }


def each(rounds: list[dict], key: str, fmt: str) -> str:
    """``key`` of every round, formatted, joined by slashes."""
    return " / ".join(format(rnd[key], fmt) for rnd in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt-mini", "gpt2-124m"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=8)
    parser.add_argument("--parity-prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the batch-1 decode rate comes from it)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result = bench_model(name, args, Path(tmp))
            results.append(result)
            rounds = result["rounds"]
            print(f"\n## {name}: medians of {len(rounds)} rounds\n")
            print(format_table(result["levels"]))
            print(
                f"\nHF generate: one at a time {result['hf_one_at_a_time_tok_s']:,.0f} tok/s, "
                f"static batch of {max(args.concurrency)} {result['hf_static_batch_tok_s']:,.0f} "
                f"tok/s; baobab at concurrency {max(args.concurrency)}: "
                f"{result['vs_hf_one_at_a_time']:.2f}x one at a time, "
                f"{result['vs_hf_static_batch']:.2f}x static batch (rounds: "
                f"{each(rounds, 'vs_hf_static_batch', '.2f')})"
            )
            print(
                f"batch-1 decode {result['batch1_decode_tok_s']:,.1f} tok/s = "
                f"{result['fraction_of_bandwidth_limit']:.0%} of the bandwidth limit "
                f"{result['bandwidth_limit_tok_s']:,.1f} tok/s ({result['weight_mb']:.1f} MB of "
                f"weights; rounds: {each(rounds, 'fraction_of_bandwidth_limit', '.0%')}); greedy "
                f"text equal to HF: {result['greedy_equal_to_hf']}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "serve_bench.json"
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
