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

    python benchmarks/serve_engine.py [--model gpt-mini] [--concurrency 16] [--profile]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-mini")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
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
