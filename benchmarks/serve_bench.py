"""Serving throughput and latency: ``baobab serve`` against Hugging Face and llama.cpp.

For each model (gpt-mini and the gpt2-124m shape by default), in one run:

1. the weights are written as a baobab export (served by ``baobab serve`` in child
   processes on loopback ports), its int8 and int4 weight-only twins
   (``quantize_export``) and a Hugging Face directory (``baobab.export.export_hf``),
   which ``transformers`` loads in this process and warms up;
2. ``--rounds`` rounds (3), each running every row below back to back, so that each ratio
   is taken within a round (this shared VM's speed moves by a quarter from minute to
   minute) and the median round counts (every round is printed too). ``baobab bench
   serve``'s workloads (``baobab.serve.bench_workloads``; ``--input-len`` 32 and
   ``--output-len`` 64 nominal):

   - ``fixed`` and ``random`` (lengths ½x to 1½x, ``--random-range-ratio``) at every
     ``--concurrency`` (1, 4, 16);
   - ``shared-prefix``: a 512-token system prompt (less where the context is shorter) +
     distinct questions, at 1 and the top concurrency, with prefix caching on and off;
   - ``corpus``: windows of the standard library's source from a prepared corpus built
     here, at 1 and the top concurrency, and at batch 1 with n-gram speculative decoding;
   - ``fixed`` at batch 1 on the int8 and int4 exports;
   - the copy bandwidth (STREAM-style) around the fixed levels: the higher of the two over
     the weight bytes read per token is the batch-1 decode limit;
   - HF ``generate`` while the servers idle: one static batch of the top concurrency's
     fixed prompts, and the random workload's requests in static batches of the top
     concurrency padded to their longest request;

3. HF ``generate`` of ``--hf-requests`` prompts one at a time;
4. greedy text from the server must equal Hugging Face's, and speculative decoding's the
   plain server's.

Rows for EngineConfig fields this baobab lacks (``prefix_caching``, ``speculative``) print
``skipped: <why>``. Then llama.cpp on the 88M Llama shape (d768, 12 layers, vocab 4096,
random weights): the export is written as f32 and q8_0 GGUF files (``baobab.export.gguf``),
served by ``llama-server -np TOP`` beside baobab's fp32 and int8 servers, all driven by the
same load generator; it needs ``$BAOBAB_LLAMA_SERVER`` (a ``llama-server`` binary), and prints
why it is skipped without them.

gpt-mini uses the quickstart checkpoint when ``runs/quickstart`` exists (run ``baobab
quickstart`` first), otherwise a seeded random init; the other shapes are seeded random
inits with a byte-level BPE of their vocabulary size trained here on the standard library's
source, so that (nearly) every id they pick is text. Results: tables on stdout and JSON
under ``benchmarks/results/``.

    python benchmarks/serve_bench.py [--models gpt-mini gpt2-124m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_llama import bench_llama_cpp  # noqa: E402
from serve_peers import HFBaseline, greedy_texts, missing_engine_fields, start_baobab  # noqa: E402
from serve_report import machine, print_model, print_ratios, write_json  # noqa: E402
from serve_rows import (  # noqa: E402
    Launcher,
    Row,
    context_length,
    copy_bandwidth,
    make_exports,
    median_levels,
    medians,
    prepared_corpus,
    run_rows,
    start_servers,
    stop_servers,
    tok_s,
    tpot,
)

from baobab.data.tokenizer import Tokenizer  # noqa: E402
from baobab.export.quantize import quantize_export  # noqa: E402
from baobab.serve.bench_workloads import Workload, make_workload  # noqa: E402
from baobab.serve.loader import weight_bytes  # noqa: E402

__all__ = ["HFBaseline", "make_exports"]  # serve_engine.py imports them from here
SPECULATIVE_TOKENS = 4  # draft tokens an n-gram speculative step proposes
PREFIX_LEN = 512  # the shared-prefix workload's system prompt, where the context allows


def model_rows(
    name: str, args: argparse.Namespace, work: Path, corpus: Path
) -> tuple[Path, Path, dict[str, Workload], dict[str, Row], dict[str, Launcher]]:
    """The exports of ``name``, its workloads, its rows by name and their servers' launchers."""
    export, hf_dir, vocab = make_exports(name, work, args.seed)
    context = context_length(export)
    # int8 with the head quantized too, as llama.cpp's q8_0 (``baobab quantize --head``);
    # serve_engine.py --quantized also times the default export, whose head stays fp32.
    int8 = quantize_export(export, work / f"{name}-int8", bits=8, skip=())
    int4 = quantize_export(export, work / f"{name}-int4", bits=4)
    ends = sorted({1, max(args.concurrency)})
    common = dict(input_len=args.input_len, output_len=args.output_len, vocab=vocab,
                  seed=args.seed)  # fmt: skip
    workloads = {
        "fixed": make_workload("fixed", **common),
        "random": make_workload("random", random_range_ratio=args.random_range_ratio, **common),
        "shared-prefix": make_workload(
            "shared-prefix",
            prefix_len=min(PREFIX_LEN, context - args.input_len - args.output_len),
            **common,
        ),
        "corpus": make_workload("corpus", corpus=str(corpus), tokenizer=str(export), **common),
    }
    cache_skip = missing_engine_fields("prefix_caching")
    spec_skip = missing_engine_fields("speculative", "num_speculative_tokens")
    plain = {} if cache_skip else {"prefix_caching": True}
    launchers = {
        "fp32": lambda: start_baobab(export, plain),
        "int8": lambda: start_baobab(int8, plain),
        "int4": lambda: start_baobab(int4, plain),
        "no-cache": lambda: start_baobab(export, {"prefix_caching": False}),
        "ngram": lambda: start_baobab(export, {**plain, "speculative": "ngram",
                                               "num_speculative_tokens": SPECULATIVE_TOKENS}),
    }  # fmt: skip
    rows = {
        "fixed": Row("baobab", "fp32", workloads["fixed"], args.concurrency),
        "random": Row("baobab", "fp32", workloads["random"], args.concurrency),
        "shared-prefix": Row("baobab", "fp32", workloads["shared-prefix"], ends),
        "corpus": Row("baobab", "fp32", workloads["corpus"], ends),
        "int8": Row("baobab int8 (head too)", "int8", workloads["fixed"], [1]),
        "int4": Row("baobab int4", "int4", workloads["fixed"], [1]),
        "no-cache": Row("baobab, prefix caching off", "no-cache", workloads["shared-prefix"],
                        ends, cache_skip),
        "ngram": Row("baobab, n-gram speculative", "ngram", workloads["corpus"], [1],
                     spec_skip),
    }  # fmt: skip
    return export, hf_dir, workloads, rows, launchers


