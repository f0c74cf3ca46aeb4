"""Serving throughput and latency: ``baobab serve`` against Hugging Face ``generate``, one run.

For each model (gpt-mini and the gpt2-124m shape by default):

1. the weights are written twice: as a baobab export (served by ``baobab serve`` in a child
   process on a loopback port) and as a Hugging Face directory (``baobab.export.export_hf``);
2. ``baobab bench serve`` (``baobab.serve.bench``) sends random prompts of ``--input-len``
   tokens asking for exactly ``--output-len`` tokens, at concurrency 1, 4 and 16;
3. in this process, after the server stopped, ``transformers`` ``generate`` (greedy, fixed
   output length) on the same weights, warmed up like the server: the same prompts one at
   a time, then as one static batch of 16 (the best of three runs);
4. the batch-1 decode rate is compared with the memory-bandwidth limit: copy bandwidth
   measured here (STREAM-style, bytes read + written) over the weight bytes read per token.
   On a shared VM the bandwidth moves by a quarter from minute to minute, so it is measured
   before the server starts and after HF's runs, and the higher (the stricter limit) counts;
5. greedy text from the server must equal Hugging Face's on the same prompts.

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
import socket
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


def hf_generate(
    hf_dir: Path, prompts: list[list[int]], output_len: int, batch: int, repeats: int = 3
) -> dict:
    """Greedy generate of exactly ``output_len`` tokens; tokens/s one at a time and batched.

    Each way is warmed up first (the first call at a new batch shape allocates and picks
    kernels), and the static batch keeps its best of ``repeats`` runs: the baseline at its
    fastest, as the server is measured warm.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # No early stop and no EOS suppression: every sequence gets exactly output_len tokens.
    options = dict(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    group = torch.tensor(prompts[:batch])  # equal lengths: a static batch with no padding
    outputs = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), **options)  # warm-up
        start = time.perf_counter()
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), **options)
            outputs.append(ids[0, len(prompt) :].tolist())
        single = len(prompts) * output_len / (time.perf_counter() - start)
        model.generate(group, **options)  # warm-up
        batched = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(group, **options)
            batched = max(batched, len(group) * output_len / (time.perf_counter() - start))
    return {"one_at_a_time_tok_s": single, "static_batch_tok_s": batched, "ids": outputs}


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


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict:
    export, hf_dir, vocab = make_exports(name, work, args.seed)
    bandwidth_before = copy_bandwidth()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(export, port)
    try:
        levels = run_levels(
            base, args.concurrency, 0, args.input_len, args.output_len, vocab, seed=args.seed
        )
        import random

        rng = random.Random(args.seed)
        prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)]
                   for _ in range(args.hf_requests)]  # fmt: skip
        served = greedy_texts(base, prompts[: args.parity_prompts], args.output_len)
    finally:
        server.terminate()
        server.wait(timeout=120)
    hf = hf_generate(hf_dir, prompts, args.output_len, max(args.concurrency))
    tok = Tokenizer.load(export / "tokenizer.json")
    hf_texts = [tok.decode(ids) for ids in hf["ids"][: args.parity_prompts]]
    bandwidth_after, weights = copy_bandwidth(), weight_bytes(export)
    bandwidth = max(bandwidth_before, bandwidth_after)
    top = next(level for level in levels if level["concurrency"] == max(args.concurrency))
    one = next(level for level in levels if level["concurrency"] == 1)
    decode_tok_s = 1000.0 / one["tpot_ms"]["p50"]
    limit = bandwidth / weights
    return {
        "model": name,
        "levels": levels,
        "hf_one_at_a_time_tok_s": hf["one_at_a_time_tok_s"],
        "hf_static_batch_tok_s": hf["static_batch_tok_s"],
        "vs_hf_one_at_a_time": top["output_token_throughput"] / hf["one_at_a_time_tok_s"],
        "vs_hf_static_batch": top["output_token_throughput"] / hf["static_batch_tok_s"],
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "copy_bandwidth_before_after_gb_s": [bandwidth_before / 1e9, bandwidth_after / 1e9],
        "weight_mb": weights / 1e6,
        "batch1_decode_tok_s": decode_tok_s,
        "bandwidth_limit_tok_s": limit,
        "fraction_of_bandwidth_limit": decode_tok_s / limit,
        "greedy_equal_to_hf": served == hf_texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt-mini", "gpt2-124m"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=8)
    parser.add_argument("--parity-prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result = bench_model(name, args, Path(tmp))
            results.append(result)
            before, after = result["copy_bandwidth_before_after_gb_s"]
            print(f"\n## {name}\n")
            print(format_table(result["levels"]))
            print(
                f"\nHF generate: one at a time {result['hf_one_at_a_time_tok_s']:,.0f} tok/s, "
                f"static batch {result['hf_static_batch_tok_s']:,.0f} tok/s; baobab at "
                f"concurrency {max(args.concurrency)}: {result['vs_hf_one_at_a_time']:.2f}x "
                f"one-at-a-time, {result['vs_hf_static_batch']:.2f}x static batch"
            )
            print(
                f"batch-1 decode {result['batch1_decode_tok_s']:,.0f} tok/s = "
                f"{result['fraction_of_bandwidth_limit']:.0%} of the bandwidth limit "
                f"{result['bandwidth_limit_tok_s']:,.0f} tok/s ({result['weight_mb']:.1f} MB of "
                f"weights, copy bandwidth {result['copy_bandwidth_gb_s']:.1f} GB/s, the higher of "
                f"{before:.1f} before and {after:.1f} after); greedy "
                f"text equal to HF: {result['greedy_equal_to_hf']}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "serve_bench.json"
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
