"""In-memory datasets for the small models: arrays, image folders, digits, regression.

Every dataset here has `__len__` and `get_batch(indices) -> (x, y)` like `TokenWindows`,
so the same `DataLoader` serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow's names for the formats of IMAGE_EXTENSIONS: the only decoders tried on bytes a
# user sends or names (serving, ``baobab explain --inputs``).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")


class BatchDataset(Protocol):
    """What `DataLoader` needs from a dataset."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class ArrayDataset:
    """Inputs `x` (N, ...) and targets `y` (N, ...) held in memory.

    x is stored as float32; y as int64 when it is integer (class labels), else float32.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, class_names: Sequence[str] | None = None
    ) -> None:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise ValueError(
                f"x and y must have the same number of samples, got shapes {x.shape} and {y.shape}"
            )
        if len(x) == 0:
            raise ValueError("the dataset is empty; x and y need at least one sample")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ValueError(f"x must be numeric, got dtype {x.dtype}")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        integer = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_
        self.y = np.ascontiguousarray(y, dtype=np.int64 if integer else np.float32)
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.x[idx], self.y[idx], self.class_names)

    def __repr__(self) -> str:
        return f"ArrayDataset(x={tuple(self.x.shape)}, y={tuple(self.y.shape)} {self.y.dtype})"


class Subset:
    """Rows `indices` of any dataset with `get_batch`."""

    def __init__(self, dataset: BatchDataset, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.get_batch(self.indices[np.asarray(indices, dtype=np.int64)])


def train_val_split(dataset: Any, val_fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """Split a dataset into (train, val) by a seeded permutation; both keep sorted order."""
    n = len(dataset)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if not 1 <= n_val <= n - 1:
        raise ValueError(
            f"val_fraction {val_fraction} of {n} samples leaves an empty split; "
            f"choose a fraction that gives each split at least one sample"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if isinstance(dataset, ArrayDataset):
        return dataset.subset(train_idx), dataset.subset(val_idx)
    return Subset(dataset, train_idx), Subset(dataset, val_idx)


def load_arrays(
    path: str | Path,
    targets_path: str | Path | None = None,
    x_key: str = "x",
    y_key: str = "y",
) -> ArrayDataset:
    """An ArrayDataset from a .npz (keys `x_key`, `y_key`) or a pair of .npy files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file '{path}' does not exist")
    suffix = path.suffix.lower()
    # allow_pickle=False: never unpickle a file a user hands in.
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            for key in (x_key, y_key):
                if key not in z.files:
                    raise ValueError(
                        f"'{path}' has no array '{key}' (arrays: {', '.join(z.files)})"
                    )
            return ArrayDataset(z[x_key], z[y_key])
    if suffix == ".npy":
        if targets_path is None:
            raise ValueError(f"'{path}' is a .npy file, so pass the targets .npy file as well")
        targets_path = Path(targets_path)
        if not targets_path.is_file():
            raise FileNotFoundError(f"array file '{targets_path}' does not exist")
        return ArrayDataset(
            np.load(path, allow_pickle=False), np.load(targets_path, allow_pickle=False)
        )
    raise ValueError(f"'{path}' must be a .npz file or a .npy file with a targets .npy file")


def load_image_folder(
    root: str | Path, image_size: int | tuple[int, int]
) -> tuple[ArrayDataset, list[str]]:
    """Images from `root/<class>/<image>`; x is (N, C, H, W) float32 in [0, 1].

    Classes are the sorted subfolder names (label = position). C is 1 when every image
    is grayscale, else 3 (RGB; alpha is dropped). Images are resized to `image_size`
    (an int for square, or (height, width)).
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((p, label))
    if not files:
        raise ValueError(
            f"'{root}' holds no images; expected class subfolders with {', '.join(IMAGE_EXTENSIONS)} files"
        )
    # Opening is lazy (header only), so this pass is cheap.
    gray = True
    for p, _ in files:
        with Image.open(p) as img:
            gray = gray and img.mode in ("1", "L", "LA", "I", "I;16", "F")
    mode = "L" if gray else "RGB"
    x = np.empty((len(files), 1 if gray else 3, h, w), dtype=np.float32)  # (N, C, H, W)
    for i, (p, _) in enumerate(files):
        with Image.open(p) as img:
            img = img.convert(mode).resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
        x[i] = arr[None] if gray else arr.transpose(2, 0, 1)
    y = np.array([label for _, label in files], dtype=np.int64)
    return ArrayDataset(x, y, classes), classes


def decode_image(data: bytes, channels: int, side: int, index: int = 0) -> np.ndarray:
    """Encoded image bytes -> float32 (C, side, side) in [0, 1], preprocessed as
    :func:`load_image_folder` does: converted to "L" (C=1) or "RGB" (C=3), resized with
    bilinear filtering. ValueError (naming image ``index``) for bytes Pillow cannot decode."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((side, side), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
    except Exception:  # Pillow raises many types for bad bytes: one sentence for all
        raise ValueError(f"image {index} could not be decoded; send PNG or JPEG bytes.") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_digits() -> tuple[ArrayDataset, list[str]]:
    """scikit-learn's bundled 8x8 digits: x (1797, 1, 8, 8) in [0, 1], y int64 in 0..9."""
    from sklearn.datasets import load_digits as _sk_digits

    digits = _sk_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    names = [str(i) for i in range(10)]
    return ArrayDataset(x, digits.target.astype(np.int64), names), names


def make_regression(
    n: int = 1000, in_features: int = 10, out_features: int = 1, noise: float = 0.1, seed: int = 0
) -> ArrayDataset:
    """Synthetic y = x @ W + b + noise * eps with x, eps ~ N(0, 1); y is (n, out_features)."""
    if n < 1 or in_features < 1 or out_features < 1:
        raise ValueError(
            f"n, in_features and out_features must be at least 1, got {n}, {in_features}, {out_features}"
        )
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((in_features, out_features)) / np.sqrt(in_features)
    bias = rng.standard_normal(out_features)
    x = rng.standard_normal((n, in_features))
    y = x @ weight + bias + noise * rng.standard_normal((n, out_features))
    return ArrayDataset(x.astype(np.float32), y.astype(np.float32))
