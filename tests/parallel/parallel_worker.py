"""One rank of the parallel-equivalence runs: ``python parallel_worker.py OUT_DIR LAYOUT,...``.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (set by test_parallel_equivalence,
which also gives the workers other kernels than its own: see tests/numerics.py). The test
process runs ``reference(layout)``, the single-process run on the whole global batch, and
saves it to OUT_DIR/ref_{layout}.pt. For each layout, every rank builds the same seeded
model, trains its parallel part on its share, and writes its losses, clip norms, eval loss
and the comparisons (``check_tensor`` reports) of its logits, first gradients and final
parameters with the reference to OUT_DIR/rank{RANK}.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from baobab.models import build_model
from baobab.optim import clip_gradients
from baobab.parallel import (
    ParallelConfig,
    build_mesh,
    clip_grad_norm_parallel,
    dp_rank_and_size,
    parallelize,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared numerics
from numerics import FLOAT32, FLOAT32_ATOL, Tolerance, adam_tolerance, check_tensor  # noqa: E402

# lr 1e-4: Adam moves an entry with a near-zero gradient by ~lr whatever its last bits, so
# float32 reduction-order noise shows up in parameters in proportion to lr (bert TP's key
# biases, whose gradient is zero in exact arithmetic: 9e-6 at lr 1e-3, 9e-7 at 1e-4); at
# 1e-4 every element of them stays within the float32 tier of adam_tolerance(STEPS * LR).
STEPS, GLOBAL_BATCH, SEQ, LR, CLIP = 3, 8, 16, 1e-4, 1.0
PARAM_TOL = adam_tolerance(STEPS * LR)
_GPT = ("gpt-nano", {"max_seq_len": 32})
_GPT_UNTIED = ("gpt-nano", {"max_seq_len": 32, "n_layer": 4, "tie_embeddings": False})
_BERT = ("bert-tiny", {"vocab_size": 512, "max_seq_len": 32})
# The GPT-2 variant: biases, LayerNorm, tanh-GELU MLP, learned positions, n_kv_head = n_head.
_GPT2_ARCH = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_kv_head=4)
_GPT2 = ("gpt-nano", {"max_seq_len": 32, **_GPT2_ARCH})
_GPT2_UNTIED = (
    "gpt-nano",
    {"max_seq_len": 32, "n_layer": 4, "tie_embeddings": False, **_GPT2_ARCH},
)

# name -> (world size, (model name, overrides), ParallelConfig fields)
LAYOUTS: dict[str, tuple[int, tuple[str, dict], dict]] = {
    "ddp2": (2, _GPT, {"dp_replicate": 2, "dp_shard": 1}),
    "fsdp2": (2, _GPT, {}),
    "fsdp2_zero2": (2, _GPT, {"fsdp_reshard_after_forward": False}),
    "tp2_gpt": (2, _GPT, {"tp": 2}),
    "tp2_gpt_nosp": (2, _GPT, {"tp": 2, "sequence_parallel": False}),
    "tp2_bert": (2, _BERT, {"tp": 2}),
    "tp2_gpt2": (2, _GPT2, {"tp": 2}),
    "tp2_gpt2_nosp": (2, _GPT2, {"tp": 2, "sequence_parallel": False}),
    "pp2_gpipe": (2, _GPT_UNTIED, {"pp": 2, "pp_schedule": "gpipe"}),
    "pp2_1f1b": (2, _GPT_UNTIED, {"pp": 2, "pp_schedule": "1f1b"}),
    "pp2_interleaved": (2, _GPT_UNTIED, {"pp": 2, "pp_schedule": "interleaved_1f1b"}),
    "fsdp2_lstm": (2, ("lstm-tiny", {}), {}),
    "ddp2_mlp": (2, ("mlp", {}), {"dp_replicate": 2, "dp_shard": 1}),
    "hsdp2x2": (4, _GPT, {"dp_replicate": 2, "dp_shard": 2}),
    "fsdp2_tp2_bert": (4, _BERT, {"tp": 2}),
    "fsdp2_tp2": (4, _GPT, {"tp": 2}),
    "pp2_fsdp2": (4, _GPT_UNTIED, {"pp": 2, "pp_schedule": "1f1b"}),
    "pp2_tp2": (4, _GPT_UNTIED, {"pp": 2, "tp": 2, "pp_schedule": "1f1b"}),
    "pp2_tp2_gpt2": (4, _GPT2_UNTIED, {"pp": 2, "tp": 2, "pp_schedule": "1f1b"}),
    "ddp2_tp2": (4, _GPT, {"dp_replicate": 2, "dp_shard": 1, "tp": 2}),
    "pp2_ddp2": (4, _GPT_UNTIED, {"pp": 2, "dp_replicate": 2, "dp_shard": 1}),
}


def _loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point():  # regression (mlp): (B, O)
        return torch.mean((output.float() - targets) ** 2)
    return F.cross_entropy(output.flatten(0, 1).float(), targets.flatten())  # mean over tokens


def _batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    if hasattr(cfg, "in_features"):  # (B, I) -> (B, O)
        shapes = ((GLOBAL_BATCH, cfg.in_features), (GLOBAL_BATCH, cfg.out_features))
        return [tuple(torch.randn(s, generator=g) for s in shapes) for _ in range(STEPS)]
    draw = lambda: torch.randint(cfg.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)  # noqa: E731
    return [(draw(), draw()) for _ in range(STEPS)]  # (B, T) tokens, (B, T) targets


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, foreach=True)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Biases and norm shifts moved away from their zero init (models with biases only), so
    a bias added on every tp rank instead of once changes the very first logits."""
    if any(name.endswith(".bias") for name, _ in model.named_parameters()):
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _model(name: str) -> torch.nn.Module:
    _, (model_name, overrides), _ = LAYOUTS[name]
    torch.manual_seed(0)
    return _perturbed(build_model(model_name, **overrides))


