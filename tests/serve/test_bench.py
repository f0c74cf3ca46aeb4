"""``baobab bench serve`` against a real server: every request completes with exactly the
asked-for tokens, and the summary and JSON hold throughput and latency per level."""

from __future__ import annotations

import json
import math

import pytest

from baobab.cli import main
from baobab.serve.bench import bench_serve, run_level
from baobab.serve.bench_workloads import Workload, make_workload


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
        run_level("http://127.0.0.1:9", 1, 1, Workload(input_len=4, output_len=4), timeout=5)
    # A prompt + max_tokens past the context: the server refuses, the level counts it.
    level = run_level(lm_server.url, 2, 2, Workload(input_len=8, output_len=10_000))
    assert (level["completed"], level["failed"]) == (0, 2)
    assert "HTTP 400" in level["first_error"]


@pytest.mark.parametrize("levels", ["2", "[1,2]"])
def test_bench_serve_cli_takes_one_level_or_a_list(levels, capsys):
    # Both spellings parse; with no server there, the one-sentence error and exit 2 follow.
    # (In this process: the command line's own start-up costs seconds a run.)
    argv = ["bench", "serve", "--url", "http://127.0.0.1:9", "--concurrency", levels,
            "--num_requests", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot reach a server at 'http://127.0.0.1:9'" in err
    assert "Traceback" not in err


def test_workloads_are_seeded_and_keep_their_shapes():
    for kind in ("fixed", "random", "shared-prefix"):
        mix = Workload(kind, input_len=20, output_len=30, vocab=100, prefix_len=512, seed=5)
        assert mix.requests(6, seed=1) == mix.requests(6, seed=1)
        assert mix.requests(6, seed=1) != mix.requests(6, seed=2)
        assert all(3 <= i < 100 for prompt, _ in mix.requests(6, 1) for i in prompt)
    drawn = Workload("random", input_len=20, output_len=30).requests(200, seed=0)
    inputs, outputs = [len(p) for p, _ in drawn], [n for _, n in drawn]
    # uniform in [1/2, 3/2] x nominal, both ends reachable in 200 draws
    assert (min(inputs), max(inputs), min(outputs), max(outputs)) == (10, 30, 15, 45)
    fixed = Workload("fixed", input_len=20, output_len=30).requests(4, seed=0)
    assert {(len(p), n) for p, n in fixed} == {(20, 30)}
    # One system prompt for the whole run (the warm-up's seed too), distinct questions after it.
    mix = Workload("shared-prefix", input_len=8, vocab=100, seed=5)
    prompts = [p for p, _ in mix.requests(4, seed=1) + mix.requests(2, seed=9)]
    assert all(len(p) == 520 and p[:512] == prompts[0][:512] for p in prompts)
    assert len({tuple(p[512:]) for p in prompts}) == len(prompts)
    assert Workload("shared-prefix", seed=6).shared_prefix() != mix.shared_prefix()


def test_corpus_workload_cuts_windows_of_the_given_text(tmp_path, tiny_corpus):
    from baobab.data import byte_tokenizer

    tokenizer = byte_tokenizer().save(tmp_path / "tokenizer.json")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("alpha beta gamma delta " * 4)
    (tmp_path / "text" / "b.py").write_text("def f(x):\n    return x * 2\n" * 3)
    (tmp_path / "text" / "short.md").write_text("too short")
    mix = make_workload("corpus", input_len=16, output_len=5, corpus=str(tmp_path / "text"),
                        tokenizer=str(tokenizer), seed=3)  # fmt: skip
    requests = mix.requests(12, seed=0)
    assert requests == mix.requests(12, seed=0)
    windows = [bytes(prompt).decode() for prompt, _ in requests]
    texts = [(tmp_path / "text" / name).read_text() for name in ("a.txt", "b.py")]
    assert all(len(w) == 16 and any(w in t for t in texts) for w in windows)
    assert {any(w in texts[1] for w in windows), any(w in texts[0] for w in windows)} == {True}
    # A prepared corpus: windows of its val split's documents, decoded back to the source text.
    from baobab.data import stdlib_files

    prepared = make_workload("corpus", input_len=32, corpus=str(tiny_corpus),
                             tokenizer=str(tokenizer))  # fmt: skip
    sources = [p.read_text() for p in stdlib_files()[:40]]
    for prompt, _ in prepared.requests(5, seed=0):
        assert any(bytes(prompt).decode(errors="replace") in s for s in sources)
    with pytest.raises(ValueError, match="no document of .* holds 4096 tokens"):
        make_workload("corpus", input_len=4096, corpus=str(tmp_path / "text"),
                      tokenizer=str(tokenizer))  # fmt: skip


def test_bench_serve_cli_runs_a_workload_and_refuses_bad_flags(lm_server, tmp_path, capsys):
    out = tmp_path / "levels.json"
    argv = ["bench", "serve", "--url", lm_server.url, "--workload", "random",
            "--concurrency", "2", "--num-requests", "3", "--input-len", "6",
            "--output-len", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    [level] = json.loads(out.read_text())
    assert (level["workload"], level["completed"], level["failed"]) == ("random", 3, 0)
    assert 3 * 3 <= level["input_tokens"] <= 3 * 9  # lengths 3..9 for a nominal 6
    for flags, message in [
        (["--workload", "zipf"], "workload must be one of fixed, random, shared-prefix, corpus"),
        (["--workload", "corpus"], "the corpus workload needs --corpus"),
        (["--random_range_ratio", "1.5"], "random_range_ratio must be in [0, 1), got 1.5"),
        (["--workload", "corpus", "--corpus", str(tmp_path), "--tokenizer", str(out)],
         f"'{out}' is not a valid tokenizer.json"),
    ]:  # fmt: skip
        capsys.readouterr()
        assert main(["bench", "serve", "--url", "http://127.0.0.1:9", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
