"""One rank of the plan-versus-MemTracker runs: ``python plan_worker.py OUT CORPUS NAME,...``.

Environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by test_plan.py).
For each configuration in ``CONFIGS`` the rank builds the run exactly as ``baobab train``
does (``build_trainer``), takes two training steps to create the optimizer state, the step
guard's copies and FSDP's buffers, then takes a third step under torch's own memory tracker (``FSDPMemTracker``
when the model is FSDP-wrapped, ``MemTracker`` otherwise) and writes what it measured, by
part, to OUT/rank{RANK}.json:

- parameters: tracked parameters (FSDP: sharded ones); gradients: when backward has ended;
- optimizer: optimizer state after the step, plus the guard's copies that cancel a bad
  step (registered with the tracker as external tensors);
- activations: what the forward saved, when the first backward starts;
- buffers (FSDP): the most the unsharded parameters and gradients and the all-gather and
  reduce-scatter buffers held at once;
- peak: the tracker's peak total.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule

from baobab.models.gpt import GPTConfig  # noqa: F401  (registers the families)
from baobab.optim import OptimConfig
from baobab.parallel import BlockOptions, ParallelConfig
from baobab.train.config import DataConfig, ModelSpec, RunConfig, TrainerConfig

# ~14M parameters (untied, so the pipeline can split it): 16 bytes each of parameters,
# gradients and AdamW state, about 113 MB per rank at 2 ranks; activations of the same order.
SHAPE = dict(vocab_size=8192, n_layer=5, n_head=6, n_kv_head=2, d_model=384, ffn_hidden=1024,
             max_seq_len=64, tie_embeddings=False)  # fmt: skip
# name -> (ParallelConfig fields, activation checkpointing); world size 2.
CONFIGS = {
    "fsdp2": ({}, "none"),
    "fsdp2_ac": ({}, "full"),
    "tp2": ({"tp": 2}, "none"),
    "tp2_ac": ({"tp": 2}, "full"),
    "pp2": ({"pp": 2}, "none"),
    "pp2_ac": ({"pp": 2}, "full"),
}
COMM = ("Unsharded Param", "All Gather", "Unsharded Grad", "Reduce Scatter")


def run_config(name: str, corpus: str, run_dir: str) -> RunConfig:
    parallel, ac = CONFIGS[name]
    return RunConfig(
        model=ModelSpec("gpt", overrides=dict(SHAPE)),
        data=DataConfig(path=corpus, seq_len=64, batch_size=2),
        optim=OptimConfig(name="adamw", lr=1e-4),
        train=TrainerConfig(run_dir=run_dir, max_steps=3, progress=False, log_every=1),
        parallel=ParallelConfig(**parallel),
        blocks=BlockOptions(activation_checkpointing=ac),
    )


def _named(snapshot: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = str(getattr(key, "value", key))
            out[name] = out.get(name, 0) + value
    return out


def _tracker(root: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """torch's tracker for this model, also keeping the most the FSDP buffers held at once."""
    base = FSDPMemTracker if isinstance(root, FSDPModule) else MemTracker

    class Tracker(base):
        comm = 0

        def _update_peak_stats(self, peak_state) -> None:  # after every op
            super()._update_peak_stats(peak_state)
            now = _named({"d": next(iter(self._curr_mem_snap.values()), {})})
            comm = sum(now.get(k, 0) for k in COMM)
            if comm > self.comm:
                self.comm, self.comm_at = comm, now

        def _pre_fw_hook(self, module, inputs) -> None:
            try:  # a pipeline stage runs once per microbatch
                super()._pre_fw_hook(module, inputs)
            except NotImplementedError:
                self.reset_mod_stats()
                super()._pre_fw_hook(module, inputs)

    return Tracker(root, optimizer) if base is FSDPMemTracker else Tracker()


def measure(name: str, corpus: str, run_dir: str) -> dict:
    from baobab.train.run import build_trainer

    t0 = time.perf_counter()
    trainer = build_trainer(run_config(name, corpus, run_dir))
    t1 = time.perf_counter()
    for _ in range(2):  # the optimizer state, the guard's copies (sized at the second
        trainer._train_step()  # step, once state exists), FSDP's lazy initialisation
    t2 = time.perf_counter()
    optimizer = trainer.optimizers[0]
    guard = [b for s in trainer._steppers or [] for b in getattr(s, "_buffers", [])]
    tracker = _tracker(trainer.parts[0], optimizer)
    if isinstance(tracker, FSDPMemTracker):
        tracker.track_inputs(tuple(guard))  # counted under "Inputs"
    else:
        tracker.track_external(*trainer.parts, *trainer.optimizers, *guard)  # guard: "Other"
    seen: dict[str, dict[str, int]] = {}
    backward = torch.autograd.backward

    def first_backward(*args, **kwargs):
        seen.setdefault("backward", _named(tracker.get_tracker_snapshot()))
        return backward(*args, **kwargs)

    clip = trainer._clip

    def clip_after_backward():
        seen["grads"] = _named(tracker.get_tracker_snapshot())
        return clip()

    torch.autograd.backward, trainer._clip = first_backward, clip_after_backward
    try:
        with tracker:
            trainer._train_step()
    finally:
        torch.autograd.backward = backward
    t3 = time.perf_counter()
    after = _named(tracker.get_tracker_snapshot())
    peak = _named(tracker.get_tracker_snapshot("peak"))

    def get(snapshot: dict[str, int], *keys: str) -> int:
        return sum(snapshot.get(k, 0) for k in keys)

    result = {
        "parameters": get(after, "Parameter", "Sharded Param"),
        "gradients": get(seen["grads"], "Gradient", "Sharded Grad"),
        "optimizer": get(after, "Optstate", "OptState", "Other", "Inputs"),
        "activations": get(seen["backward"], "Activation"),
        "buffers": tracker.comm,
        "peak": peak.get("Total", 0),
        "timing": {"build": t1 - t0, "warm-up": t2 - t1, "tracked": t3 - t2},
        "tracked": {
            "after step": after,
            "peak": peak,
            "buffers": getattr(tracker, "comm_at", {}),
        },  # for the failure messages
    }
    dist.barrier()  # the process group stays for the next configuration
    return result


def main() -> None:
    out, corpus, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results: dict[str, dict] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = measure(name, corpus, str(out / f"run_{name}"))
        except Exception:  # report, then leave: peers blocked in a collective fail fast
            results[name] = {"error": traceback.format_exc()}
            (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
            sys.stdout.flush()
            os._exit(1)
        results[name]["seconds"] = time.perf_counter() - t0
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
