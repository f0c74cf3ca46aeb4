"""Single-process checks: config refusals, resolution, names, pipeline split, plans, clipping."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import SequenceParallel

from baobab.models import build_model, get_config
from baobab.optim import clip_gradients
from baobab.parallel import (
    TP_PLANS,
    ParallelConfig,
    clip_grad_norm_parallel,
    parallelize,
    split_for_pipeline,
)
from baobab.parallel.pipeline import stage_layer_ranges
from baobab.parallel.tp_plans import plan_for_module

GPT = get_config("gpt-nano")  # n_head 4, n_kv_head 2, ffn 192, vocab 512, 2 layers, tied
GPT_UNTIED = get_config("gpt-nano", n_layer=4, tie_embeddings=False)
BERT = get_config("bert-tiny")  # n_head 2


def _refused(cfg: ParallelConfig, world: int, model_cfg, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        cfg.validate(world, model_cfg, **kwargs)
    msg = str(info.value)
    # One sentence: ends with a full stop, no sentence break inside.
    assert msg.endswith(".") and not re.search(r"[.;]\s+[A-Z]", msg), msg
    return msg


def test_product_must_match_world_size() -> None:
    msg = _refused(ParallelConfig(dp_replicate=2, dp_shard=2, tp=2), 4, GPT)
    for part in ("dp_replicate=2", "dp_shard=2", "tp=2", "pp=1", "world size 4"):
        assert part in msg
    msg = _refused(ParallelConfig(tp=3), 4, GPT)
    assert "dp_shard=-1" in msg and "tp=3" in msg and "4" in msg


@pytest.mark.parametrize(
    ("model_cfg", "tp", "key"),
    [
        (get_config("gpt-nano", n_head=2, n_kv_head=2), 4, "n_head=2"),
        (GPT, 4, "n_kv_head=2"),
        (get_config("gpt-nano", n_head=4, n_kv_head=4, ffn_hidden=190), 4, "ffn_hidden=190"),
        (get_config("gpt-nano", n_kv_head=4, vocab_size=510), 4, "vocab_size=510"),
        (BERT, 4, "n_head=2"),
    ],
)
def test_tp_must_divide_sharded_dims(model_cfg, tp: int, key: str) -> None:
    msg = _refused(ParallelConfig(tp=tp), tp, model_cfg)
    assert f"parallel.tp={tp}" in msg and key in msg


def test_sequence_parallel_needs_divisible_seq_len() -> None:
    msg = _refused(ParallelConfig(tp=2), 2, GPT, seq_len=15)
    assert "sequence_parallel" in msg and "15" in msg
    ParallelConfig(tp=2, sequence_parallel=False).validate(2, GPT, seq_len=15)


@pytest.mark.parametrize(("family", "key"), [("resnet18-digits", "tp"), ("lstm-tiny", "pp"),
                                             ("mlp", "tp"), ("bert-tiny", "pp")])  # fmt: skip
def test_unsupported_family_only_data_parallel(family: str, key: str) -> None:
    msg = _refused(ParallelConfig(**{key: 2}), 2, get_config(family))
    assert f"parallel.{key} must be 1" in msg and family.split("-")[0][:4] in msg
    ParallelConfig().validate(2, get_config(family))  # FSDP-2 is fine


def test_pipeline_refuses_tied_embeddings() -> None:
    msg = _refused(ParallelConfig(pp=2), 2, GPT)
    assert msg == (
        "pipeline parallelism needs untied embeddings; set model.overrides.tie_embeddings false."
    )


def test_pipeline_stage_count_limits() -> None:
    msg = _refused(ParallelConfig(pp=4), 4, get_config("gpt-nano", tie_embeddings=False))
    assert "4 stages exceeds" in msg and "n_layer=2" in msg
    msg = _refused(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), 2,
                   get_config("gpt-nano", tie_embeddings=False))  # fmt: skip
    assert "pp_stages_per_rank=2" in msg
    msg = _refused(ParallelConfig(pp=2, pp_schedule="gpipe", pp_stages_per_rank=2), 2, GPT_UNTIED)
    assert "pp_stages_per_rank must be 1" in msg and "gpipe" in msg


def test_pipeline_microbatch_rules() -> None:
    msg = _refused(ParallelConfig(pp=2, pp_microbatches=1), 2, GPT_UNTIED)
    assert "pp_microbatches=1" in msg and "1f1b" in msg
    msg = _refused(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=5), 2,
                   GPT_UNTIED)  # fmt: skip
    assert "pp_microbatches=5" in msg and "interleaved_1f1b" in msg
    msg = _refused(ParallelConfig(pp=2, pp_microbatches=4), 2, GPT_UNTIED, local_batch_size=6)
    assert "pp_microbatches=4" in msg and "6" in msg
    ParallelConfig(pp=2, pp_schedule="gpipe", pp_microbatches=1).validate(2, GPT_UNTIED)


@pytest.mark.parametrize(
    "kwargs",
    [{"tp": 0}, {"dp_shard": 0}, {"dp_shard": -2}, {"pp": True}, {"pp_microbatches": -1},
     {"pp_schedule": "zb"}],
)  # fmt: skip
def test_field_values_refused_at_construction(kwargs) -> None:
    with pytest.raises(ValueError, match=r"^parallel\.\w+ must be"):
        ParallelConfig(**kwargs)


def test_resolved_fills_automatic_values() -> None:
    cfg = ParallelConfig(tp=2).resolved(8)
    assert (cfg.dp_shard, cfg.pp_stages_per_rank, cfg.pp_microbatches) == (4, 1, 1)
    cfg = ParallelConfig(pp=2, pp_schedule="interleaved_1f1b").resolved(4)
    assert (cfg.dp_shard, cfg.pp_stages_per_rank, cfg.pp_microbatches) == (2, 2, 4)
    cfg = ParallelConfig(pp=4, pp_microbatches=8).resolved(4)
    assert (cfg.dp_shard, cfg.pp_stages_per_rank, cfg.pp_microbatches) == (1, 1, 8)
    assert ParallelConfig().resolved(1).is_distributed is False
    with pytest.raises(ValueError, match="resolved"):
        _ = ParallelConfig().dp_size


@pytest.mark.parametrize(
    ("kwargs", "world", "name", "dp"),
    [
        ({}, 1, "single", 1),
        ({}, 2, "FSDP-2", 2),
        ({"dp_replicate": 2, "dp_shard": 1}, 2, "DDP-2", 2),
        ({"dp_replicate": 2}, 4, "HSDP-2×2", 4),
        ({"tp": 2}, 4, "FSDP-2×TP-2", 2),
        ({"pp": 2, "tp": 2}, 4, "PP-2(1f1b)×TP-2", 1),
    ],
)
def test_strategy_name_and_dp_size(kwargs, world: int, name: str, dp: int) -> None:
    cfg = ParallelConfig(**kwargs).resolved(world)
    assert cfg.strategy_name == name and cfg.dp_size == dp
    assert cfg.is_distributed == (world > 1)


def test_nothing_parallel_returns_model_untouched() -> None:
    model = build_model(GPT)
    pm = parallelize(model, None, ParallelConfig())
    assert pm.parts == [model] and pm.schedule is None and pm.is_first and pm.is_last


def test_stage_layer_ranges_balanced_front_first() -> None:
    assert stage_layer_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layer_ranges(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]


def test_pipeline_split_keeps_names_and_composes_to_full_model() -> None:
    torch.manual_seed(0)
    model = build_model("gpt-nano", n_layer=5, tie_embeddings=False)
    full_names = dict(model.named_parameters())
    (_, first), = split_for_pipeline(model, 0, 2, 1)  # fmt: skip
    (_, last), = split_for_pipeline(model, 1, 2, 1)  # fmt: skip
    assert list(first.layers) == ["0", "1", "2"] and list(last.layers) == ["3", "4"]
    assert first.norm is None and first.output is None and last.tok_embeddings is None
    for part in (first, last):
        for name, p in part.named_parameters():
            assert torch.equal(p, full_names[name])
    assert len(list(model.layers)) == 5  # the input model is not modified
    idx = torch.randint(512, (2, 8))
    torch.testing.assert_close(last(first(idx)), model(idx), rtol=0, atol=0)


def test_interleaved_split_loops_stages_over_ranks() -> None:
    model = build_model("gpt-nano", n_layer=4, tie_embeddings=False)
    rank0 = split_for_pipeline(model, 0, 2, 2)
    rank1 = split_for_pipeline(model, 1, 2, 2)
    assert [i for i, _ in rank0] == [0, 2] and [i for i, _ in rank1] == [1, 3]
    assert [list(m.layers) for _, m in rank0] == [["0"], ["2"]]
    assert rank1[1][1].output is not None and rank1[0][1].output is None


def test_plans_are_data_and_follow_the_split() -> None:
    assert set(TP_PLANS) == {"gpt", "bert"}
    plan = TP_PLANS["gpt"](GPT, True)
    assert isinstance(plan["norm"], SequenceParallel)
    assert not any(isinstance(s, SequenceParallel) for s in TP_PLANS["gpt"](GPT, False).values())
    model = build_model("gpt-nano", n_layer=4, tie_embeddings=False)
    (_, stage), _ = split_for_pipeline(model, 1, 2, 2)
    kept = plan_for_module(plan, stage)  # stage 1: layer 1 only, no embeddings or head
    assert {k.split(".")[1] for k in kept} == {"1"}
    bert_kept = plan_for_module(TP_PLANS["bert"](BERT, True), build_model(BERT))
    assert "mlm_head.decoder" in bert_kept and "layers.1.feed_forward.w2" in bert_kept


def test_gpt_plan_follows_the_gpt2_variant() -> None:
    # LayerNorm, GELU MLP (no w3), learned positions, biases; n_kv_head = n_head = 12.
    gpt2 = get_config("gpt2", n_layer=2, vocab_size=512)
    plan, llama_plan = TP_PLANS["gpt"](gpt2, True), TP_PLANS["gpt"](GPT, True)
    assert "layers.*.feed_forward.w3" not in plan and "layers.*.feed_forward.w3" in llama_plan
    assert "pos_embeddings" in plan and "pos_embeddings" not in llama_plan
    model = build_model(gpt2, device="meta")
    modules = dict(model.named_modules())
    assert all(path in modules for path in plan_for_module(plan, model))
    ParallelConfig(tp=2).validate(2, gpt2, seq_len=64)  # the GPT-2 variant is not refused


def _parts_with_grads() -> list[nn.Module]:
    torch.manual_seed(0)
    parts = [nn.Linear(4, 8), nn.Linear(8, 2)]  # two "stages" of one model
    (parts[1](parts[0](torch.randn(5, 4))).square().sum() * 10).backward()
    return parts


def test_clip_matches_single_device_clipping() -> None:
    parts, ref = _parts_with_grads(), _parts_with_grads()
    norm = clip_grad_norm_parallel(parts, 0.5, 0.3)
    ref_norm = clip_gradients([p for m in ref for p in m.parameters()], 0.5, 0.3)
    torch.testing.assert_close(norm, ref_norm)
    for m, r in zip(parts, ref):
        for p, q in zip(m.parameters(), r.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    unclipped = clip_grad_norm_parallel(ref, None, None)  # measured, nothing changed
    torch.testing.assert_close(unclipped, torch.tensor(0.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_parallel(parts, 0.0, None)
