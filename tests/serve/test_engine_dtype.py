"""The engine serving in half precision (``--engine.dtype``): the trained reciter's greedy
output, whose predictions are decisive, is the same in bfloat16 and float16 as in float32.

Before the fix the RoPE sign vector stayed float32 and promoted every key to float32, so
the first step of any half-precision RoPE model failed writing the KV cache."""

from __future__ import annotations

import pytest
from engine_helpers import one_torch_thread, tokens_of  # noqa: F401 (autouse)
from serving import TEXT
from test_engine import engine_for, greedy, serve_all


def recital(export, **options) -> list[int]:
    """Greedy tokens after one recital of TEXT, for two recitals' length."""
    prompt = list(TEXT.encode())
    request = {"r": (prompt, greedy(max_tokens=2 * len(prompt)))}
    return tokens_of(serve_all(engine_for(export, **options), request)["r"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_recites_like_float32(lm_export, dtype):
    full = recital(lm_export)
    assert bytes(full).decode() == TEXT * 2  # float32 recites
    assert recital(lm_export, dtype=dtype) == full