def round_ratios(rows: dict[str, Row], got: dict[str, list[dict]], top: int) -> dict[str, float]:
    """The ratios of one round from its rows' levels (``got``: levels by row name)."""
    ratios = {
        f"{bits}_vs_fp32_batch1_decode": tpot(got["fixed"], 1) / tpot(got[bits], 1)
        for bits in ("int8", "int4")
    }
    if not rows["no-cache"].skip:
        for c in sorted({1, top}):
            ratios[f"prefix_caching_ttft_gain_c{c}"] = tpot(got["no-cache"], c, "ttft_ms") / tpot(
                got["shared-prefix"], c, "ttft_ms"
            )
    if not rows["ngram"].skip:
        ratios["ngram_vs_plain_batch1_decode"] = tpot(got["corpus"], 1) / tpot(got["ngram"], 1)
    return ratios


def bench_model(name: str, args: argparse.Namespace, work: Path, corpus: Path) -> dict:
    """Every row of one model for ``args.rounds`` rounds, its HF baselines within each round,
    and the greedy checks; the ratios of each round and their medians."""
    export, hf_dir, workloads, rows, launchers = model_rows(name, args, work, corpus)
    top = max(args.concurrency)
    hf = HFBaseline(hf_dir, args.output_len)
    batch = [prompt for prompt, _ in workloads["fixed"].requests(top, args.seed)]
    # the random workload's requests at baobab's top level (run_levels' seed and count)
    padded = workloads["random"].requests(max(8, 4 * top), args.seed + top)
    hf.generate(batch[:1])  # warm-ups: the first call at a shape allocates and picks kernels
    hf.generate(batch)
    weights = weight_bytes(export)
    rounds = []
    servers = start_servers(list(rows.values()), launchers)
    try:
        for r in range(args.rounds):
            before = copy_bandwidth()
            got = dict(zip(rows, run_rows(list(rows.values()), args.seed)))
            after = copy_bandwidth()
            hf_static, _ = hf.generate(batch)  # the servers idle meanwhile
            hf_padded = hf.padded_batches(padded, top)
            limit = max(before, after) / weights
            fixed = got["fixed"]
            rnd = {
                "rows": got,
                "copy_bandwidth_before_after_gb_s": [before / 1e9, after / 1e9],
                "hf_static_batch_tok_s": hf_static,
                "hf_padded_batches_tok_s": hf_padded,
                "fixed_vs_hf_static_batch": tok_s(fixed, top) / hf_static,
                "random_vs_hf_padded_batches": tok_s(got["random"], top) / hf_padded,
                "batch1_decode_tok_s": 1000.0 / tpot(fixed, 1),
                "bandwidth_limit_tok_s": limit,
                "fraction_of_bandwidth_limit": 1000.0 / tpot(fixed, 1) / limit,
                **round_ratios(rows, got, top),
            }
            rounds.append(rnd)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in rnd.items() if isinstance(v, float))
            print(f"{name} round {r + 1}/{args.rounds}: {shown}", flush=True)
        parity = [p for p, _ in workloads["fixed"].requests(args.parity_prompts, args.seed)]
        served = greedy_texts(rows["fixed"].url, parity, args.output_len)
        spec_equal = None
        if not rows["ngram"].skip:
            code = [p for p, _ in workloads["corpus"].requests(args.parity_prompts, args.seed)]
            plain = greedy_texts(rows["fixed"].url, code, args.output_len)
            spec_equal = greedy_texts(rows["ngram"].url, code, args.output_len) == plain
    finally:
        stop_servers(servers)
    singles = [p for p, _ in workloads["fixed"].requests(args.hf_requests, args.seed)]
    hf_single, hf_ids = hf.one_at_a_time(singles)
    tok = Tokenizer.load(export / "tokenizer.json")
    fixed_median = median_levels([rnd["rows"]["fixed"] for rnd in rounds])
    return {
        "model": name,
        "prefix_len": workloads["shared-prefix"].prefix_len,
        "rows": [
            {
                "label": row.label,
                "workload": row.workload.kind,
                "skip": row.skip,
                "levels": median_levels([rnd["rows"][key] for rnd in rounds]),
            }
            for key, row in rows.items()
        ],
        "rounds": rounds,
        "ratios": medians(rounds),
        "hf_one_at_a_time_tok_s": hf_single,
        "fixed_vs_hf_one_at_a_time": tok_s(fixed_median, top) / hf_single,
        "greedy_equal_to_hf": served == [tok.decode(ids) for ids in hf_ids[: len(parity)]],
        "speculative_greedy_equal": spec_equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # --models with no name: only the llama.cpp rows
    parser.add_argument("--models", nargs="*", default=["gpt-mini", "gpt2-124m"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.5)
    parser.add_argument("--hf-requests", type=int, default=8)
    parser.add_argument("--parity-prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the batch-1 decode rate comes from it)")
    print(machine(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepared_corpus(Path(tmp) / "corpus", args.seed)
        for name in args.models:
            results.append(bench_model(name, args, Path(tmp), corpus))
            print_model(results[-1], args)
        llama = bench_llama_cpp(args, Path(tmp))
    print_ratios(results, llama, args)
    write_json(results, llama)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
