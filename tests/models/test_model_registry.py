"""Registry behaviour: names, overrides, errors and duplicate refusal."""

import dataclasses

import pytest
import torch

import baobab.models.registry as registry
from baobab.models import (
    GPTConfig,
    MLPConfig,
    ModelFamily,
    build_model,
    family_names,
    family_of,
    get_config,
    model_names,
    register_family,
    register_size,
    task_of,
)

REQUIRED = [
    "mlp", "gpt-nano", "gpt-mini", "gpt2-124m", "llama-1b", "llama-8b", "bert-tiny",
    "bert-mini", "bert-base", "resnet18", "resnet34", "resnet50", "resnet18-digits",
    "lstm-tiny", "lstm-small",
]  # fmt: skip


def test_names_are_sorted_and_complete() -> None:
    names = model_names()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)
    assert family_names() == ["bert", "gpt", "lstm", "mlp", "resnet"]
    assert set(family_names()) <= set(names)


def test_family_name_gives_the_config_defaults() -> None:
    assert get_config("mlp") == MLPConfig()
    assert get_config("gpt") == GPTConfig()
    assert get_config("gpt") == get_config("gpt-mini")


def test_overrides_and_tasks() -> None:
    cfg = get_config("gpt-nano", vocab_size=300, dropout=0.1)
    assert (cfg.vocab_size, cfg.dropout, cfg.d_model) == (300, 0.1, 64)
    assert family_of(cfg).name == "gpt" and family_of("bert-tiny").name == "bert"
    assert task_of("gpt-nano") == "causal_lm"
    assert task_of("bert-tiny") == "masked_lm"
    assert task_of("resnet18") == "classification"
    assert task_of("mlp") == "regression"
    assert task_of("mlp-digits") == "classification"
    model = build_model(cfg, n_layer=1)
    assert model.cfg.n_layer == 1 and model.cfg.vocab_size == 300


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-9000'; known models: ") as err:
        get_config("gpt-9000")
    assert ", ".join(model_names()) in str(err.value)
    with pytest.raises(ValueError, match="known models"):
        build_model("nope")


def test_unknown_override_names_key_and_fields() -> None:
    with pytest.raises(ValueError, match="unknown option 'n_layers' for model 'gpt-nano'") as err:
        get_config("gpt-nano", n_layers=3)
    assert "n_layer, n_head" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 66}, r"GPTConfig.d_model must be divisible by n_head; got d_model=66"),
        ({"n_kv_head": 3}, r"GPTConfig.n_kv_head must divide n_head"),
        ({"d_model": 72, "n_head": 8, "n_kv_head": 8}, r"head_dim\) must be even"),
        ({"n_layer": 0}, r"GPTConfig.n_layer must be a positive number; got 0"),
        ({"dropout": 1.5}, r"GPTConfig.dropout must be in \[0, 1\)"),
    ],
)
def test_invalid_gpt_config_is_one_sentence(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_config("gpt-nano", **overrides)


def test_other_invalid_configs() -> None:
    with pytest.raises(ValueError, match=r"ResNetConfig.depth must be one of 18, 34, 50; got 101"):
        get_config("resnet18", depth=101)
    with pytest.raises(ValueError, match=r"MLPConfig.activation must be one of 'relu'"):
        get_config("mlp", activation="swish")
    with pytest.raises(ValueError, match="BertConfig.d_model must be divisible by n_head"):
        get_config("bert-tiny", n_head=3)
    assert get_config("mlp", hidden=[4, 3]).hidden == (4, 3)


def test_duplicates_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_SIZES", dict(registry._SIZES))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    with pytest.raises(ValueError, match="'gpt-nano' is already registered"):
        register_size("gpt-nano", "gpt")
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_size("mlp", "mlp")
    gpt = family_of("gpt")
    with pytest.raises(ValueError, match="'gpt' is already registered"):
        register_family(gpt)
    with pytest.raises(ValueError, match="already belongs to family 'gpt'"):
        register_family(dataclasses.replace(gpt, name="gpt-two"))
    with pytest.raises(ValueError, match="unknown model family 'gpx'"):
        register_size("my-gpt", "gpx")
    with pytest.raises(ValueError, match="unknown option 'width'"):
        register_size("my-gpt", "gpt", width=3)
    register_size("my-gpt", "gpt", n_layer=1)
    assert "my-gpt" in model_names() and get_config("my-gpt").n_layer == 1


def test_new_family_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_SIZES", dict(registry._SIZES))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))

    @dataclasses.dataclass(frozen=True)
    class LinConfig:
        n: int = 3

    class Lin(torch.nn.Linear):
        def __init__(self, cfg: LinConfig) -> None:
            super().__init__(cfg.n, 1)
            self.cfg = cfg

    register_family(
        ModelFamily("lin", LinConfig, Lin, "regression", lambda c, b, t: torch.zeros(b, c.n))
    )
    assert registry.forward_flops("lin") == 6
    with pytest.raises(ValueError, match="ModelFamily.task must be one of causal_lm"):
        ModelFamily("x", LinConfig, Lin, "ranking", lambda c, b, t: torch.zeros(b, c.n))
