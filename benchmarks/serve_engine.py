"""The serving engine alone against Hugging Face's static batch: step cost without HTTP.

``benchmarks/serve_bench.py`` measures the whole server. This one takes the HTTP process and
the client out, to tell engine cost from serving cost. In one process, for ``--rounds``
rounds (3):

1. baobab's :class:`~baobab.serve.engine.Engine`, loaded from an export as the engine
   process loads it, with the thread count the server would give it, replays what
   ``baobab bench serve`` sends at ``--concurrency`` (16): ``4 x concurrency`` random
   prompts of ``--input-len`` tokens, each asking for exactly ``--output-len`` tokens
   (greedy, no EOS), with a new request added as soon as one finishes;
2. HF ``generate`` of one static batch of ``concurrency`` prompts on the same weights,
   with every core.

Each round prints both throughputs and their ratio, and the median ratio is the result.
``--profile`` also prints torch.profiler's op table for 20 steps of a full batch.

``--quantized`` measures weight-only quantization instead (no HF): ``--model`` with random
weights (default here: gpt2-124m) exported as fp32, then as int8 and int4 (groups of 64)
by ``baobab quantize``'s code; each export's engine, with the threads the server would
give it (``--threads`` overrides), decodes one request (batch 1: the memory-bound case
quantization is for). The engines take turns step by step, so a busy spell on a shared
machine slows all three alike; each round prints each engine's median decode step and
fp32's over the quantized ones', and the result is the median of those ratios. With
``--profile`` it prints the op tables of 20 fp32 and 20 int8 decode steps.

    python benchmarks/serve_engine.py [--model gpt-mini] [--concurrency 16] [--profile]
    python benchmarks/serve_engine.py --quantized [--model gpt2-124m] [--output-len 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from baobab import models
from baobab.data.tokenizer import byte_tokenizer
from baobab.export.artifact import save_exported
from baobab.export.quantize import quantize_export
from baobab.serve.config import EngineConfig
from baobab.serve.loader import load_engine, weight_bytes
from baobab.serve.types import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import HFBaseline, make_exports  # noqa: E402


def replay(engine, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    """``prompts`` through ``engine`` with at most ``concurrency`` in flight, as
    ``baobab bench serve`` sends them; output tokens/s and the median step time."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    queue, steps = list(enumerate(prompts)), []
    start = time.perf_counter()
    for _ in range(concurrency):
        i, prompt = queue.pop(0)
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished():
        begin = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - begin)
        for out in outputs:
            if out.finished and queue:
                i, prompt = queue.pop(0)
                engine.add_request(f"r{i}", prompt, params)
    seconds = time.perf_counter() - start
    return {"tok_s": len(prompts) * output_len / seconds, "step_ms": statistics.median(steps) * 1e3}


def profile(engine, prompts: list[list[int]], output_len: int) -> None:
    """torch.profiler's op table over 20 steps with every prompt decoding."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    for _ in range(5):  # past the prefills
        engine.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def quantized_exports(name: str, work: Path, seed: int) -> dict[str, Path]:
    """fp32, int8 and int4 exports of ``name`` with random weights (a byte tokenizer: the
    prompts are ids below 256; sampling covers the whole vocabulary)."""
    torch.manual_seed(seed)
    cfg = models.get_config(name)
    model = models.build_model(cfg)
    described = {"name": name, "family": "gpt", "config": dataclasses.asdict(cfg)}
    byte_tokenizer().save(work / "tokenizer.json")
    fp32 = save_exported(model, work / "fp32", described, "causal_lm", None,
                         work / "tokenizer.json")  # fmt: skip
    del model
    quantized = {f"int{bits}": quantize_export(fp32, work / f"int{bits}", bits) for bits in (8, 4)}
    # The head too (llama.cpp's q8_0 quantizes its output matrix): the default export keeps
    # a head tied to the embedding in fp32, over a third of an int8 decode step here.
    quantized["int8+head"] = quantize_export(fp32, work / "int8-head", 8, skip=())
    return {"fp32": fp32, **quantized}


def interleaved_decode(
    engines: dict, threads: dict[str, int], prompt: list[int], output_len: int, rid: str
) -> dict[str, float]:
    """One request per engine, the engines stepped in turn (so a busy spell on a shared
    machine slows all alike); each engine's median decode step in ms (prefill left out)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    steps: dict[str, list[float]] = {kind: [] for kind in engines}
    for kind, engine in engines.items():
        torch.set_num_threads(threads[kind])
        engine.add_request(rid, prompt, params)
        engine.step()  # the prompt's prefill
    while any(engine.has_unfinished() for engine in engines.values()):
        for kind, engine in engines.items():
            if engine.has_unfinished():
                torch.set_num_threads(threads[kind])
                begin = time.perf_counter()
                engine.step()
                steps[kind].append(time.perf_counter() - begin)
    return {kind: statistics.median(s) * 1e3 for kind, s in steps.items()}


