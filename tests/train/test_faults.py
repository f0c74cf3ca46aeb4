"""Bad numbers, determinism, restarts and hangs, with real faults (no mocks).

Faults are made with ``BAOBAB_FAULT_INJECT`` (a real NaN or spike in the loss of a step,
a real sleep inside a step); restarts are planned from the same environment torchrun
gives its workers (``TORCHELASTIC_RUN_ID``, ``TORCHELASTIC_RESTART_COUNT``), in one
process here; tests/train/test_elastic.py kills real workers under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from baobab import data as bdata
from baobab.checkpoint import load_checkpoint, load_trained_model, load_trainer_state
from baobab.cli import parse_run_config
from baobab.train import TrainingError, build_trainer, run
from baobab.train.config import FaultConfig
from baobab.train.faults import INJECT_ENV, FaultInjector, write_note
from baobab.train.watchdog import HANG_EXIT_CODE

GOLDEN = Path(__file__).with_name("golden") / "gpt_nano_losses.json"


def args(corpus: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--model.name", "gpt-nano", "--data.path", str(corpus), "--data.seq_len", "32",
        "--data.batch_size", "4", "--optim.name", "adamw", "--optim.lr", "0.003",
        "--schedule.warmup_steps", "2", "--train.max_steps", str(steps), "--train.log_every", "1",
        "--train.progress", "false", "--train.run_dir", str(run_dir), "--train.threads", "1",
        "--train.peak_flops", "1e12", "--train.eval_batches", "1", "--deterministic", *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_determinism():
    """build_trainer turns on deterministic kernels process-wide (run() turns them off)."""
    yield
    torch.use_deterministic_algorithms(False)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trained_state(cfg, checkpoint: Path) -> tuple[dict, dict]:
    """(weights, optimizer state) a checkpoint loads into a freshly built trainer."""
    trainer = build_trainer(cfg)
    load_checkpoint(checkpoint, trainer.parts, trainer.optimizers)
    return trainer.model.state_dict(), trainer.optimizers[0].state_dict()


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """Same weights and optimizer state; only the scheduled lr may differ (the schedule
    follows the step counter, skipped steps included)."""
    for name, value in a[0].items():
        assert torch.equal(value, b[0][name]), name
    groups = [[{k: v for k, v in g.items() if k != "lr"} for g in s["param_groups"]] for s in (a[1], b[1])]  # fmt: skip
    assert groups[0] == groups[1]
    for pid, tensors in a[1]["state"].items():
        for key, value in tensors.items():
            assert torch.equal(value, b[1]["state"][pid][key]), (pid, key)


def test_a_nan_step_keeps_the_weights_and_k_in_a_row_stop_the_run(tiny_corpus, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv(INJECT_ENV, "nan@4")
    run_dir = tmp_path / "one"
    cfg = parse_run_config(args(tiny_corpus, run_dir, 5, "--train.save_every", "1", "--train.keep_last", "9"))  # fmt: skip
    result = run(cfg)
    assert math.isnan(result.losses[3]) and all(math.isfinite(x) for x in result.losses[4:])
    ckpts = run_dir / "checkpoints"
    assert_same_state(trained_state(cfg, ckpts / "step_00000003"), trained_state(cfg, ckpts / "step_00000004"))  # fmt: skip
    by_step = {}
    for r in records(run_dir):
        by_step.setdefault(r["step"], []).append(r)
    skipped = [r for r in by_step[4] if r.get("event") == "skipped_step"]
    assert skipped and skipped[0]["reason"] == "non-finite loss (nan)"
    assert skipped[0]["nonfinite_steps"] == 1 and not any("loss" in r for r in by_step[4])
    assert [r["skipped_steps"] for r in by_step[5] if "loss" in r] == [1]

    monkeypatch.setenv(INJECT_ENV, "nan@3-5")
    run_dir = tmp_path / "three"
    message = (
        r"3 updates in a row were skipped, the last for a non-finite loss \(nan\) at step 5; "
        r"stopped, the last good checkpoint is .*step_00000004"
    )
    with pytest.raises(TrainingError, match=message):
        run(parse_run_config(args(tiny_corpus, run_dir, 8, "--train.save_every", "2")))
    model, meta = load_trained_model(run_dir)
    assert meta["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())
    note = json.loads((run_dir / "faults" / "rank_00000.json").read_text())
    assert note["fatal"] and "3 updates in a row were skipped" in note["cause"]


def test_the_spike_guard_skips_a_spike_and_its_state_resumes_with_the_run(tiny_corpus, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv(INJECT_ENV, "spike@7")
    guard = ["--fault.spike_factor", "3", "--fault.spike_window", "3", "--train.save_every", "5"]
    whole = run(parse_run_config(args(tiny_corpus, tmp_path / "whole", 9, *guard)))
    spikes = [r for r in records(tmp_path / "whole") if r.get("event") == "skipped_step"]
    assert [(r["step"], r["spike_steps"]) for r in spikes] == [(7, 1)]
    assert spikes[0]["reason"].startswith("loss spike (") and "over 3 x the recent mean" in spikes[0]["reason"]  # fmt: skip
    saved = load_trainer_state(tmp_path / "whole" / "checkpoints" / "step_00000005")["guard"]
    assert saved["recent"] == whole.losses[2:5] and saved["consecutive"] == 0
    # Resumed from step 5, the restored guard judges step 7 exactly as the whole run did.
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_00000005", split / "checkpoints" / "step_00000005")  # fmt: skip
    resumed = run(parse_run_config(args(tiny_corpus, split, 9, *guard, "--train.resume", "true")))
    assert resumed.losses == whole.losses[5:]  # bit-identical, the spike included


def test_skips_between_reads_are_reported_in_order_and_held_after_the_limit(tiny_corpus, tmp_path, monkeypatch):  # fmt: skip
    """The host reads the loss every 4 steps only: steps 2 and 3 (NaN) are judged on the
    device; the limit of 2 in a row is reached at step 3, so step 4's update is held and
    the run stops at the read after step 4, naming step 3, with the weights of step 1."""
    monkeypatch.setenv(INJECT_ENV, "nan@2-3")
    run_dir = tmp_path / "run"
    cfg = parse_run_config(args(tiny_corpus, run_dir, 8, "--train.log_every", "4", "--fault.max_skipped_steps", "2"))  # fmt: skip
    trainer = build_trainer(cfg)
    weights, step = [], trainer._train_step

    def step_and_keep_the_weights():
        out = step()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
        return out

    trainer._train_step = step_and_keep_the_weights
    message = r"2 updates in a row were skipped, the last for a non-finite loss \(nan\) at step 3"
    with pytest.raises(TrainingError, match=message):
        trainer.fit()
    assert len(weights) == 4  # steps 1-4 ran; the read after step 4 stopped the run
    for later in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], later))
    assert [(r["step"], r["skipped_steps"]) for r in records(run_dir) if r.get("event") == "skipped_step"] == [(2, 1), (3, 2)]  # fmt: skip
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def golden_corpus(tmp_path_factory) -> Path:
    """A byte-level corpus from text made here, the same on every machine and Python."""
    root = tmp_path_factory.mktemp("golden")
    rng = random.Random(0)
    words = ["the", "a", "of", "and", "tree", "root", "leaf", "branch", "seed", "grows", "water"]
    words += ["sun", "baobab", "trunk", "bark"]
    files = []
    for i in range(10):
        lines = (" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(200))
        files.append(root / f"doc{i}.txt")
        files[-1].write_text("\n".join(lines))
    out = root / "corpus"
    bdata.prepare(bdata.PrepareConfig(inputs=[str(f) for f in files], out=str(out), tokenizer="bytes", val_fraction=0.2, workers=1, progress=False))  # fmt: skip
    return out


def test_deterministic_runs_repeat_bit_for_bit_and_match_the_golden_losses(golden_corpus, tmp_path):  # fmt: skip
    """Two runs with one seed give identical losses; the losses match the golden file.

    The file guards against accidental numeric changes; after an intended one, regenerate
    it with ``BAOBAB_UPDATE_GOLDEN=1 pytest tests/train/test_faults.py -k golden``. Its
    tolerance (1e-6 relative) allows last-bit differences between CPUs' kernels only.
    """
    first = run(parse_run_config(args(golden_corpus, tmp_path / "a", 10)))
    assert not torch.are_deterministic_algorithms_enabled()  # train.deterministic ends with run
    second = run(parse_run_config(args(golden_corpus, tmp_path / "b", 10)))
    assert first.losses == second.losses
    if os.environ.get("BAOBAB_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"model": "gpt-nano", "losses": first.losses}, indent=1) + "\n")  # fmt: skip
    golden = json.loads(GOLDEN.read_text())["losses"]
    torch.testing.assert_close(torch.tensor(first.losses), torch.tensor(golden), rtol=1e-6, atol=0)


def test_an_elastic_restart_resumes_from_the_newest_complete_checkpoint(tiny_corpus, tmp_path, monkeypatch):  # fmt: skip
    """torchrun's restart environment in one process: what a restarted attempt does."""
    run_dir = tmp_path / "run"
    cfg = parse_run_config(args(tiny_corpus, run_dir, 6, "--train.save_every", "2"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = run(cfg)
    assert json.loads((run_dir / "job.json").read_text()) == {"job": "job-a"}
    # What a crash leaves: a half-written save, a damaged newest checkpoint, a torn metrics
    # line, and a note from the rank that saw its peer die.
    ckpts = run_dir / "checkpoints"
    (ckpts / ".tmp-step_00000008").mkdir()
    os.truncate(ckpts / "step_00000006" / "__0_0.distcp", 10)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    write_note(run_dir, 1, "rank 1: RuntimeError: Connection closed by peer")

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = run(replace(cfg, train=replace(cfg.train, max_steps=8)))
    restart = [r for r in records(run_dir) if r.get("event") == "restart"]
    assert len(restart) == 1 and restart[0]["restart"] == 1
    assert restart[0]["step"] == 4 and restart[0]["checkpoint"] == "step_00000004"
    assert restart[0]["cause"] == "rank 1: RuntimeError: Connection closed by peer"
    ignored = {i["checkpoint"]: i["reason"] for i in restart[0]["ignored"]}
    assert ignored[".tmp-step_00000008"] == "interrupted save (no meta.json)"
    assert "shard __0_0.distcp is truncated" in ignored[".tmp-broken-step_00000006"]
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, 9))  # the lost steps 5-6 once, redone
    assert again.losses[:2] == first.losses[4:6]  # and redone bit for bit
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the next save swept

    # No complete checkpoint yet: the restart starts over and drops the partial metrics.
    shutil.rmtree(ckpts)
    run(replace(cfg, train=replace(cfg.train, max_steps=3)))
    restarts = [r for r in records(run_dir) if r.get("event") == "restart"]
    assert restarts[-1]["step"] == 0 and restarts[-1]["checkpoint"] is None
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3]

    # Another job never adopts the directory; a run stopped for good is not restarted.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    write_note(run_dir, 0, "rank 0: TrainingError: 3 updates in a row were skipped", fatal=True)
    with pytest.raises(TrainingError, match="not restarting: rank 0 stopped the run for good"):
        run(cfg)


