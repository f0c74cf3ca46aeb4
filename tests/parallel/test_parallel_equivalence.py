"""Every parallel layout trains like the single-process run on the same global batch.

Each world size is launched once (process start and ``import torch`` dominate on a small
machine) and runs all its layouts in sequence; see parallel_worker.py for what one rank
does. Tolerances (tests/numerics.py): losses, grad norms and eval loss within 1e-5
relative, final parameters within ``adam_tolerance`` of the reference after 3 AdamW steps
with clipping at norm 1.0; the first forward's logits within ``FLOAT32`` (layouts without a
pipeline) and the first step's gradients within 1e-5 of the model's largest gradient entry.
Models with biases start perturbed away from their init (zero biases would hide a bias added
on every tp rank). The reference runs in this process; the workers run other kernels
(``WORLD_KERNELS``), so that each comparison is between two CPUs' kernels, as when a run is
checked on another machine than the one the tolerances were measured on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from numerics import FLOAT32, KERNELS, LOSS_RTOL, Tolerance, assert_losses_close, failures
from parallel_worker import LAYOUTS, PARAM_TOL, reference
from ranks import launch_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")
TIMEOUT_S = 150  # per launch; a hang fails the tests instead of blocking the suite
WORLD_KERNELS = {2: "default", 4: "avx2"}  # the workers' KERNELS, by world size


def _launch(world: int, names: list[str], out: Path) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # the single-process runs, with this process's kernels
        torch.save(reference(name), out / f"ref_{name}.pt")
    cmd = [sys.executable, str(WORKER), str(out), ",".join(names)]
    return launch_ranks(cmd, world, out, KERNELS[WORLD_KERNELS[world]], TIMEOUT_S)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[int, dict[int, dict]]:
    """world size -> rank -> layout -> metrics, each world size launched on first use."""

    class Launches(dict):
        def __missing__(self, world: int) -> dict[int, dict]:
            names = [n for n, (w, _, _) in LAYOUTS.items() if w == world]
            self[world] = _launch(world, names, tmp_path_factory.mktemp(f"world{world}"))
            return self[world]

    return Launches()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, launched) -> None:
    world = LAYOUTS[layout][0]
    ranks = launched[world]
    for rank, results in ranks.items():
        assert layout in results, f"rank {rank} reported nothing for {layout}:\n{results['_log']}"
        assert "error" not in results[layout], f"rank {rank}:\n{results[layout]['error']}"
    reports = [ranks[r][layout] for r in range(world)]
    for rank, r in enumerate(reports):
        where = f"{layout}, rank {rank} ({WORLD_KERNELS[world]} kernels)"
        assert_losses_close(r["losses"], r["ref_losses"], LOSS_RTOL, f"{where}: loss")
        assert_losses_close(r["norms"], r["ref_norms"], LOSS_RTOL, f"{where}: clip norm")
        assert_losses_close([r["eval_loss"]], [r["ref_eval_loss"]], LOSS_RTOL, f"{where}: eval loss")  # fmt: skip
        assert not (msg := failures(r["params"], PARAM_TOL, f"{where}: parameters")), msg
        assert r["logits"] is None or r["logits"]["ok"], failures([r["logits"]], FLOAT32, where)
        grad_tol = Tolerance(FLOAT32.atol * r["grad_scale"], 0.0)
        assert not (msg := failures(r["grads"], grad_tol, f"{where}: first gradients")), msg
    # Never a mix of DTensor and plain parameters (foreach/fused optimizers refuse one):
    # DTensors under FSDP2 (also DDP composed with TP/PP) and TP; plain under DDP or PP alone.
    name = reports[0]["strategy"]
    dtensors = any(k in name for k in ("FSDP", "HSDP", "TP")) or ("DDP" in name and "PP" in name)
    assert all(r["dtensor_params"] == [dtensors] for r in reports), (name, dtensors)
    # The clip norm is the same number on every rank (it decides every rank's scaling).
    assert all(r["norms"] == reports[0]["norms"] for r in reports)
    # Between them, the ranks hold (and checked) every parameter of the full model.
    held = {name for r in reports for name in r["param_names"]}
    assert held == set(reports[0]["ref_param_names"])
    if LAYOUTS[layout][2].get("pp", 1) > 1:
        assert all(r["shape_guard"] for r in reports if r["shape_guard"] is not None)
    # Data-parallel ranks 0..dp-1, each shared by world / dp ranks (its tp and pp peers).
    dp_size = reports[0]["dp"][1]
    dp_ranks = sorted(r["dp"][0] for r in reports)
    assert dp_ranks == sorted(list(range(dp_size)) * (world // dp_size))
    # Exactly one rank reports for each data-parallel replica.
    assert sorted(r["dp"][0] for r in reports if r["reports"]) == list(range(dp_size))