def reference(name: str) -> dict:
    """The single-process run of a layout's model on the whole global batch: the first
    forward's logits, losses, clip norms, the first step's (unclipped) gradients, the final
    parameters and the eval loss after training."""
    model = _model(name)
    batches = _batches(model.cfg)
    with torch.no_grad():
        logits = model(batches[0][0])  # before training: the forward alone
    opt = _optimizer(model.parameters())
    losses, norms, grads = [], [], {}
    for x, y in batches:
        loss = _loss(model(x), y)
        loss.backward()
        if not grads:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(clip_gradients(model.parameters(), CLIP, None).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = _loss(model(batches[0][0]), batches[0][1]).item()
    params = {n: p.detach() for n, p in model.named_parameters()}
    return dict(logits=logits, losses=losses, norms=norms, grads=grads, params=params,
                eval_loss=eval_loss)  # fmt: skip


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or gradient; collective for DTensors."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def run_layout(name: str, ref: dict) -> dict:
    model = _model(name)
    batches = _batches(model.cfg)
    ref_grads, ref_params = ref["grads"], ref["params"]
    cfg = ParallelConfig(**LAYOUTS[name][2])
    mesh = build_mesh(cfg, "cpu")
    pm = parallelize(model, mesh, cfg, loss_fn=_loss)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    opt = _optimizer([p for part in pm.parts for p in part.parameters()])
    share = GLOBAL_BATCH // dp_size
    logits = None  # the output of a pipeline is a loss, not logits
    if pm.schedule is None:
        with torch.no_grad():
            out = pm.parts[0](batches[0][0][dp_rank * share : (dp_rank + 1) * share])
        want = ref["logits"][dp_rank * share : (dp_rank + 1) * share]
        logits = check_tensor("logits", _full(out), want, FLOAT32)
        pm.reshard()  # ZeRO-2 keeps gathered parameters after a forward without backward

    def global_loss(x: torch.Tensor, y: torch.Tensor, train: bool) -> float:
        xl, yl = (
            x[dp_rank * share : (dp_rank + 1) * share],
            y[dp_rank * share : (dp_rank + 1) * share],
        )
        if pm.schedule is not None:
            loss = pm.pipeline_step(xl, yl, train=train)  # mean over microbatches, on all stages
        else:
            loss = _loss(pm.parts[0](xl), yl)  # local mean: DP averages gradients over ranks
            if train:
                loss.backward()
            loss = loss.detach()
        # Equal local batches: the global mean is the mean of the dp ranks' means, each
        # counted once by the rank that reports for its replica.
        loss = loss if pm.reports else torch.zeros_like(loss)
        dist.all_reduce(loss)
        return loss.item() / dp_size

    # Relative to the largest gradient entry of the model: some entries are exactly zero in
    # exact arithmetic (attention key biases: softmax ignores a per-query constant), so
    # their own scale is rounding noise.
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    grad_tol = Tolerance(FLOAT32_ATOL * grad_scale, 0.0)
    losses, norms, grads = [], [], []
    for x, y in batches:
        losses.append(global_loss(x, y, train=True))
        if len(losses) == 1:  # first step, before clipping: the global-batch mean's gradients
            for part in pm.parts:
                for pname, p in part.named_parameters():
                    grads.append(check_tensor(pname, _full(p.grad), ref_grads[pname], grad_tol))
        norms.append(clip_grad_norm_parallel(pm.parts, CLIP, None, pm.pp_group).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    shape_guard = None
    if pm.schedule is not None:  # a new batch shape is refused before any communication
        try:
            pm.pipeline_step(batches[0][0][:1], batches[0][1][:1])
            shape_guard = False
        except ValueError:
            shape_guard = True
    with torch.no_grad():
        eval_loss = global_loss(*batches[0], train=False)
    pm.reshard()  # ZeRO-2 keeps gathered parameters after a forward without backward

    params = [  # names as in the full model
        check_tensor(pname, _full(p), ref_params[pname], PARAM_TOL)
        for part in pm.parts
        for pname, p in part.named_parameters()
    ]
    dist.barrier()
    return {
        "losses": losses,
        "ref_losses": ref["losses"],
        "norms": norms,
        "ref_norms": ref["norms"],
        "eval_loss": eval_loss,
        "ref_eval_loss": ref["eval_loss"],
        "params": params,
        "logits": logits,
        "grads": grads,
        "grad_scale": grad_scale,
        "param_names": sorted(n for part in pm.parts for n, _ in part.named_parameters()),
        "ref_param_names": sorted(ref_params),
        "dtensor_params": sorted(
            {isinstance(p, DTensor) for part in pm.parts for p in part.parameters()}
        ),  # fmt: skip
        "dp": [dp_rank, dp_size],
        "shape_guard": shape_guard,
        "reports": pm.reports,
        "strategy": pm.cfg.strategy_name,
    }


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results: dict[str, dict] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            ref = torch.load(out_dir / f"ref_{name}.pt", weights_only=True)
            results[name] = run_layout(name, ref)
        except Exception:  # report, then leave: peers blocked in a collective fail fast
            results[name] = {"error": traceback.format_exc()}
            (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
            sys.stdout.flush()
            os._exit(1)
        results[name]["seconds"] = time.perf_counter() - t0
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