def test_a_hang_makes_every_rank_exit_non_zero_naming_the_stalled_rank(tiny_corpus, tmp_path):
    """Two workers with torchrun's environment, without torchrun (which would stop the
    second as soon as the first exits): rank 1 sleeps inside step 3."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))  # fmt: skip
    timeout = 3
    run_dir = tmp_path / "hang"
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
           "OMP_NUM_THREADS": "1", INJECT_ENV: "hang@3:1"}  # fmt: skip
    cmd = [sys.executable, "-m", "baobab", "train", *args(tiny_corpus, run_dir, 20), "--data.batch_size", "2", "--fault.hang_timeout", str(timeout)]  # fmt: skip
    workers = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    errors = [w.communicate(timeout=240)[1] for w in workers]
    ended = time.time()
    step2 = [r["time"] for r in records(run_dir) if r.get("step") == 2 and "loss" in r]
    assert ended - step2[0] < timeout + 30  # from the last finished step to the last exit
    stalled = "hang: rank 1 stopped taking part in collectives (rank 1 is in 'step 3: loading data') while rank 0 waits in 'step 3: all-reduce of the batch size'"  # fmt: skip
    for rank, (worker, stderr) in enumerate(zip(workers, errors)):
        assert worker.returncode == HANG_EXIT_CODE, stderr[-2000:]
        assert f"rank {rank}: error: {stalled}" in stderr, stderr[-2000:]
    notes = sorted((run_dir / "faults").glob("rank_*.json"))
    assert [json.loads(n.read_text())["cause"].startswith(stalled) for n in notes] == [True, True]


def test_fault_injection_and_fault_config_refuse_bad_values():
    injector = FaultInjector.parse("nan@4, spike@6-7, hang@9:2")
    assert injector.nan == {4} and injector.spike == {6, 7} and injector.hang == {9: 2}
    assert math.isnan(injector.loss_factor(4)) and injector.loss_factor(5) is None
    for bad in ("nan4", "nan@4:1", "boom@3"):
        with pytest.raises(ValueError, match=f"{INJECT_ENV} entry"):
            FaultInjector.parse(bad)
    for field, value, message in [
        ("hang_timeout", -1.0, "fault.hang_timeout must be 0 or more"),
        ("max_skipped_steps", 0, "fault.max_skipped_steps must be at least 1"),
        ("spike_factor", 1.0, "fault.spike_factor must be greater than 1"),
        ("spike_window", 0, "fault.spike_window must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            FaultConfig(**{field: value})
