"""serve_bench.py's output: the machine, a table of rows per model, the ratios, the JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# ratio key (with {top} for the top concurrency) -> (what it compares, target)
TARGETS = {
    "random_vs_hf_padded_batches": (
        "random lengths, concurrency {top}, vs HF static batches of {top} padded", "≥ 1.5×"),
    "fixed_vs_hf_static_batch": ("fixed lengths, concurrency {top}, vs HF static batch", ""),
    "prefix_caching_ttft_gain_c1": ("shared prefix: TTFT p50 without / with prefix caching, "
                                    "concurrency 1", "≥ 3×"),
    "prefix_caching_ttft_gain_c{top}": ("shared prefix: TTFT p50 without / with prefix "
                                        "caching, concurrency {top}", "≥ 3×"),
    "ngram_vs_plain_batch1_decode": ("corpus code prompts: n-gram speculative / plain "
                                     "batch-1 decode", "≥ 1.3×"),
    "int8_vs_fp32_batch1_decode": ("int8 (head too) / fp32 batch-1 decode", "≥ 1.6× (gpt2-124m shape)"),
    "int4_vs_fp32_batch1_decode": ("int4 / fp32 batch-1 decode", ""),
    "fraction_of_bandwidth_limit": ("batch-1 decode / copy-bandwidth limit", "≥ 50%"),
    "f32_batch1_decode_vs_llama_cpp": ("fp32 batch-1 decode vs llama.cpp f32", "≥ 1.0×"),
    "f32_c{top}_tok_s_vs_llama_cpp": ("fp32 concurrency-{top} output tok/s vs llama.cpp f32",
                                      "≥ 1.0×"),
    "int8_batch1_decode_vs_llama_cpp": ("int8 batch-1 decode vs llama.cpp q8_0", "≥ 1.0×"),
    "int8_c{top}_tok_s_vs_llama_cpp": ("int8 concurrency-{top} output tok/s vs llama.cpp "
                                       "q8_0", "≥ 1.0×"),
}  # fmt: skip
SKIPPED_RATIOS = {  # rows that a missing feature skips -> the ratios they feed
    "baobab, prefix caching off": (
        "prefix_caching_ttft_gain_c1",
        "prefix_caching_ttft_gain_c{top}",
    ),
    "baobab, n-gram speculative": ("ngram_vs_plain_batch1_decode",),
}


def machine() -> str:
    """One line: CPU model, cores this process may use, memory, and the software."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import transformers

    return (
        f"machine: {cpu}, {cores} cores for this process, {memory:.0f} GiB; Python "
        f"{sys.version.split()[0]}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), transformers {transformers.__version__}"
    )


def _row(label: str, workload: str, level: dict) -> str:
    return (
        f"| {label} | {workload} | {level['concurrency']} | "
        f"{level['output_token_throughput']:,.0f} | "
        f"{level['ttft_ms']['p50']:.1f} / {level['ttft_ms']['p99']:.1f} | "
        f"{level['tpot_ms']['p50']:.1f} | {level['failed']} |"
    )


def print_model(result: dict, args: argparse.Namespace) -> None:
    """Every row's median levels and the HF baselines, as one markdown table."""
    top = max(args.concurrency)
    rounds = len(result["rounds"])
    print(f"\n## {result['model']}: medians of {rounds} round(s)\n")
    print("| engine | workload | concurrency | output tok/s | TTFT p50 / p99 ms | TPOT p50 ms "
          "| failed |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for row in result["rows"]:
        workload = row["workload"]
        if workload == "shared-prefix" and "prefix_len" in result:
            workload = f"shared-prefix ({result['prefix_len']}-token prefix)"
        if row["skip"]:
            print(f"| {row['label']} | {workload} | | skipped: {row['skip']} | | | |")
        for level in row["levels"]:
            print(_row(row["label"], workload, level))
    ratios = result["ratios"]
    if "hf_static_batch_tok_s" in ratios:
        print(
            f"| HF generate, one at a time | fixed | 1 | {result['hf_one_at_a_time_tok_s']:,.0f} "
            f"| | | |\n| HF generate, static batch | fixed | {top} | "
            f"{ratios['hf_static_batch_tok_s']['median']:,.0f} | | | |\n"
            f"| HF generate, static batches padded to their longest | random | {top} | "
            f"{ratios['hf_padded_batches_tok_s']['median']:,.0f} | | | |"
        )
        print(
            f"\nbaobab at concurrency {top} = {result['fixed_vs_hf_one_at_a_time']:.2f}x HF one "
            f"at a time; batch-1 decode {ratios['batch1_decode_tok_s']['median']:,.1f} tok/s; "
            f"greedy text equal to HF: {result['greedy_equal_to_hf']}; n-gram speculative "
            f"greedy text equal to plain: {result['speculative_greedy_equal']}"
        )


def _shown(key: str, value: float) -> str:
    return f"{value:.0%}" if key.startswith("fraction") else f"{value:.2f}×"


def _ratio_rows(model: str, result: dict, top: int) -> list[str]:
    rows = []
    skipped = {
        key.format(top=top): row["skip"]
        for row in result.get("rows", [])
        if row["skip"]
        for key in SKIPPED_RATIOS.get(row["label"], ())
    }
    for key, (what, target) in TARGETS.items():
        key, what = key.format(top=top), what.format(top=top)
        if key in skipped:
            rows.append(f"| {model} | {what} | skipped: {skipped[key]} | {target} |")
        elif key in result.get("ratios", {}):
            ratio = result["ratios"][key]
            each = " / ".join(_shown(key, v) for v in ratio["rounds"])
            rows.append(
                f"| {model} | {what} | {_shown(key, ratio['median'])} ({each}) | {target} |"
            )
    return rows


def print_ratios(results: list[dict], llama: dict, args: argparse.Namespace) -> None:
    """The ratio table: median round (every round) and target of each comparison."""
    top = max(args.concurrency)
    print("\n## Ratios: median round (every round)\n")
    print("| model | comparison | ratio | target |\n|---|---|---|---|")
    for result in results:
        for line in _ratio_rows(result["model"], result, top):
            print(line)
    if "skipped" in llama:
        print(f"| llama-88m | baobab vs llama.cpp | {llama['skipped']} | ≥ 1.0× |")
    else:
        for line in _ratio_rows(llama["model"], llama, top):
            print(line)
        print_model(llama, args)


def write_json(results: list[dict], llama: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "serve_bench.json"
    out.write_text(
        json.dumps({"machine": machine(), "results": results, "llama_cpp": llama}, indent=2)
    )
    print(f"\nwrote {out}")
