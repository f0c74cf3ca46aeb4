"""The JSON half of ``benchmarks/gpu_check.sh``: what the machine is, and every number of a
check gathered into one file.

    python benchmarks/gpu_report.py env --out WORK/env.json
    python benchmarks/gpu_report.py assemble --work WORK --out gpu_check.json [--peak-tflops P]

``assemble`` reads what the shell script left in its work directory (names below) and
writes one JSON object: the machine, each step (ok, failed, timed_out or not_run, with its
seconds and, unless ok, the end of its log), the CUDA tests' counts, training throughput
with MFU against the GPU's nominal (data-sheet) bf16 peak, the ``baobab train`` run's own
logged MFU, and ``baobab bench serve``'s levels. A missing or unreadable input is one line
in ``errors``; the report is written all the same. ``env`` looks the GPU's nominal peak up
with baobab's own ``train.device.known_peak`` (``KNOWN_PEAKS``); ``assemble`` needs only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "baobab.gpu_check/1"
GOAL_MFU = 0.45  # the compass goal for gpt2-124m in bf16 on one GPU
LOG_TAIL_CHARS = 3000
# What gpu_check.sh writes in its work directory.
STEPS_FILE = "steps.tsv"  # name, rc ('-': not run), seconds, timeout_s, note; tab-separated
LOGS_DIR = "logs"  # NAME.log: a step's stdout and stderr
ENV_FILE = "env.json"  # this script's ``env``
JUNIT_FILE = "pytest.xml"  # pytest -m cuda --junitxml
TRAIN_FILE = "train_throughput.json"  # benchmarks/train_throughput.py --out
RUN_METRICS_FILE = "run/metrics.jsonl"  # baobab train's log of the run that is exported
BENCH_FILES = "bench_serve_c*.json"  # baobab bench serve --out, one file per concurrency
TIMED_OUT = (124, 137)  # timeout(1): the limit, then SIGKILL after --kill-after
# Distributions whose versions the report records (importlib.metadata names).
PACKAGES = ("torch", "numpy", "baobab", "jsonargparse", "fastapi", "starlette", "uvicorn",
            "pydantic", "openai", "tokenizers", "safetensors", "xxhash", "pytest")  # fmt: skip


def environment() -> dict[str, Any]:
    """Python, torch, the GPU (name, capability, memory, driver) and package versions."""
    import platform
    from importlib import metadata

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env["packages"] = versions
    try:
        import torch
    except ImportError as err:
        env["error"] = f"torch does not import: {err}"
        return env
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["gpu"]["driver"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["gpu"]["driver"] = None
        try:  # the data sheet's dense bf16 peak, as the progress bar and metrics take it
            from baobab.train.device import known_peak

            env["gpu"]["nominal_bf16_flops"] = known_peak(torch.device("cuda"), "bf16")
        except Exception as err:  # noqa: BLE001 (recorded; assemble then asks for a peak)
            env["gpu"]["nominal_bf16_flops"] = None
            env["gpu"]["nominal_peak_error"] = f"{type(err).__name__}: {err}"
    return env


def nominal_peak(work: Path) -> tuple[float, str] | None:
    """(FLOP/s, source): the GPU's nominal bf16 peak that ``env`` recorded, if any."""
    try:
        gpu = json.loads((work / ENV_FILE).read_text())["gpu"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    flops = gpu.get("nominal_bf16_flops") if isinstance(gpu, dict) else None
    return (float(flops), f"the nominal bf16 peak of {gpu.get('name')}") if flops else None


def read_steps(work: Path) -> list[dict[str, Any]]:
    steps = []
    for line in (work / STEPS_FILE).read_text().splitlines():
        if not line.strip():
            continue
        name, rc, seconds, timeout_s, note = (line.split("\t") + [""] * 5)[:5]
        step: dict[str, Any] = {"name": name, "rc": None if rc == "-" else int(rc),
                                "seconds": float(seconds), "timeout_s": float(timeout_s)}  # fmt: skip
        if step["rc"] is None:
            step["status"] = "not_run"
        elif step["rc"] == 0:
            step["status"] = "ok"
        else:
            step["status"] = "timed_out" if step["rc"] in TIMED_OUT else "failed"
        if note:
            step["note"] = note
        log = work / LOGS_DIR / f"{name}.log"
        if step["status"] in ("failed", "timed_out") and log.is_file():
            step["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        steps.append(step)
    return steps


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and failing test ids from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}  # fmt: skip
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failing}


def train_summary(path: Path, peak: tuple[float, str] | None, goal: float) -> dict[str, Any]:
    """train_throughput.py's result, with MFU against the nominal peak for its device."""
    result = json.loads(path.read_text())
    flops, tps = float(result["train_flops_per_token"]), result["tokens_per_s"]
    out: dict[str, Any] = {
        "model": result.get("model"),
        "device": result.get("device"),
        "params": result.get("params"),
        "batch": result.get("batch"),
        "seq_len": result.get("seq_len"),
        "steps": (result.get("steps_per_round"), result.get("rounds")),
        "tokens_per_s": tps,
        "train_flops_per_token": flops,
        "ratio_baobab_over_baseline": result.get("ratio_baobab_over_baseline"),
        "goal_mfu": goal,
        "benchmark": result,
    }
    if peak is None:
        out["error"] = f"no nominal bf16 peak known for {result.get('device')!r}: pass --peak-tflops"  # fmt: skip
        return out
    out["peak_flops"], out["peak_source"] = peak
    out["mfu"] = {loop: float(v) * flops / peak[0] for loop, v in tps.items()}
    out["meets_goal"] = out["mfu"].get("baobab", 0.0) >= goal
    return out


