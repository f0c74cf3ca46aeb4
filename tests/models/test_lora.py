"""LoRA: only adapters train, zero-init parity, merge parity and strict reload, adapter I/O."""

import pytest
import torch
import torch.nn.functional as F

from baobab.models import build_model
from baobab.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)

ALL = LoRAConfig(rank=4, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


def nano(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("gpt-nano").eval()


def batch() -> torch.Tensor:
    return torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))


def randomize_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.05)


def test_only_adapters_train_and_loss_falls() -> None:
    model = apply_lora(nano(), ALL).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert len(lora_parameters(model)) == 2 * 7 * 2  # 7 targets x 2 layers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    x = batch()
    losses = []
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    assert all(not torch.equal(params[n], before) for n, before in adapters.items())


def test_zero_init_is_exact_and_names_are_kept() -> None:
    x = batch()
    base = nano()
    expected = base(x)
    base_keys = list(base.state_dict())
    model = apply_lora(base, LoRAConfig())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    keys = list(model.state_dict())
    assert [k for k in keys if not k.endswith((".lora_A", ".lora_B"))] == base_keys
    assert "layers.0.attention.wq.weight" in keys and "layers.0.attention.wq.lora_A" in keys
    assert not any(isinstance(model.get_submodule(k), LoRALinear) for k in ("output",))
    wq = model.get_submodule("layers.0.attention.wq")
    assert wq.lora_A.shape == (8, 64) and wq.lora_B.shape == (64, 8) and wq.scaling == 2.0


def test_merge_matches_adapter_and_loads_strictly() -> None:
    x = batch()
    model = apply_lora(nano(), ALL)
    randomize_b(model)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, nano()(x))  # the adapter does change the output
        merged = merge_lora(model)
        torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    fresh = nano(seed=5)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), merged(x), rtol=0, atol=0)
    assert fresh.output.weight is fresh.tok_embeddings.weight


def test_lora_state_dict_round_trip() -> None:
    x = batch()
    model = apply_lora(nano(), ALL)
    randomize_b(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert sd and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    other = apply_lora(nano(), ALL)  # same base weights, fresh adapters
    assert not torch.equal(other(x), model(x))
    load_lora_state_dict(other, sd)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"missing keys: \['layers.0.attention.wk.lora_A'"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if ".wk." not in k})
    wrong = apply_lora(nano(), LoRAConfig(rank=2, targets=ALL.targets))
    with pytest.raises(ValueError, match="use the LoRAConfig.rank it was trained with"):
        load_lora_state_dict(wrong, sd)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"LoRAConfig.rank must be an integer >= 1; got 0\."),
        ({"rank": 2.0}, "LoRAConfig.rank must be an integer"),
        ({"alpha": 0.0}, r"LoRAConfig.alpha must be a positive number; got 0.0\."),
        ({"dropout": 1.0}, r"LoRAConfig.dropout must be in \[0, 1\); got 1.0\."),
        ({"targets": ()}, "LoRAConfig.targets must be a non-empty list"),
        ({"targets": ("wq", "")}, "LoRAConfig.targets must be a non-empty list"),
    ],
)
def test_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_bad_targets() -> None:
    assert LoRAConfig(targets=["wq", "wv"]).targets == ("wq", "wv")
    with pytest.raises(ValueError, match=r"entry 'q_proj' matches no nn.Linear module; .*wq"):
        apply_lora(nano(), LoRAConfig(targets=("wq", "q_proj")))
    with pytest.raises(ValueError, match="'output' shares its weight with another module"):
        apply_lora(nano(), LoRAConfig(targets=("output",)))
    model = apply_lora(nano(), LoRAConfig(targets=("wq",)))
    with pytest.raises(ValueError, match="entry 'wq' matches no nn.Linear module"):
        apply_lora(model, LoRAConfig(targets=("wq",)))  # already adapted
