"""Serving image classifiers: PNG/JPEG bytes in, top-k (label, probability) out."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from engine_helpers import one_torch_thread  # noqa: F401 (autouse)
from PIL import Image

from baobab.models import build_model
from baobab.serve import AsyncClassifier, load_served_model
from baobab.serve.classifier import decode_image


def export_model(root, name: str, family: str, **overrides):
    """Checkpoint and ``baobab export`` a freshly initialised ``name``; the export dir."""
    from baobab.checkpoint import save_checkpoint
    from baobab.export import export_checkpoint

    torch.manual_seed(0)
    model = build_model(name, **overrides)
    config = dataclasses.asdict(model.cfg)
    meta = {"model": {"name": name, "family": family, "config": config}}
    ckpt = save_checkpoint(root / "run", 1, [model], [], {"step": 1}, meta)
    return export_checkpoint(ckpt, root / "export")


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def images(n: int, shape: tuple[int, ...], fmt: str = "PNG") -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode(rng.integers(0, 256, shape, dtype=np.uint8), fmt) for _ in range(n)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """resnet18-digits (1 channel, 8x8, 10 classes) served from its export."""
    export = export_model(tmp_path_factory.mktemp("digits"), "resnet18-digits", "resnet")
    served = load_served_model(export)
    assert isinstance(served, AsyncClassifier)
    return served


def expected_top(classifier: AsyncClassifier, data: list[bytes], k: int):
    x = np.stack([decode_image(b, classifier.channels, classifier.side) for b in data])
    x = torch.from_numpy(x)
    if classifier.flatten:
        x = x.flatten(1)
    with torch.no_grad():
        probs = classifier.model(x).softmax(-1)
    values, ids = probs.topk(k, dim=-1)
    return ids.tolist(), values.tolist()


def test_top_k_labels_and_probabilities_match_the_model(digits):
    data = images(3, (20, 12))  # any size: resized to 8x8 as in training
    results = asyncio.run(digits.classify(data, top_k=3))
    ids, values = expected_top(digits, data, 3)
    assert digits.labels == [str(i) for i in range(10)] and digits.model_name == "resnet18-digits"
    for result, row_ids, row_values in zip(results, ids, values):
        assert [label for label, _ in result] == [str(i) for i in row_ids]
        assert [p for _, p in result] == pytest.approx(row_values, abs=1e-6)
        probs = [p for _, p in result]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    everything = asyncio.run(digits.classify(data[:1], top_k=10))[0]
    assert sum(p for _, p in everything) == pytest.approx(1, abs=1e-5)


def test_preprocessing_is_training_s(tmp_path):
    from baobab.data import load_image_folder

    data = images(1, (16, 16, 3))[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(data)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.png").write_bytes(images(2, (16, 16, 3))[1])
    dataset, _ = load_image_folder(tmp_path, 8)
    assert np.array_equal(decode_image(data, 3, 8), dataset.x[0])


def test_jpeg_rgb_and_bad_bytes(tmp_path):
    export = export_model(tmp_path, "resnet18-digits", "resnet", in_channels=3, num_classes=4)
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "labels": list("wxyz")}))
    served = load_served_model(export)
    assert served.labels == list("wxyz") and served.channels == 3
    (result,) = asyncio.run(served.classify(images(1, (9, 9, 3), "JPEG"), top_k=9))
    assert sorted(label for label, _ in result) == list("wxyz")  # k is capped at the classes
    with pytest.raises(ValueError, match="image 1 could not be decoded; send PNG or JPEG"):
        asyncio.run(served.classify([images(1, (8, 8), "PNG")[0], b"not an image"], top_k=1))
    assert served.healthy


def test_mlp_classifier_takes_flattened_pixels(tmp_path):
    export = export_model(tmp_path, "mlp-digits", "mlp")
    served = load_served_model(export)
    assert (served.channels, served.side, served.flatten) == (1, 8, True)
    data = images(2, (8, 8))
    results = asyncio.run(served.classify(data, top_k=2))
    ids, _ = expected_top(served, data, 2)
    assert [[label for label, _ in r] for r in results] == [[str(i) for i in row] for row in ids]


def test_shutdown_refuses_new_work(tmp_path):
    served = load_served_model(export_model(tmp_path, "resnet18-digits", "resnet"))

    async def main():
        served.start()
        await served.classify(images(1, (8, 8)), top_k=1)
        await served.shutdown(timeout=1)
        with pytest.raises(RuntimeError, match="shutting down"):
            await served.classify(images(1, (8, 8)), top_k=1)

    asyncio.run(main())


def test_loader_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="bert model, which is not generative"):
        load_served_model(export_model(tmp_path / "bert", "bert-tiny", "bert", vocab_size=64))
    with pytest.raises(ValueError, match="not an image classifier"):
        load_served_model(export_model(tmp_path / "mlp", "mlp", "mlp"))  # regression
    with pytest.raises(FileNotFoundError):
        load_served_model(tmp_path / "nowhere")
