"""Serving image classifiers (ResNet, or an MLP classifier over flattened pixels).

An image arrives as encoded bytes (PNG, JPEG, ...); it is decoded with Pillow and
preprocessed exactly as training's ``baobab.data.load_image_folder`` does: converted to "L"
(1 channel) or "RGB" (3), resized to the model's square ``image_size`` with bilinear
filtering, scaled to [0, 1], laid out (C, H, W). The answer is the top-k (label,
probability) pairs of the softmax; labels come from the export's config.json ("labels"
or "class_names") when present, else they are class indices as strings.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from baobab.data.arrays import decode_image  # shared with ``baobab explain --inputs``
from baobab.models.mlp import MLP
from baobab.models.resnet import ResNet


def image_shape(model: nn.Module) -> tuple[int, int, bool]:
    """(channels, side, flatten) of the images ``model`` classifies; ValueError if none."""
    cfg = getattr(model, "cfg", None)
    if isinstance(model, ResNet):
        return cfg.in_channels, cfg.image_size, False
    if isinstance(model, MLP) and cfg.task == "classification":
        for channels in (1, 3):  # a square grey or RGB image, flattened (C, H, W) order
            side = math.isqrt(cfg.in_features // channels)
            if channels * side * side == cfg.in_features:
                return channels, side, True
        raise ValueError(
            f"this mlp takes {cfg.in_features} features, which is not a square grey or RGB "
            "image; only image classifiers can be served."
        )
    raise ValueError(
        f"a {type(model).__name__} is not an image classifier; serve a resnet or an mlp "
        "classification export."
    )


def class_labels(config: dict[str, Any], num_classes: int) -> list[str]:
    """Label names from an export's config.json, else "0", "1", ..."""
    names = config.get("labels") or config.get("class_names")
    if names is None:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(
            f"config.json lists {len(names)} labels but the model has {num_classes} classes."
        )
    return [str(n) for n in names]


class AsyncClassifier:
    """An image classifier behind an asyncio API; forwards run on one worker thread."""

    def __init__(self, model: nn.Module, model_name: str, labels: list[str]) -> None:
        self.model = model.eval()
        self.model_name = model_name
        self.channels, self.side, self.flatten = image_shape(model)
        self.labels = labels
        self.device = next(model.parameters()).device
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = True
        self._inflight = 0
        self._error: BaseException | None = None

    @property
    def healthy(self) -> bool:
        """False once a forward pass failed with an unexpected exception."""
        return self._error is None

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="baobab-classifier")

    def classify_sync(self, images: list[bytes], top_k: int) -> list[list[tuple[str, float]]]:
        """Top-``top_k`` (label, probability) per image, most likely first (any thread)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {top_k}.")
        if not images:
            return []
        arrays = [decode_image(b, self.channels, self.side, i) for i, b in enumerate(images)]
        x = torch.from_numpy(np.stack(arrays)).to(self.device)  # (B, C, H, W)
        if self.flatten:
            x = x.flatten(1)  # (B, C*H*W)
        dtype = next(self.model.parameters()).dtype
        try:
            with torch.inference_mode():
                probs = self.model(x.to(dtype)).float().softmax(-1)  # (B, K)
                values, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        except Exception as err:
            self._error = err
            raise
        return [
            [(self.labels[i], p) for i, p in zip(row_ids, row_values)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist())
        ]

    async def classify(self, images: list[bytes], top_k: int) -> list[list[tuple[str, float]]]:
        """Like :meth:`classify_sync`, off the event loop; ValueError for undecodable bytes."""
        if not self._accepting:
            raise RuntimeError("the classifier is shutting down")
        self.start()
        self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.classify_sync, images, top_k)
        finally:
            self._inflight -= 1

    async def shutdown(self, timeout: float) -> None:
        """Refuse new requests, wait up to ``timeout`` s for running ones, stop the worker."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
