"""``baobab bench serve`` against a real server: every request completes with exactly the
asked-for tokens, and the summary and JSON hold throughput and latency per level."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from baobab.serve.bench import bench_serve, run_level


def test_bench_serve_reports_every_level(lm_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    levels = bench_serve(
        lm_server.url, concurrency=[1, 3], num_requests=3, input_len=5, output_len=7,
        vocab=256, out=str(out),
    )  # fmt: skip
    assert [level["concurrency"] for level in levels] == [1, 3]
    for level in levels:
        assert (level["requests"], level["completed"], level["failed"]) == (3, 3, 0)
        # ignore_eos: 3 requests x exactly 7 tokens over the level's wall time
        expected = 3 * 7 / level["duration_s"]
        assert level["output_token_throughput"] == pytest.approx(expected)
        for key in ("ttft_ms", "tpot_ms", "itl_ms"):
            stats = level[key]
            assert all(math.isfinite(stats[p]) and stats[p] >= 0 for p in ("mean", "p50", "p99"))
            assert stats["p50"] <= stats["p99"]
    assert json.loads(out.read_text()) == levels
    assert "| 3 | " in capsys.readouterr().out  # the markdown table, one row per level


def test_bench_serve_refuses_bad_settings_and_reports_failures(lm_server):
    with pytest.raises(ValueError, match="vocab must be at least 4"):
        bench_serve(lm_server.url, vocab=3)
    with pytest.raises(ValueError, match="output_len must be positive"):
        bench_serve(lm_server.url, output_len=0)
    with pytest.raises(ValueError, match="cannot reach a server"):
        run_level("http://127.0.0.1:9", 1, 1, 4, 4, 256, timeout=5)
    # A prompt + max_tokens past the context: the server refuses, the level counts it.
    level = run_level(lm_server.url, 2, 2, 8, 10_000, 256)
    assert (level["completed"], level["failed"]) == (0, 2)
    assert "HTTP 400" in level["first_error"]


@pytest.mark.parametrize("levels", ["2", "[1,2]"])
def test_bench_serve_cli_takes_one_level_or_a_list(levels):
    # Both spellings parse; with no server there, the one-sentence error and exit 1 follow.
    cmd = [sys.executable, "-m", "baobab", "bench", "serve", "--url", "http://127.0.0.1:9",
           "--concurrency", levels, "--num_requests", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "cannot reach a server at 'http://127.0.0.1:9'" in run.stderr
    assert "Traceback" not in run.stderr
