"""``baobab plan``: its per-rank memory agrees with torch's own tracker, and the command
answers with a plan, a ranked search, JSON, or one sentence for a layout that cannot be.

The agreement test runs real training steps (``build_trainer``, gloo, 2 processes) of a
~14M-parameter GPT (about 113 MB of parameters, gradients and AdamW state per rank) under
FSDP-2, TP-2 and PP-2, each without and with activation checkpointing, measures each part
with ``torch.distributed._tools`` (``MemTracker``, ``FSDPMemTracker``; see plan_worker.py)
and asserts the plan's parameters, gradients, optimizer state, activations, FSDP buffers and
peak within 15% of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from plan_worker import CONFIGS, run_config
from ranks import launch_ranks

from baobab import models
from baobab.cli import main
from baobab.optim import OPTIMIZER_NAMES, OptimConfig, build_optimizer
from baobab.train.plan import flops_per_token
from baobab.train.plan_memory import _optimizer_bytes, param_shapes, rank_memory
from baobab.train.plan_report import model_config, run_shape

WORKER = Path(__file__).with_name("plan_worker.py")
TOLERANCE = 0.15
PARTS = ("parameters", "gradients", "optimizer", "activations", "peak")


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_corpus) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("plan_memtracker")
    cmd = [sys.executable, str(WORKER), str(out), str(tiny_corpus), ",".join(CONFIGS)]
    return launch_ranks(cmd, 2, out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_matches_memtracker(name: str, measured, tiny_corpus, tmp_path) -> None:
    cfg = run_config(name, str(tiny_corpus), str(tmp_path))
    model_cfg = model_config(cfg)
    run = run_shape(cfg, model_cfg)
    seq = run.seq_len
    layout = cfg.parallel.validate(2, model_cfg, seq_len=seq, local_batch_size=run.batch_size)
    for rank in range(2):
        got = measured[rank].get(name)
        assert got and "error" not in got, f"rank {rank}: {got}\n{measured[rank]['_log']}"
        pp_rank = rank if layout.pp > 1 else 0
        plan = rank_memory(run, layout, pp_rank, "cpu")
        parts = PARTS + (("buffers",) if name.startswith("fsdp") else ())
        for part in parts:
            want, have = getattr(plan, part), got[part]
            assert abs(want - have) <= TOLERANCE * have, (
                f"{name} rank {rank} {part}: plan {want / 2**20:.2f} MiB, "
                f"MemTracker {have / 2**20:.2f} MiB"
            )
        # The configurations are ones where the planner has something to be wrong about.
        assert got["parameters"] + got["gradients"] + got["optimizer"] >= 100e6


def test_optimizer_state_matches_each_optimizer() -> None:
    """The state bytes per optimizer name equal what each real optimizer allocates."""
    cfg = models.get_config("gpt-nano", n_layer=1)
    shapes = param_shapes(cfg, None, 1, False)
    params = [(p, p.numel) for p in shapes.root + shapes.block]
    for name in OPTIMIZER_NAMES:
        model = models.build_model(cfg)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optim = OptimConfig(name=name, rmsprop_momentum=0.9 if name == "rmsprop" else 0.0)
        opt = build_optimizer(model, optim)
        opt.step()
        real = sum(
            t.numel() * t.element_size()
            for state in opt.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        assert _optimizer_bytes(params, optim) == real, name


def test_flops_match_the_progress_bars_formula() -> None:
    """The plan's FLOPs per token are ``training_flops_per_token`` (extended over blocks)."""
    cfg = models.get_config("gpt-mini", n_layer=5)
    assert flops_per_token(cfg, 64) == models.training_flops_per_token(cfg, 64)


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_json_has_every_part_per_rank(capsys) -> None:
    code, out, _ = _plan(
        capsys, "--model.name", "gpt-nano", "--nproc-per-node", "2", "--parallel.pp", "2",
        "--model.overrides.tie_embeddings", "false", "--data.seq_len", "64",
        "--device-memory", "1GiB", "--device-peak-tflops", "1", "--json",
    )  # fmt: skip
    assert code == 0
    body = json.loads(out)
    (plan,) = body["plans"]
    assert plan["fits"] and plan["layout"]["pp"] == 2 and len(plan["ranks"]) == 2
    for rank in plan["ranks"]:
        assert set(rank) >= {"parameters", "gradients", "optimizer", "activations", "buffers"}
        assert rank["peak"] <= plan["device_memory_bytes"]
    assert 0 < plan["mfu_ceiling"] <= 1 and plan["step_time_s"] > 0


def test_plan_search_ranks_layouts_and_names_refusals(capsys) -> None:
    """llama-8b over 8 ranks of 80 GiB: a ranked table; what cannot fit is named."""
    code, out, _ = _plan(
        capsys, "--model.name", "llama-8b", "--nproc-per-node", "8", "--search",
        "--device-memory", "80GiB", "--device-peak-tflops", "989", "--train.precision", "bf16",
        "--data.seq_len", "4096", "--data.batch_size", "2",
    )  # fmt: skip
    assert code == 0
    table = out.split("sizes per rank:\n")[1].split("\ndoes not fit")[0].splitlines()
    assert table[0].startswith("layout") and len(table) > 2
    times = [float(line.split()[-2]) for line in table[1:]]
    assert times == sorted(times)
    assert "does not fit: DDP-8 needs" in out  # 16 bytes per parameter of 8B on every rank


def test_impossible_layout_is_one_sentence(capsys) -> None:
    code, out, err = _plan(capsys, "--model.name", "gpt-nano", "--nproc-per-node", "2",
                           "--parallel.tp", "3")  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith("error: parallel.") and err.count("\n") == 1


def test_plan_that_does_not_fit_says_why(capsys) -> None:
    code, out, _ = _plan(capsys, "--model.name", "llama-8b", "--device-memory", "24GiB",
                         "--device-peak-tflops", "100")  # fmt: skip
    assert code == 1
    assert "does NOT fit" in out and "needs" in out and "Try baobab plan --search." in out