def quantized_decode(args: argparse.Namespace) -> None:
    """Batch-1 decode of the fp32, int8 and int4 exports, interleaved; prints ratios."""
    config = EngineConfig(separate_process=False, kv_cache_memory_gib=0.25, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        exports = quantized_exports(args.model, Path(tmp), args.seed)
        threads = {k: config.num_threads(weight_bytes(p)) for k, p in exports.items()}
        sizes = {k: weight_bytes(p) / 2**20 for k, p in exports.items()}
        engines = {k: load_engine(p, config) for k, p in exports.items()}
    rng = random.Random(args.seed)
    prompt = [rng.randrange(3, 256) for _ in range(args.input_len)]
    print(f"{args.model}, random weights; batch-1 decode of {args.output_len} tokens after a "
          f"{args.input_len}-token prompt; torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; "
          + ", ".join(f"{k} {sizes[k]:.0f} MiB, {threads[k]} thread(s)" for k in exports))  # fmt: skip
    interleaved_decode(engines, threads, prompt, 8, "warm-up")  # (and first-use set-ups)
    ratios: dict[str, list[float]] = {"int8": [], "int8+head": [], "int4": []}
    for r in range(args.rounds):
        step_ms = interleaved_decode(engines, threads, prompt, args.output_len, f"r{r}")
        for kind in ratios:
            ratios[kind].append(step_ms["fp32"] / step_ms[kind])
        print(f"round {r + 1}/{args.rounds}: median decode step " + "; ".join(
            f"{k} {ms:.1f} ms ({1e3 / ms:.1f} tok/s)" for k, ms in step_ms.items())
            + "; " + ", ".join(f"{k} {v[-1]:.2f}x" for k, v in ratios.items()),
            flush=True)  # fmt: skip
    print(f"{args.model} batch-1 decode vs fp32 (median of {args.rounds} rounds): " + ", ".join(
        f"{k} {statistics.median(v):.2f}x" for k, v in ratios.items()))  # fmt: skip
    for kind in ("fp32", "int8") if args.profile else ():
        print(f"\n{kind}:")
        torch.set_num_threads(threads[kind])
        profile(engines[kind], [prompt], args.output_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="gpt-mini (default), gpt2-124m with --quantized"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--quantized", action="store_true", help="fp32 vs int8 (head fp32 or int8) vs int4 decode"
    )
    parser.add_argument("--threads", type=int, default=0, help="--quantized: 0 = the server's")
    args = parser.parse_args()
    if args.quantized:
        args.model = args.model or "gpt2-124m"
        quantized_decode(args)
        return
    args.model = args.model or "gpt-mini"
    cores = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        export, hf_dir, vocab = make_exports(args.model, Path(tmp), args.seed)
        config = EngineConfig(separate_process=False)
        engine_threads = config.num_threads(weight_bytes(export))
        engine = load_engine(export, config)
        hf = HFBaseline(hf_dir, args.output_len)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.input_len)]
               for _ in range(4 * args.concurrency)]  # fmt: skip
    batch = prompts[: args.concurrency]
    torch.set_num_threads(engine_threads)
    replay(engine, batch, args.concurrency, 8)  # warm-ups
    torch.set_num_threads(cores)
    hf.generate(batch)
    ratios = []
    for r in range(args.rounds):
        torch.set_num_threads(engine_threads)
        ours = replay(engine, prompts, args.concurrency, args.output_len)
        torch.set_num_threads(cores)
        theirs, _ = hf.generate(batch)
        ratios.append(ours["tok_s"] / theirs)
        print(
            f"round {r + 1}/{args.rounds}: engine ({engine_threads} thread(s)) "
            f"{ours['tok_s']:,.0f} tok/s, step p50 {ours['step_ms']:.2f} ms; HF static batch "
            f"of {args.concurrency} ({cores} threads) {theirs:,.0f} tok/s; {ratios[-1]:.2f}x",
            flush=True,
        )
    print(
        f"{args.model}: the engine alone at concurrency {args.concurrency} is "
        f"{statistics.median(ratios):.2f}x HF's static batch (median of {args.rounds} rounds)"
    )
    if args.profile:
        torch.set_num_threads(engine_threads)
        profile(engine, batch, args.output_len)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
