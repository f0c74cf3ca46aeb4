"""A checkpoint saved by 2 FSDP2 ranks (gloo) loads and exports in one process, exactly.

The 2-rank job runs as ``python this_file.py RUN_DIR PORT`` in a subprocess (bounded by a
timeout); it trains gpt-nano a few AdamW steps under ``fully_shard``, saves one async and one
synchronous checkpoint, and writes the gathered full parameters, optimizer state and
logits on a fixed batch to ``RUN_DIR/reference.pt`` for the single-process checks here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baobab.checkpoint import checkpoint_dirs, load_checkpoint, read_meta, verify_checkpoint
from baobab.export import export_checkpoint, load_exported
from baobab.models import build_model

META = {"model": {"name": "gpt-nano", "family": "gpt", "config": {}}, "objective": "causal_lm"}
STEPS, WORLD = 3, 2


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from baobab.checkpoint import save_checkpoint, wait_for_checkpoint

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = build_model("gpt-nano")
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        batch = torch.randint(0, 512, (2 * world, 16), generator=torch.Generator().manual_seed(1))
        local = batch.chunk(world)[rank]
        for step in range(1, STEPS + 1):
            logits = model(local)
            F.cross_entropy(logits[:, :-1].flatten(0, 1), local[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == STEPS - 1:  # written in the background while the next step trains
                save_checkpoint(
                    run_dir, step, [model], [opt], {"step": step}, META, async_save=True
                )
        save_checkpoint(run_dir, STEPS, [model], [opt], {"step": STEPS}, META)
        assert wait_for_checkpoint() is None

        full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
        names = {p: n for n, p in model.named_parameters()}
        params = {n: full(p.detach()) for p, n in names.items()}
        optim = {names[p]: {k: full(v) for k, v in s.items()} for p, s in opt.state.items()}
        with torch.no_grad():
            logits = model(batch)  # every rank runs the whole batch: full logits
        # Loaded back on both ranks, each hashing its half of the files while DCP reads;
        # then a byte flipped in rank 1's shard, which rank 1 alone hashes: both refuse.
        assert load_checkpoint(run_dir, [model], [opt]) == {"step": STEPS}
        damaged = Path(run_dir) / "damaged"
        if rank == 0:
            shutil.copytree(checkpoint_dirs(run_dir)[-1], damaged)
            shard = bytearray((damaged / "__1_0.distcp").read_bytes())
            shard[len(shard) // 2] ^= 1
            (damaged / "__1_0.distcp").write_bytes(bytes(shard))
        dist.barrier()
        try:
            load_checkpoint(damaged, [model], [opt])
            refused = ""
        except ValueError as err:
            refused = str(err)
        if rank == 0:
            reference = {"params": params, "optim": optim, "logits": logits, "batch": batch}
            torch.save({**reference, "refused": refused}, Path(run_dir) / "reference.pt")
        else:
            (Path(run_dir) / "refused_on_rank1").write_text(refused)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(damaged)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("fsdp_run")
    cmd = [sys.executable, __file__, str(run_dir), str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, torch.load(run_dir / "reference.pt", weights_only=True)


def test_fsdp_checkpoint_loads_in_one_process(fsdp_run):
    run_dir, ref = fsdp_run
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step_00000002", "step_00000003"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert read_meta(run_dir)["step"] == STEPS
    for ckpt in checkpoint_dirs(run_dir):  # async and sync: each rank's shards are recorded
        files = read_meta(ckpt)["checksums"]["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= files.keys()
        assert sorted(files) == sorted(p.name for p in ckpt.iterdir() if p.name != "meta.json")
        assert verify_checkpoint(ckpt) is None
    model = build_model("gpt-nano")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert load_checkpoint(run_dir, [model], [opt]) == {"step": STEPS}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), ref["params"][name], rtol=0, atol=0, msg=name)
        for key, value in opt.state[param].items():
            torch.testing.assert_close(value, ref["optim"][name][key], rtol=0, atol=0, msg=key)
    assert model.output.weight is model.tok_embeddings.weight


def test_a_damaged_shard_is_refused_on_every_rank(fsdp_run):
    run_dir, ref = fsdp_run
    damage = "is damaged: shard __1_0.distcp does not match its xxh3_128 checksum"
    assert damage in ref["refused"]
    assert ref["refused"] == (run_dir / "refused_on_rank1").read_text()


def test_export_of_fsdp_checkpoint_gives_the_sharded_logits(fsdp_run, tmp_path):
    run_dir, ref = fsdp_run
    out = export_checkpoint(run_dir, tmp_path / "export")
    model, config = load_exported(out)
    assert config["step"] == STEPS and config["dtype"] == "float32"
    with torch.no_grad():
        torch.testing.assert_close(model(ref["batch"]), ref["logits"])


if __name__ == "__main__":
    import torch.multiprocessing as mp

    # fork: the ranks inherit this process's imports (torch, baobab) instead of redoing them.
    args = (WORLD, int(sys.argv[2]), sys.argv[1])
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="fork")
