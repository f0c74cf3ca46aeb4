"""baobab against llama.cpp on the 88M Llama shape, at the same precision (for serve_bench.py).

The shape (d768, 12 layers, vocab 4096, random weights) goes out as a baobab export, its
int8 weight-only twin, and f32 and q8_0 GGUF files (``baobab.export.gguf``, written the way
llama.cpp's own converter writes a Llama). Four servers run side by side: ``baobab serve``
on fp32 and int8, ``llama-server -np TOP`` on f32 and q8_0 (as many slots as the top
concurrency). Each round drives each of them with the same fixed
workload at batch 1 and at the top concurrency; the ratios are baobab / llama.cpp for the
batch-1 decode rate (1 / TPOT p50) and for output tokens/s at the top concurrency.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from serve_peers import LLAMA_SERVER_ENV, start_baobab, start_llama_server
from serve_rows import (
    Row,
    context_length,
    make_exports,
    median_levels,
    medians,
    run_rows,
    start_servers,
    stop_servers,
    tok_s,
    tpot,
)

from baobab.export.gguf import GGUF_FILE, export_gguf
from baobab.export.quantize import quantize_export
from baobab.serve.bench_workloads import make_workload
from baobab.serve.chat import DEFAULT_TEMPLATE

SHAPE = "llama-88m"
# (baobab server, llama.cpp server) at each precision the goal names
PAIRS = {"f32": ("baobab fp32", "llama.cpp f32"), "int8": ("baobab int8", "llama.cpp q8_0")}


def why_skipped() -> str | None:
    """None when the environment variable points at a llama-server binary, else one line."""
    binary = os.environ.get(LLAMA_SERVER_ENV)
    if not binary or not os.access(binary, os.X_OK):
        return f"llama.cpp: skipped (set {LLAMA_SERVER_ENV} to a llama-server binary)"
    return None


def bench_llama_cpp(args: argparse.Namespace, work: Path) -> dict:
    """``args.rounds`` rounds of the four servers; {"skipped": why} without llama.cpp."""
    skipped = why_skipped()
    if skipped:
        print(skipped, flush=True)
        return {"skipped": skipped}
    binary = os.environ[LLAMA_SERVER_ENV]
    export, _, vocab = make_exports(SHAPE, work, args.seed)
    context = context_length(export)
    int8 = quantize_export(export, work / f"{SHAPE}-int8", bits=8, skip=())  # as q8_0: head too
    gguf = {
        t: export_gguf(export, work / f"{SHAPE}-{t}", t, DEFAULT_TEMPLATE) / GGUF_FILE
        for t in ("f32", "q8_0")
    }
    top = max(args.concurrency)
    launchers = {
        "baobab fp32": lambda: start_baobab(export),
        "baobab int8": lambda: start_baobab(int8),
        "llama.cpp f32": lambda: start_llama_server(binary, gguf["f32"], top, context),
        "llama.cpp q8_0": lambda: start_llama_server(binary, gguf["q8_0"], top, context),
    }
    fixed = make_workload("fixed", args.input_len, args.output_len, vocab, seed=args.seed)
    rows = [Row(name, name, fixed, sorted({1, top})) for name in launchers]
    rounds = []
    servers = start_servers(rows, launchers)
    try:
        for r in range(args.rounds):
            results = dict(zip(launchers, run_rows(rows, args.seed)))
            rnd: dict = {"rows": list(results.values())}
            for precision, (ours, theirs) in PAIRS.items():
                rnd[f"{precision}_batch1_decode_vs_llama_cpp"] = tpot(results[theirs], 1) / tpot(
                    results[ours], 1
                )
                rnd[f"{precision}_c{top}_tok_s_vs_llama_cpp"] = tok_s(results[ours], top) / tok_s(
                    results[theirs], top
                )
            rounds.append(rnd)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in rnd.items() if isinstance(v, float))
            print(f"{SHAPE} round {r + 1}/{args.rounds}: {shown}", flush=True)
    finally:
        stop_servers(servers)
    return {
        "model": SHAPE,
        "rows": [
            {
                "label": row.label,
                "workload": "fixed",
                "skip": None,
                "levels": median_levels([rnd["rows"][i] for rnd in rounds]),
            }
            for i, row in enumerate(rows)
        ],  # fmt: skip
        "rounds": rounds,
        "ratios": medians(rounds),
    }
