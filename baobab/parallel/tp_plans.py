"""Tensor-parallel plans: module path (``*`` matches any layer index) -> DTensor style.

Plans are data: adding a family means adding an entry to ``TP_PLANS``. A plan is applied
to a whole model or to a pipeline stage of it; entries whose module was removed by the
pipeline split are skipped by ``parallelize`` (see ``plan_for_module``).

Layout legend (tp ranks, sequence dim 1):
    Replicate()  every rank holds the full (B, T, C) activation
    Shard(1)     each rank holds (B, T / tp, C): sequence parallelism
    Shard(-1)    each rank holds a slice of the heads / hidden units
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

Plan = dict[str, ParallelStyle]


class ReplicateParallel(ParallelStyle):
    """Keep a module whole on every tp rank, its parameters Replicate DTensors.

    Used for the small modules a plan does not split (norms without sequence parallelism,
    bert's position embeddings and MLM dense layer), so that every parameter of a
    tensor-parallel model is a DTensor: torch's foreach/fused optimizers refuse a mix of
    DTensors and plain tensors ("got mixed torch.Tensor and DTensor"). Plain tensor inputs
    are taken as Replicate (every tp rank holds the same activation); outputs become local
    tensors unless ``use_local_output=False``. ``output_layout=Shard(1)`` keeps each rank's
    sequence slice of the output (a local slice, no communication; backward all-gathers the
    gradient), as gpt's learned positions need under sequence parallelism. Gradients of
    the parameters come out Replicate, identical on every rank.
    """

    def __init__(
        self, *, output_layout: Placement | None = None, use_local_output: bool = True
    ) -> None:
        super().__init__()
        self.output_layout = output_layout
        self.use_local_output = use_local_output

    @staticmethod
    def _inputs_to_dtensor(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(
            DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def _output(self, module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        if self.output_layout is not None and isinstance(output, DTensor):
            output = output.redistribute(mesh, (self.output_layout,))
        if self.use_local_output and isinstance(output, DTensor):
            return output.to_local()
        return output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # partition_fn=None: distribute_module replicates every parameter over the mesh.
        return distribute_module(module, device_mesh, None, self._inputs_to_dtensor, self._output)


def gpt_plan(model_cfg: Any, sequence_parallel: bool) -> Plan:
    """torchtitan's Llama plan, derived from the config so the GPT-2 variant fits it too.

    Heads and MLP units are split column-wise, then summed row-wise; under sequence
    parallelism the residual stream stays Shard(1) between blocks, norms run on their
    sequence slice, and each block input is all-gathered once.

    Attention reshapes with -1 heads, so each rank runs n_head / tp query heads against
    n_kv_head / tp kv heads: query head j of a rank maps to its kv head j // (H / Hkv),
    the same grouping as the full model.

    The GPT-2 variant (``bias``, ``mlp="gelu"``, ``norm="layernorm"``,
    ``position="learned"``) changes only entries, not the flow: column-wise layers shard
    their bias with their output units; row-wise layers keep theirs Replicate and add it
    once, after the reduction of the partial sums; LayerNorm weight and bias are
    replicated like RMSNorm's weight; the gelu MLP has no w3; the (max_seq_len, C) position
    table is replicated and its (1, T, C) lookup laid out like the residual stream.
    """
    residual = Shard(1) if sequence_parallel else Replicate()
    feed_forward: Plan = {
        "w1": ColwiseParallel(),  # SwiGLU gate, or GELU up projection
        "w2": RowwiseParallel(output_layouts=residual),
    }
    if model_cfg.mlp == "swiglu":
        feed_forward["w3"] = ColwiseParallel()  # SwiGLU up projection
    plan: Plan = {
        # Vocabulary rows sharded; the Partial lookup is reduce-scattered to the residual layout.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        # Replicate output: every rank gets full logits (B, T, V), so the loss is unchanged.
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Replicate()),
        "layers.*.attention": PrepareModuleInput(
            input_layouts=(residual, None, None),  # (x, cos, sin): rope tables stay plain
            desired_input_layouts=(Replicate(), None, None),
        ),
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(output_layouts=residual),
        "layers.*.feed_forward": PrepareModuleInput(
            input_layouts=(residual,), desired_input_layouts=(Replicate(),)
        ),
        **{f"layers.*.feed_forward.{name}": style for name, style in feed_forward.items()},
    }
    if model_cfg.position == "learned":
        # (1, T, C) lookup of positions 0..T-1: under sequence parallelism each rank keeps
        # the slice matching its Shard(1) token embeddings (B, T / tp, C).
        plan["pos_embeddings"] = ReplicateParallel(output_layout=residual)
    # Norms run on their sequence slice (SP) or whole on every rank (Replicate residual).
    norm = SequenceParallel if sequence_parallel else ReplicateParallel
    for path in ("norm", "layers.*.attention_norm", "layers.*.ffn_norm"):
        plan[path] = norm()
    return plan


def bert_plan(model_cfg: Any, sequence_parallel: bool) -> Plan:
    """Megatron split of post-LN BERT without sequence parallelism (``sequence_parallel``
    is ignored: position embeddings are added at full length, so the residual stream is
    Replicate). Heads and the MLP hidden units are split column-wise, then summed
    row-wise; LayerNorms, position/token-type embeddings and the MLM dense layer are
    replicated: every rank computes them identically on identical inputs.

    The embedding sum stays a DTensor until ``embed_norm`` because Bert.forward adds
    ``token_type_embeddings.weight[0]`` (a Replicate DTensor) outside any module call.
    """
    del model_cfg, sequence_parallel
    return {
        # Vocabulary rows sharded; Partial lookup all-reduced to a full (B, T, C) DTensor.
        "word_embeddings": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate(), use_local_output=False
        ),
        "position_embeddings": ReplicateParallel(use_local_output=False),
        "token_type_embeddings": ReplicateParallel(use_local_output=False),
        "embed_norm": ReplicateParallel(),  # back to a plain (B, T, C) residual stream
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(),  # bias added once, after the all-reduce
        "layers.*.attention_norm": ReplicateParallel(),
        "layers.*.feed_forward.w1": ColwiseParallel(),
        "layers.*.feed_forward.w2": RowwiseParallel(),
        "layers.*.ffn_norm": ReplicateParallel(),
        "mlm_head.dense": ReplicateParallel(),
        "mlm_head.norm": ReplicateParallel(),
        # Decoder weight is Shard(0) like word_embeddings', so the tie survives (re-tied).
        "mlm_head.decoder": ColwiseParallel(output_layouts=Replicate()),
    }


TP_PLANS: dict[str, Callable[[Any, bool], Plan]] = {"gpt": gpt_plan, "bert": bert_plan}


def plan_for_module(plan: Plan, module: nn.Module) -> Plan:
    """``plan`` without entries whose module is missing (None or deleted by a pipeline split).

    ``*`` entries are expanded over the indices present in the module's ``layers``.
    """
    present = {name for name, _ in module.named_modules()}
    kept: Plan = {}
    for path, style in plan.items():
        if "*" in path:
            layers = getattr(module, "layers", None)
            prefix, rest = path.split(".*.", 1)
            if prefix != "layers" or layers is None:
                raise ValueError(f"tensor-parallel plan path {path!r} must look like layers.*.x.")
            for idx in layers:
                concrete = f"layers.{idx}.{rest}"
                if concrete in present:
                    kept[concrete] = style
        elif path in present:
            kept[path] = style
    return kept
