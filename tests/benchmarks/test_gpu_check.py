"""``benchmarks/gpu_check.sh`` and ``gpu_report.py`` on CPU: the script's arguments, its dry
run, a failed step recorded while the next one still runs, and the report built from result
files shaped like those the GPU run writes (the CUDA steps themselves need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
REPORT = REPO / "benchmarks" / "gpu_report.py"
H200_BF16 = 989.5e12  # the data sheet's dense bf16 peak, as ``env`` records it


def check(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), "--python", sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def report(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPORT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_plan_and_writes_a_report_of_planned_steps(tmp_path):
    out = tmp_path / "report.json"
    done = check("--dry-run", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--concurrency", "1,16,64", "--budget", "280")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for line in ("install", "tests", "train", "export", "serve", "concurrency 1,16,64", "280s"):
        assert line in done.stdout
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["ok"] is False and result["errors"] == []
    assert [s["name"] for s in result["steps"]] == ["install", "env", "data", "tests", "train", "export", "serve"]  # fmt: skip
    assert {s["status"] for s in result["steps"]} == {"not_run"}
    assert sum(s["timeout_s"] for s in result["steps"]) > 0
    assert not (tmp_path / "report_logs.tar.gz").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "1,,64"], "--concurrency must be positive integers"),
        (["--budget", "10"], "--budget must be at least 30 seconds"),
        (["--train-steps", "0"], "--train-steps must be a positive integer"),
        (["--only", "train,nope"], "--only names an unknown step 'nope'"),
        (["--device", "tpu"], "--device must be cuda, cuda:N or cpu"),
        (["--kv-cache-gib", "0"], "--kv-cache-gib must be a positive number"),
        (["--out"], "--out needs a value"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
    ],
)
def test_bad_arguments_are_one_sentence_and_exit_2(tmp_path, args, message):
    done = check("--dry-run", "--work", str(tmp_path / "w"), *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_a_work_directory_with_other_files_is_not_cleared(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    done = check("--dry-run", "--work", str(tmp_path))
    assert done.returncode == 2 and "holds other files" in done.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_failed_step_is_recorded_and_the_next_one_runs(tmp_path):
    carry = tmp_path / "carry"
    (carry / "stdlib-4096").mkdir(parents=True)
    (carry / "stdlib-4096" / "manifest.json").write_text("{}")  # a "carried" corpus
    out = tmp_path / "report.json"
    # serve first: with no export it fails at once; data then runs and passes.
    done = check("--only", "serve,data", "--carry", str(carry), "--work", str(tmp_path / "work"),
                 "--out", str(out))  # fmt: skip
    assert done.returncode == 1
    result = json.loads(out.read_text())
    serve, data = result["steps"]
    assert (serve["name"], serve["status"], serve["rc"]) == ("serve", "failed", 1)
    assert "the export step failed" in serve["log_tail"]
    assert (data["name"], data["status"], data["rc"]) == ("data", "ok", 0)
    assert "log_tail" not in data
    assert result["ok"] is False and result["dry_run"] is False
    assert result["serve"] is None and result["errors"] == []  # the failed step says why
    with tarfile.open(tmp_path / "report_logs.tar.gz") as logs:  # every step's whole log
        assert {"logs/serve.log", "logs/data.log", "steps.tsv"} <= set(logs.getnames())


def fake_work(work: Path) -> None:
    """A work directory as a GPU run leaves it (numbers invented, shapes real)."""
    (work / "logs").mkdir(parents=True)
    rows = [("install", "0", "12.5", "60", ""), ("tests", "1", "40.2", "75", ""),
            ("train", "124", "90.0", "90", "timed out after 90s"), ("serve", "-", "0", "100",
            "not run: the 280s budget was spent")]  # fmt: skip
    (work / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (work / "logs" / "tests.log").write_text("x" * 5000 + "FAILED tests/serve/test_engine_cuda.py")
    (work / "logs" / "train.log").write_text("round 1: baseline 1.00s")
    gpu = {"name": "NVIDIA H200", "nominal_bf16_flops": H200_BF16}
    (work / "env.json").write_text(json.dumps({"cuda_available": True, "gpu": gpu}))
    (work / "pytest.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.serve.test_engine_cuda" name="test_a"><failure/></testcase>'
        '<testcase classname="tests.train.test_train_cuda" name="test_b"/>'
        "</testsuite></testsuites>"
    )
    train = {"model": "gpt2-124m", "device": "NVIDIA H200", "params": 88_000_000, "batch": 32,
             "seq_len": 1024, "steps_per_round": 20, "rounds": 2, "train_flops_per_token": 6e8,
             "tokens_per_s": {"baseline": 800_000.0, "baobab": 700_000.0},
             "ratio_baobab_over_baseline": 0.875}  # fmt: skip
    (work / "train_throughput.json").write_text(json.dumps(train))
    (work / "run").mkdir()
    records = [{"step": 0, "event": "start"}] + [
        {"step": s, "loss": 9.0 - s / 10, "tok_per_s": 1000.0 * s, "mfu": 0.01 * s} for s in (5, 10, 15, 20)
    ]  # fmt: skip
    (work / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (work / "bench_serve_c16.json").write_text("{not json")


def test_assemble_gathers_every_number_and_records_what_failed(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out" / "gpu_check.json"
    fake_work(work)
    done = report("assemble", "--work", str(work), "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    statuses = {s["name"]: s["status"] for s in result["steps"]}
    assert statuses == {"install": "ok", "tests": "failed", "train": "timed_out", "serve": "not_run"}  # fmt: skip
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["tests"]["log_tail"].endswith("FAILED tests/serve/test_engine_cuda.py")
    assert len(steps["tests"]["log_tail"]) == 3000 and "log_tail" not in steps["install"]
    assert steps["serve"]["note"] == "not run: the 280s budget was spent"
    assert result["ok"] is False and result["seconds"] == pytest.approx(142.7)
    assert result["tests"] == {"tests": 5, "failures": 1, "errors": 0, "skipped": 1, "passed": 3,
                               "failing": ["tests.serve.test_engine_cuda::test_a"]}  # fmt: skip
    train = result["train"]
    assert train["peak_flops"] == H200_BF16
    assert train["peak_source"] == "the nominal bf16 peak of NVIDIA H200"
    mfu = 700_000 * 6e8 / H200_BF16  # 42.4% of 989.5 TFLOP/s
    assert train["mfu"]["baobab"] == pytest.approx(mfu)
    assert train["meets_goal"] is False and train["goal_mfu"] == 0.45
    assert result["train_run"] == {"steps": 20, "last_loss": 7.0, "tok_per_s_median": 15000.0,
                                   "mfu_median": pytest.approx(0.15)}  # fmt: skip
    assert result["serve"] is None
    assert len(result["errors"]) == 1 and result["errors"][0].startswith(
        "serve: bench_serve_c*.json could not be read: JSONDecodeError"
    )
    assert f"MFU {100 * mfu:.1f}% of the nominal bf16 peak of NVIDIA H200, 989.5" in done.stdout


def test_assemble_reads_bench_levels_and_a_given_peak(tmp_path):
    work, out = tmp_path / "work", tmp_path / "r.json"
    fake_work(work)
    level = {"concurrency": 16, "requests": 64, "completed": 64, "failed": 0,
             "request_throughput": 30.0, "output_token_throughput": 3840.0,
             "ttft_ms": {"mean": 9, "p50": 8.0, "p99": 20.0}, "tpot_ms": {"p50": 4.0, "p99": 5.0},
             "itl_ms": {"p50": 4.1, "p99": 6.0}}  # fmt: skip
    (work / "bench_serve_c16.json").write_text(json.dumps([level]))
    (work / "bench_serve_c1.json").write_text(json.dumps([{**level, "concurrency": 1}]))
    with (work / "steps.tsv").open("a") as steps:
        steps.write("export\t0\t30.0\t60\t\n")  # passed, yet its metrics are missing:
    (work / "run" / "metrics.jsonl").unlink()
    done = report("assemble", "--work", str(work), "--out", str(out), "--peak-tflops", "700")
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["train"]["mfu"]["baobab"] == pytest.approx(0.6) and result["train"]["meets_goal"]
    first, row = result["serve"]["levels"]
    assert (first["concurrency"], row["concurrency"]) == (1, 16)  # by concurrency, not name
    assert row["output_token_throughput"] == 3840.0
    assert (row["ttft_ms_p50"], row["tpot_ms_p99"], row["itl_ms_p50"]) == (8.0, 5.0, 4.1)
    assert result["train_run"] is None
    assert result["errors"] == ["train_run: run/metrics.jsonl was not written although step export passed"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["assemble", "--work", "/nonexistent/work", "--out", "x.json"], "is not a directory"),
        (["assemble", "--work", ".", "--out", "x.json", "--peak-tflops", "-1"], "must be positive"),
        (["assemble", "--work", ".", "--out", "x.json", "--goal-mfu", "45"], "must be in (0, 1]"),
        (["assemble", "--out", "x.json"], "--work"),
    ],
)
def test_report_bad_arguments_exit_2(args, message):
    done = report(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_env_describes_this_machine(tmp_path):
    out = tmp_path / "env.json"
    assert report("env", "--out", str(out)).returncode == 0
    env = json.loads(out.read_text())
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["cuda_available"] is torch.cuda.is_available()
    assert ("gpu" in env) is torch.cuda.is_available()
    assert env["packages"]["torch"] and "fastapi" in env["packages"]
