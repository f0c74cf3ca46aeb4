"""ResNet, LSTM and MLP shapes, layouts and initialisation."""

import pytest
import torch
from torch import nn

from baobab.models import build_model, count_params
from baobab.models.common import materialize


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_shapes(depth: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", depth=depth, num_classes=7, width=4, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    small = build_model("resnet18-digits", depth=depth, width=4).eval()
    assert isinstance(small.maxpool, nn.Identity) and small.conv1.kernel_size == (3, 3)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_resnet_torchvision_names() -> None:
    keys = build_model("resnet50", device="meta").state_dict().keys()
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.bias"]:  # fmt: skip
        assert key in keys
    assert "layer1.0.downsample.0.weight" not in build_model("resnet18", device="meta").state_dict()


def test_resnet_meta_init_resets_batchnorm_stats() -> None:
    model = materialize(build_model("resnet18-digits", device="meta", width=4), 0, "cpu")
    assert torch.equal(model.bn1.running_var, torch.ones(4))
    assert torch.equal(model.bn1.running_mean, torch.zeros(4))
    assert model.bn1.num_batches_tracked.item() == 0


def test_lstm_shapes_tie_and_projection() -> None:
    torch.manual_seed(0)
    base = dict(vocab_size=40, d_embed=8, d_hidden=12, n_layer=2, dropout=0.1)
    untied = build_model("lstm-tiny", **base)
    assert untied.proj is None and untied.output.weight.shape == (40, 12)
    assert untied(torch.randint(0, 40, (3, 5))).shape == (3, 5, 40)
    tied = build_model("lstm-tiny", **base, tie_embeddings=True)
    assert tied.output.weight is tied.embedding.weight
    assert tied.proj.weight.shape == (8, 12)
    assert tied(torch.randint(0, 40, (3, 5))).shape == (3, 5, 40)
    equal = build_model("lstm-tiny", **{**base, "d_hidden": 8}, tie_embeddings=True)
    assert equal.proj is None
    assert (
        count_params(equal)
        == count_params(build_model("lstm-tiny", **{**base, "d_hidden": 8})) - 40 * 8
    )
    meta = build_model("lstm-tiny", device="meta", **base, tie_embeddings=True)
    materialize(meta, 1, "cpu")
    assert meta.output.weight is meta.embedding.weight  # the tie survives to_empty
    direct = build_model("lstm-tiny", seed=1, **base, tie_embeddings=True)
    for (name, p), q in zip(direct.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(p, q), name
    assert meta(torch.randint(0, 40, (1, 4))).shape == (1, 4, 40)


def test_mlp_is_the_seed_network() -> None:
    torch.manual_seed(0)
    seed = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
    model = build_model("mlp", seed=0)
    assert [k for k in model.state_dict()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for lin in (model.fc1, model.fc2):  # nn.Linear's own distributions: U(+-1/sqrt(fan_in))
        bound = 1 / lin.in_features**0.5
        assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
    seed.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in model.state_dict().items()})  # fmt: skip
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), seed(x))
    assert model(x).shape == (4, 1)
    deep = build_model("mlp", hidden=(6, 7), activation="tanh", out_features=3)
    assert deep(x).shape == (4, 3) and hasattr(deep, "fc3")
    assert build_model("mlp", hidden=())(x).shape == (4, 1)
