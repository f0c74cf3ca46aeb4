"""``baobab train --nproc-per-node N`` goes through torchrun; failures name their rank."""

from __future__ import annotations

import json
import subprocess
import sys

from baobab.launch import WORKER_SCRIPT, split_launch_args, torchrun_args, world_size


def test_launch_flags_are_separated_and_passed_to_torchrun():
    launch, rest = split_launch_args(
        [
            "train",
            "--nproc_per_node=2",
            "--recipe",
            "quickstart",
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            "h:29500",
        ]
    )
    assert rest == ["train", "--recipe", "quickstart"]
    assert world_size(launch) == 4
    assert torchrun_args(launch, rest) == [
        "--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint", "h:29500",
        "--run-path", "--start-method", "forkserver", str(WORKER_SCRIPT), "train", "--recipe", "quickstart",
    ]  # fmt: skip
    assert torchrun_args(["--nproc-per-node", "2"], rest)[0] == "--standalone"


def test_restart_and_address_flags_pass_through():
    argv = ["train", "--max_restarts=3", "--local-addr", "10.77.0.2", "--rdzv-conf", "is_host=0"]
    launch, rest = split_launch_args(argv)
    assert launch == [
        "--max-restarts",
        "3",
        "--local-addr",
        "10.77.0.2",
        "--rdzv-conf",
        "is_host=0",
    ]
    assert rest == ["train"]


def run_baobab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "baobab", *args], capture_output=True, text=True, timeout=300
    )


def test_impossible_layout_is_refused_before_any_worker_starts(tmp_path):
    done = run_baobab(
        "train", "--nproc-per-node", "2", "--parallel.tp", "3", "--train.run_dir", str(tmp_path)
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and "world size" in done.stderr
    assert "rank" not in done.stderr  # nothing was launched


def test_launcher_trains_and_reports_failed_ranks(tiny_corpus, tmp_path):
    args = ["train", "--nproc-per-node", "2", "--model.name", "gpt-nano", "--data.seq_len", "32",
            "--data.batch_size", "2", "--train.max_steps", "3", "--schedule.warmup_steps", "1",
            "--train.progress", "false", "--train.log_every", "1"]  # fmt: skip
    done = run_baobab(
        *args, "--data.path", str(tiny_corpus), "--train.run_dir", str(tmp_path / "ok")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [
        json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # rank 0 alone writes metrics

    done = run_baobab(
        *args, "--data.path", str(tmp_path / "missing"), "--train.run_dir", str(tmp_path / "bad")
    )
    assert done.returncode == 1
    # each worker names itself; torchrun may stop the other one before it prints
    assert "rank 0: error: " in done.stderr or "rank 1: error: " in done.stderr
    assert "has no manifest.json" in done.stderr
    assert "error: the distributed job failed: rank " in done.stdout
