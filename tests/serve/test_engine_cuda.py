"""The serving engine on a CUDA GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs
these): greedy tokens on the GPU equal the CPU's, in float32 for random tiny gpts (logprobs
within 1e-3) and in bfloat16 for the trained reciter, whose predictions are decisive."""

from __future__ import annotations

import pytest
from engine_helpers import (
    GPT2,
    LLAMA,
    export_gpt,
    one_torch_thread,  # noqa: F401 (autouse)
    random_gpt,
    tokens_of,
)
from test_engine import engine_for, greedy, prompts, serve_all
from test_engine_dtype import recital

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("variant", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_float32_greedy_on_cuda_equals_cpu(tmp_path, variant):
    export = export_gpt(tmp_path, random_gpt(seed=4, **variant))
    requests = {str(i): (ids, greedy(max_tokens=16, logprobs=1))
                for i, ids in enumerate(prompts(6, seed=9))}  # fmt: skip
    cpu = serve_all(engine_for(export), requests)
    engine = engine_for(export, device="cuda", max_num_seqs=8)
    assert engine.runner.device.type == "cuda"
    gpu = serve_all(engine, requests)  # six requests batched together on the GPU
    for rid in requests:
        assert tokens_of(gpu[rid]) == tokens_of(cpu[rid])
        got = [lp.logprob for o in gpu[rid] for lp in o.logprobs]
        want = [lp.logprob for o in cpu[rid] for lp in o.logprobs]
        assert got == pytest.approx(want, abs=1e-3)


def test_bfloat16_engine_on_cuda_recites_like_cpu(lm_export):
    assert recital(lm_export, device="cuda", dtype="bfloat16") == recital(lm_export)
