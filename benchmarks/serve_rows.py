"""The pieces ``serve_bench.py`` runs: its models and corpus, and rows of load on servers.

A :class:`Row` is one engine under one workload at some concurrency levels; rows naming the
same server share one process, started once for every round (:func:`start_servers`).
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from baobab import models
from baobab.data import stdlib_files
from baobab.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from baobab.export import export_hf
from baobab.export.artifact import save_exported
from baobab.serve.bench import run_levels
from baobab.serve.bench_workloads import Workload

# Model names beyond the registry's: the shape named by the llama.cpp goal.
SHAPES = {"llama-88m": ("gpt2-124m", {"vocab_size": 4096})}
CORPUS_FILES = 200  # standard-library modules in the prepared corpus (a fifth is val)

Launcher = Callable[[], tuple[subprocess.Popen, str]]


@dataclass
class Row:
    """``workload`` at ``levels`` on the server ``launchers[server]`` starts; ``skip`` says
    why the row does not run (a feature this baobab lacks)."""

    label: str
    server: str
    workload: Workload
    levels: list[int]
    skip: str | None = None
    url: str = ""


def start_servers(rows: list[Row], launchers: dict[str, Launcher]) -> list[subprocess.Popen]:
    """Start each server a row that runs needs, once; set the rows' URLs."""
    started: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for row in rows:
            if row.skip is None:
                if row.server not in started:
                    started[row.server] = launchers[row.server]()
                row.url = started[row.server][1]
    except BaseException:
        stop_servers([process for process, _ in started.values()])
        raise
    return [process for process, _ in started.values()]


def stop_servers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_rows(rows: list[Row], seed: int) -> list[list[dict]]:
    """One round: every row's levels (``baobab bench serve``), in order; [] for a skipped row."""
    return [
        [] if row.skip else run_levels(row.url, row.levels, 0, row.workload, seed=seed)
        for row in rows
    ]


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


def medians(rounds: list[dict]) -> dict[str, dict]:
    """Median and every round of each number the rounds hold."""
    return {
        key: {
            "median": statistics.median(r[key] for r in rounds),
            "rounds": [r[key] for r in rounds],
        }
        for key, value in rounds[0].items()
        if isinstance(value, float)
    }


def level(levels: list[dict], concurrency: int) -> dict:
    return next(lv for lv in levels if lv["concurrency"] == concurrency)


def tpot(levels: list[dict], concurrency: int, key: str = "tpot_ms") -> float:
    """The p50 of ``key`` (TPOT unless told) at ``concurrency``, in ms."""
    return level(levels, concurrency)[key]["p50"]


def tok_s(levels: list[dict], concurrency: int) -> float:
    return level(levels, concurrency)["output_token_throughput"]


def make_exports(name: str, work: Path, seed: int) -> tuple[Path, Path, int]:
    """A baobab export and an HF directory of ``name``; returns them and the prompt vocab."""
    quickstart = Path("runs/quickstart")
    if name == "gpt-mini" and quickstart.is_dir():
        from baobab.checkpoint import load_trained_model, resolve_checkpoint

        ckpt = resolve_checkpoint(quickstart)
        model, meta = load_trained_model(ckpt)
        described, tokenizer_file = meta["model"], ckpt / "tokenizer.json"
    else:
        registered, overrides = SHAPES.get(name, (name, {}))
        torch.manual_seed(seed)
        cfg = models.get_config(registered, **overrides)
        model = models.build_model(cfg)
        described = {"name": registered, "family": "gpt", "config": dataclasses.asdict(cfg)}
        tokenizer_file = work / f"{name}-tokenizer.json"
        tokenizer_for(cfg.vocab_size).save(tokenizer_file)
    tok = Tokenizer.load(tokenizer_file)
    # Prompt ids are 3..vocab-1 (baobab.serve.bench_workloads): a BPE's specials are 0-2,
    # the byte tokenizer's 256-258.
    vocab = tok.vocab_size - 3 if tok.eot_id == tok.vocab_size - 3 else tok.vocab_size
    export = save_exported(model, work / f"{name}-export", described, "causal_lm", None,
                           tokenizer_file)  # fmt: skip
    hf = export_hf(model, work / f"{name}-hf", tokenizer_file=tokenizer_file)
    return export, Path(hf), vocab


def context_length(export: Path) -> int:
    """The max_seq_len of an export's model."""
    from baobab.export.artifact import read_config

    described = read_config(export)["model"]
    return models.get_config(described["name"], **described["config"]).max_seq_len


def tokenizer_for(vocab_size: int) -> Tokenizer:
    """Raw bytes for a vocabulary that small, else a BPE of ``vocab_size`` ids trained on the
    standard library's source (a random model picks ids all over its vocabulary; with a
    byte tokenizer those past 258 stream no text)."""
    if vocab_size <= 259:
        return byte_tokenizer()
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files())
    return train_bpe(texts, vocab_size, min_frequency=1)


def prepared_corpus(out: Path, seed: int) -> Path:
    """``baobab prepare`` of the first standard-library modules, byte-level (no BPE to
    train): the corpus workload's code prompts come from its val split."""
    from baobab.data import PrepareConfig, prepare

    files = [str(p) for p in stdlib_files()[:CORPUS_FILES]]
    prepare(PrepareConfig(inputs=files, out=str(out), tokenizer="bytes", val_fraction=0.2,
                          seed=seed, workers=1, progress=False))  # fmt: skip
    return out


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