def run_summary(path: Path) -> dict[str, Any]:
    """The exported run's own metrics.jsonl: its logged loss, tokens/s and MFU."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    logged = [r for r in records if "loss" in r and "step" in r]
    if not logged:
        raise ValueError(f"{path} has no logged training step")
    out: dict[str, Any] = {"steps": logged[-1]["step"], "last_loss": logged[-1]["loss"]}
    later = logged[1:] or logged  # the first logged step includes start-up
    for key in ("tok_per_s", "mfu"):
        values = [r[key] for r in later if key in r]
        if values:
            out[f"{key}_median"] = statistics.median(values)
    return out


def serve_summary(paths: list[Path]) -> dict[str, Any]:
    """``baobab bench serve``'s levels from its files, by concurrency."""
    levels = sorted((lv for p in paths for lv in json.loads(p.read_text())),
                    key=lambda lv: lv["concurrency"])  # fmt: skip
    keep = ("concurrency", "requests", "completed", "failed", "first_error", "duration_s",
            "request_throughput", "output_token_throughput")  # fmt: skip
    rows = []
    for level in levels:
        row = {k: level[k] for k in keep if k in level}
        for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
            if metric in level:
                row[f"{metric}_p50"], row[f"{metric}_p99"] = level[metric]["p50"], level[metric]["p99"]  # fmt: skip
        rows.append(row)
    return {"levels": rows}


def assemble(work: Path, peak: tuple[float, str] | None, goal: float) -> dict[str, Any]:
    report: dict[str, Any] = {"schema": SCHEMA,
                              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    errors: list[str] = []
    status: dict[str, str] = {}

    def part(key: str, file: str, read, step: str | None = None) -> None:
        paths = sorted(p for p in work.glob(file) if p.is_file())  # file may be a pattern
        if not paths:
            report[key] = None
            if step is None or status.get(step) == "ok":  # else the step's status says why
                passed = f" although step {step} passed" if step else ""
                errors.append(f"{key}: {file} was not written{passed}")
            return
        try:
            report[key] = read(paths if "*" in file else paths[0])
        except Exception as err:  # noqa: BLE001 (any failure is one line; the report is written)
            report[key] = None
            errors.append(f"{key}: {file} could not be read: {type(err).__name__}: {err}")

    part("steps", STEPS_FILE, lambda _: read_steps(work))
    steps = report["steps"] or []
    status.update((s["name"], s["status"]) for s in steps)
    report["dry_run"] = bool(steps) and all(s.get("note") == "dry run" for s in steps)
    report["ok"] = bool(steps) and all(s["status"] == "ok" for s in steps)
    report["seconds"] = round(sum(s["seconds"] for s in steps), 1)
    part("env", ENV_FILE, lambda p: json.loads(p.read_text()), "env")
    part("tests", JUNIT_FILE, read_junit, "tests")
    part("train", TRAIN_FILE, lambda p: train_summary(p, peak or nominal_peak(work), goal), "train")  # fmt: skip
    part("train_run", RUN_METRICS_FILE, run_summary, "export")
    part("serve", BENCH_FILES, serve_summary, "serve")
    report["errors"] = errors
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{s['name']:<8} {s['status']:<10} {s['seconds']:6.1f}s  {s.get('note', '')}"
             for s in report.get("steps") or []]  # fmt: skip
    if report.get("tests"):
        t = report["tests"]
        lines.append(f"cuda tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")  # fmt: skip
    train = report.get("train") or {}
    if "mfu" in train:
        lines.append(f"train {train['model']}: {train['tokens_per_s'].get('baobab', 0):,.0f} tok/s, "
                     f"MFU {100 * train['mfu'].get('baobab', 0):.1f}% of {train['peak_source']}, "
                     f"{train['peak_flops'] / 1e12:,.1f} TFLOP/s "
                     f"(goal {100 * train['goal_mfu']:.0f}%)")  # fmt: skip
    for level in (report.get("serve") or {}).get("levels", []):
        lines.append(f"serve c={level.get('concurrency')}: {level.get('output_token_throughput', 0):,.0f} output tok/s")  # fmt: skip
    lines += [f"error: {e}" for e in report.get("errors", [])]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="write the machine's description as JSON")
    env.add_argument("--out", type=Path, required=True)
    asm = sub.add_parser("assemble", help="gather a work directory into one JSON report")
    asm.add_argument("--work", type=Path, required=True, help="gpu_check.sh's work directory")
    asm.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    asm.add_argument("--peak-tflops", type=float, help="override the nominal bf16 peak")
    asm.add_argument("--goal-mfu", type=float, default=GOAL_MFU)
    args = parser.parse_args(argv)
    if args.command == "env":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(environment(), indent=2) + "\n")
        return 0
    if not args.work.is_dir():
        parser.error(f"--work {args.work} is not a directory")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if not 0 < args.goal_mfu <= 1:
        parser.error(f"--goal-mfu must be in (0, 1], got {args.goal_mfu}")
    peak = None if args.peak_tflops is None else (args.peak_tflops * 1e12, "--peak-tflops")
    report = assemble(args.work, peak, args.goal_mfu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(summary_lines(report)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
