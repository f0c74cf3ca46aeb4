"""``ParallelConfig``: how one training run spreads over ``world_size`` processes.

The four degrees multiply to the world size, outermost first, as the mesh lays them out:
``pp × dp_replicate × dp_shard × tp``. Every refusal happens in ``validate`` before any
process group, mesh or model copy exists, with one sentence naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
# Families with a tensor-parallel plan (baobab.parallel.tp_plans) and a pipeline split.
TP_FAMILIES = ("gpt", "bert")
PP_FAMILIES = ("gpt",)


def model_family(model_cfg: Any) -> str:
    """Registry family name ("gpt", "bert", ...) of a model config."""
    from baobab.models import family_of  # registers the built-in families on import

    return family_of(model_cfg).name


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism and their knobs; the defaults give pure FSDP over all ranks."""

    dp_replicate: int = 1
    """Replicate degree of data parallelism: DDP alone, or HSDP's outer dim with dp_shard > 1."""
    dp_shard: int = -1
    """FSDP shard degree; -1 takes whatever world_size / (dp_replicate × tp × pp) leaves."""
    tp: int = 1
    """Tensor-parallel degree (DTensor plans of baobab.parallel.tp_plans); gpt and bert only."""
    pp: int = 1
    """Pipeline-parallel degree (number of ranks a model is cut across); gpt only."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b or interleaved_1f1b."""
    pp_microbatches: int = 0
    """Microbatches per pipeline step; 0 = pp × pp_stages_per_rank."""
    pp_stages_per_rank: int = 0
    """Pipeline stages held by each rank; 0 = 2 for interleaved_1f1b, else 1."""
    fsdp_reshard_after_forward: bool = True
    """Free gathered parameters after forward (ZeRO-3); False keeps them until backward
    (ZeRO-2 style: less communication, more memory)."""
    sequence_parallel: bool = True
    """Under tp > 1, shard norms and residual activations over the sequence dim (gpt);
    families without a sequence-parallel plan (bert) ignore it."""

    def __post_init__(self) -> None:
        for key in ("dp_replicate", "tp", "pp"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{key} must be an integer >= 1; got {value!r}.")
        shard = self.dp_shard
        if isinstance(shard, bool) or not isinstance(shard, int) or not (shard == -1 or shard >= 1):
            raise ValueError(f"parallel.dp_shard must be -1 or an integer >= 1; got {shard!r}.")
        for key in ("pp_microbatches", "pp_stages_per_rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"parallel.{key} must be 0 (automatic) or a positive integer; got {value!r}."
                )
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(
                f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}; "
                f"got {self.pp_schedule!r}."
            )

    # -- resolution -----------------------------------------------------------------------
    def resolved(self, world_size: int) -> ParallelConfig:
        """A copy with dp_shard, pp_stages_per_rank and pp_microbatches filled in."""
        shard = self.dp_shard
        if shard == -1:
            others = self.dp_replicate * self.tp * self.pp
            if world_size % others:
                raise ValueError(
                    f"parallel.dp_shard=-1 cannot fill world size {world_size}: dp_replicate="
                    f"{self.dp_replicate} × tp={self.tp} × pp={self.pp} = {others} does not "
                    f"divide it; choose degrees whose product divides {world_size}."
                )
            shard = world_size // others
        stages = self.pp_stages_per_rank or (2 if self.pp_schedule == "interleaved_1f1b" else 1)
        if self.pp == 1:
            stages = 1  # no pipeline: one "stage" holding the whole model
        microbatches = self.pp_microbatches or self.pp * stages
        return dataclasses.replace(
            self, dp_shard=shard, pp_stages_per_rank=stages, pp_microbatches=microbatches
        )

    def _require_resolved(self, what: str) -> None:
        if self.dp_shard == -1:
            raise ValueError(
                f"ParallelConfig.{what} needs a resolved config (dp_shard is -1); "
                "call resolved(world_size) first."
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel degree dp_replicate × dp_shard (the number of distinct batches)."""
        self._require_resolved("dp_size")
        return self.dp_replicate * self.dp_shard

    @property
    def is_distributed(self) -> bool:
        """Whether any degree exceeds 1, i.e. whether ``parallelize`` changes the model."""
        self._require_resolved("is_distributed")
        return self.dp_replicate * self.dp_shard * self.tp * self.pp > 1

    @property
    def strategy_name(self) -> str:
        """Short label such as ``FSDP-2×TP-2``, ``PP-2(1f1b)×DDP-2`` or ``single``."""
        parts = []
        if self.pp > 1:
            parts.append(f"PP-{self.pp}({self.pp_schedule})")
        shard = "auto" if self.dp_shard == -1 else str(self.dp_shard)
        if self.dp_replicate > 1 and self.dp_shard != 1:
            parts.append(f"HSDP-{self.dp_replicate}×{shard}")
        elif self.dp_shard != 1:
            parts.append(f"FSDP-{shard}")
        elif self.dp_replicate > 1:
            parts.append(f"DDP-{self.dp_replicate}")
        if self.tp > 1:
            parts.append(f"TP-{self.tp}")
        return "×".join(parts) or "single"

    # -- validation -----------------------------------------------------------------------
    def validate(
        self,
        world_size: int,
        model_cfg: Any,
        *,
        seq_len: int | None = None,
        local_batch_size: int | None = None,
    ) -> ParallelConfig:
        """Refuse a layout that cannot run, before any work; return the resolved config.

        ``seq_len`` and ``local_batch_size`` (the per-data-parallel-rank batch), when given,
        are checked against sequence parallelism and the pipeline microbatch count.
        """
        cfg = self.resolved(world_size)
        product = cfg.dp_replicate * cfg.dp_shard * cfg.tp * cfg.pp
        if product != world_size:
            raise ValueError(
                f"parallel degrees dp_replicate={cfg.dp_replicate} × dp_shard={cfg.dp_shard} × "
                f"tp={cfg.tp} × pp={cfg.pp} = {product} must equal the world size {world_size}."
            )
        family = model_family(model_cfg)
        if cfg.tp > 1:
            cfg._validate_tp(family, model_cfg, seq_len)
        if cfg.pp > 1:
            cfg._validate_pp(family, model_cfg, local_batch_size)
        return cfg

    def _validate_tp(self, family: str, model_cfg: Any, seq_len: int | None) -> None:
        tp = self.tp
        if family not in TP_FAMILIES:
            raise ValueError(
                f"parallel.tp must be 1 for model family {family!r}; tensor parallelism "
                f"supports {', '.join(TP_FAMILIES)} (use dp_replicate/dp_shard instead)."
            )
        # Sharded dims of the plans: heads (wq/wk/wv columns), ffn_hidden (w1/w3 columns),
        # vocab (embedding rows, output columns).
        dims = {"n_head": model_cfg.n_head, "ffn_hidden": model_cfg.ffn_hidden}
        if family == "gpt":
            dims["n_kv_head"] = model_cfg.n_kv_head
        dims["vocab_size"] = model_cfg.vocab_size
        for key, value in dims.items():
            if value % tp:
                raise ValueError(
                    f"parallel.tp={tp} must divide model {key}={value}; choose a tp that "
                    f"divides {key}."
                )
        if family == "gpt" and self.sequence_parallel and seq_len is not None and seq_len % tp:
            raise ValueError(
                f"parallel.sequence_parallel needs the sequence length {seq_len} divisible by "
                f"tp={tp}; choose such a seq_len or set parallel.sequence_parallel false."
            )

    def _validate_pp(self, family: str, model_cfg: Any, local_batch_size: int | None) -> None:
        if family not in PP_FAMILIES:
            raise ValueError(
                f"parallel.pp must be 1 for model family {family!r}; pipeline parallelism "
                f"supports {', '.join(PP_FAMILIES)}."
            )
        if getattr(model_cfg, "tie_embeddings", False):
            raise ValueError(
                "pipeline parallelism needs untied embeddings; set "
                "model.overrides.tie_embeddings false."
            )
        stages = self.pp * self.pp_stages_per_rank
        if stages > model_cfg.n_layer:
            raise ValueError(
                f"parallel.pp={self.pp} × pp_stages_per_rank={self.pp_stages_per_rank} = "
                f"{stages} stages exceeds the model's n_layer={model_cfg.n_layer}; "
                "use at most one stage per layer."
            )
        if self.pp_schedule != "interleaved_1f1b" and self.pp_stages_per_rank != 1:
            raise ValueError(
                f"parallel.pp_stages_per_rank must be 1 for pp_schedule {self.pp_schedule!r}; "
                "use interleaved_1f1b for several stages per rank."
            )
        n = self.pp_microbatches
        if self.pp_schedule == "1f1b" and n < stages:
            raise ValueError(
                f"parallel.pp_microbatches={n} must be at least the number of stages "
                f"({stages}) for pp_schedule '1f1b'."
            )
        rounds = max(1, n // self.pp)  # torch's interleaved 1F1B runs n // pp rounds
        if self.pp_schedule == "interleaved_1f1b" and n % rounds:
            raise ValueError(
                f"parallel.pp_microbatches={n} must be a multiple of max(1, "
                f"pp_microbatches // pp)={rounds} for pp_schedule 'interleaved_1f1b'; "
                f"use a multiple of pp={self.pp}."
            )
        if local_batch_size is not None and local_batch_size % n:
            raise ValueError(
                f"parallel.pp_microbatches={n} must divide the per-rank batch size "
                f"{local_batch_size} so every microbatch has the same size."
            )
