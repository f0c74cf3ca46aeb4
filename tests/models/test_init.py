"""Initialisation by name: every tensor of every family has a rule, and a value depends only
on the seed and its name (what makes a sharded init equal the one-process init)."""

from __future__ import annotations

import pytest
import torch

from baobab.models import LoRAConfig, apply_lora, build_model, model_names
from baobab.models.common.init import init_rules, materialize, rule_for


@pytest.mark.parametrize("name", model_names())
def test_every_tensor_of_every_model_has_an_init_rule(name: str) -> None:
    model = build_model(name, device="meta")
    rules = init_rules(model)
    for tensor_name, _ in [*model.named_parameters(), *model.named_buffers()]:
        rule_for(rules, tensor_name, model)  # raises, naming the tensor, when none matches


def test_a_value_depends_only_on_the_seed_and_its_name() -> None:
    small = build_model("gpt-nano", seed=11, n_layer=2, tie_embeddings=False)
    deeper = build_model("gpt-nano", seed=11, n_layer=3, tie_embeddings=False)
    other = build_model("gpt-nano", seed=12, n_layer=2, tie_embeddings=False)
    # Same seed and name, same distribution: the same values, whatever else the model holds.
    for name in ("tok_embeddings.weight", "layers.1.attention.wq.weight", "output.weight"):
        assert torch.equal(small.get_parameter(name), deeper.get_parameter(name)), name
        assert not torch.equal(small.get_parameter(name), other.get_parameter(name)), name
    # Two tensors of one shape get different values (their names differ).
    wk, wv = small.layers["0"].attention.wk.weight, small.layers["0"].attention.wv.weight
    assert not torch.equal(wk, wv)
    # The residual projections keep GPT-2's 1/sqrt(2 n_layer) scaling (out_std = 0.01 here).
    assert 0.008 < small.layers["0"].attention.wo.weight.std() < 0.012
    assert 0.018 < small.layers["0"].attention.wq.weight.std() < 0.022


def test_lora_adapters_are_initialised_by_name_on_meta_and_allocated_models() -> None:
    cfg = LoRAConfig(rank=2, targets=("wq",))
    direct = apply_lora(build_model("gpt-nano", seed=3), cfg, seed=5)
    meta = apply_lora(build_model("gpt-nano", device="meta"), cfg)
    assert meta.layers["0"].attention.wq.lora_A.is_meta  # left to the materialiser
    materialize(meta, 5, "cpu")
    for name in ("layers.0.attention.wq.lora_A", "layers.1.attention.wq.lora_B"):
        assert torch.equal(direct.get_parameter(name), meta.get_parameter(name)), name
    assert torch.count_nonzero(direct.layers["0"].attention.wq.lora_B) == 0
    assert direct.layers["0"].attention.wq.lora_A.abs().max() > 0
