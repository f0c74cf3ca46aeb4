"""At scale a model never exists whole on one rank: built on meta, parallelised, then each
rank allocates its shards and initialises them one full parameter at a time.

Two ranks (gloo) run each layout of meta_init_worker.py under torch's memory tracker
(``torch.distributed._tools.mem_tracker.MemTracker``, which counts every tensor allocated
while it is active). Each rank's peak during build + parallelize + materialise must stay
within what it holds afterwards plus one full parameter (the bound the issue sets), well
below the whole model, and it must start from exactly the one-process init and train like
it: 20 AdamW steps, losses within 1e-5 (tests/numerics.py). A sharded fine-tune's start
(``--model.init`` from an export, read one tensor at a time) keeps the same bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from meta_init_worker import LAYOUTS, MODEL, SEED, reference
from numerics import LOSS_RTOL, assert_losses_close
from ranks import free_port

from baobab.export import save_exported
from baobab.models import build_model

WORKER = Path(__file__).with_name("meta_init_worker.py")
TIMEOUT_S = 150  # a hang fails the test instead of blocking the suite
SLACK = 1024  # bytes


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[dict, dict[int, dict]]:
    out = tmp_path_factory.mktemp("meta_init")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, busy CPU stalls OpenMP barriers
    ref = reference()
    torch.set_num_threads(threads)
    torch.save(ref, out / "ref.pt")
    start = build_model(MODEL[0], seed=SEED, **MODEL[1])  # the init, as a fine-tune's base
    save_exported(start, out / "export", {"name": MODEL[0], "family": "gpt", "config": MODEL[1]}, None)  # fmt: skip
    for _ in range(2):  # the free port may be taken before rank 0 binds it: retry once
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out)],
                env={**env, "RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        logs = []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=TIMEOUT_S)[0][-3000:])
            except subprocess.TimeoutExpired:
                proc.kill()
                logs.append(proc.communicate()[0][-3000:])
        if "address already in use" not in "".join(logs).lower():
            break
    results = {}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} reported nothing:\n{logs[rank]}"
        results[rank] = json.loads(path.read_text())
    return ref, results


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_no_rank_holds_the_whole_model_and_training_matches_one_process(layout, launched):
    ref, ranks = launched
    model = build_model(MODEL[0], device="meta", **MODEL[1])
    whole = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for rank, results in ranks.items():
        r = results[layout]
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        where = f"{layout}, rank {rank}"
        assert r["dtensors"], f"{where}: parameters are not sharded"
        # The bound: its shards plus one full parameter at a time, never the model
        # (SLACK: a few scalars of FSDP's and DTensor's own bookkeeping).
        bound = r["held_bytes"] + r["largest_full_bytes"] + SLACK
        assert r["peak_bytes"] <= bound, f"{where}: peak {r['peak_bytes']} B > {bound} B"
        assert r["peak_bytes"] < 0.7 * whole, f"{where}: peak {r['peak_bytes']} B of {whole} B"
        assert r["start_equal"], f"{where}: the sharded init differs from the one-process init"
        assert r["tied"], f"{where}: the output head is no longer the embedding"
        if "losses" in r:
            assert_losses_close(r["losses"], ref["losses"], LOSS_RTOL, f"{where}: loss")
