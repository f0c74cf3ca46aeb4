import numpy as np
import pytest
import torch
from PIL import Image

from baobab.data import (
    ArrayDataset,
    DataLoader,
    PrepareConfig,
    Subset,
    TokenWindows,
    load_arrays,
    load_digits,
    load_image_folder,
    make_regression,
    prepare,
    train_val_split,
)


@pytest.fixture
def corpus(tmp_path):
    """A bytes corpus with 3 train shards of at most 40 ids."""
    (tmp_path / "a.txt").write_text("abcdefghijklmnopqrstuvwxyz" * 4)
    out = tmp_path / "out"
    cfg = PrepareConfig(
        [str(tmp_path / "a.txt")], str(out), tokenizer="bytes", val_fraction=0.0,
        shard_tokens=40, workers=1, progress=False,
    )  # fmt: skip
    prepare(cfg)
    return out


def test_token_windows(corpus):
    ds = TokenWindows(corpus, "train", seq_len=6)
    shards = [np.asarray(s, dtype=np.int64) for s in ds.manifest.open_tokens("train")]
    assert [len(s) for s in shards] == [40, 40, 25]  # 104 bytes + eot
    assert len(ds) == 39 // 6 + 39 // 6 + 24 // 6 == 16
    expected = [s[k * 6 : k * 6 + 7] for s in shards for k in range((len(s) - 1) // 6)]
    idx = np.arange(len(ds))
    x, y = ds.get_batch(idx)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16, 6)
    assert x.is_contiguous() and y.is_contiguous()
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(x[i].numpy(), want[:-1])
        np.testing.assert_array_equal(y[i].numpy(), want[1:])
    xs, _ = ds.get_batch(np.array([15, 0, 7]))
    assert torch.equal(xs, x[[15, 0, 7]])
    assert ds.vocab_size == 259 and ds.eot_id == 256
    with pytest.raises(IndexError):
        ds.get_batch(np.array([16]))


def test_token_windows_too_short(corpus):
    with pytest.raises(ValueError, match="has 105 tokens, fewer than one window of seq_len 64"):
        TokenWindows(corpus, "train", seq_len=64)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        TokenWindows(corpus, "test", seq_len=4)


def test_dataloader_over_tokens_resumes(corpus):
    ds = TokenWindows(corpus, "train", seq_len=4, verify=False)
    loader = DataLoader(ds, batch_size=4, seed=1)
    assert loader.batches_per_epoch == len(ds) // 4
    first = [loader.next_batch()[0] for _ in range(3)]
    state = loader.state_dict()
    rest = [loader.next_batch()[0] for _ in range(10)]
    fresh = DataLoader(ds, batch_size=4, seed=1)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, (fresh.next_batch()[0] for _ in range(10))))
    assert loader.epoch >= 1 and first[0].shape == (4, 4)
    it = iter(loader)
    assert next(it)[0].shape == (4, 4)


def test_iter_epoch_is_ordered_and_leaves_state():
    ds = make_regression(n=10, in_features=2)
    for world in (1, 3):
        loaders = [DataLoader(ds, 2, rank=r, world_size=world) for r in range(world)]
        loaders[0].next_batch()
        state = loaders[0].state_dict()
        xs = [x for ld in loaders for x, _ in ld.iter_epoch()]
        got = torch.cat(xs)
        assert got.shape == (10, 2)
        assert sorted(got[:, 0].tolist()) == sorted(torch.from_numpy(ds.x[:, 0]).tolist())
        assert loaders[0].state_dict() == state
    ordered = torch.cat([x for x, _ in DataLoader(ds, 3).iter_epoch()])
    assert torch.equal(ordered, torch.from_numpy(ds.x))


def test_digits():
    ds, names = load_digits()
    assert names == [str(i) for i in range(10)] and ds.class_names == names
    x, y = ds.get_batch(np.arange(5))
    assert len(ds) == 1797 and x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and float(ds.x.min()) >= 0 and float(ds.x.max()) <= 1


def test_regression_and_split():
    ds = make_regression(n=100, in_features=4, out_features=2, seed=1)
    x, y = ds.get_batch(np.arange(8))
    assert x.shape == (8, 4) and y.shape == (8, 2) and y.dtype == torch.float32
    assert np.array_equal(ds.y, make_regression(n=100, in_features=4, out_features=2, seed=1).y)
    train, val = train_val_split(ds, 0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    rows = {tuple(r) for r in np.concatenate([train.x, val.x])}
    assert rows == {tuple(r) for r in ds.x}
    again = train_val_split(ds, 0.2, seed=0)[1]
    assert np.array_equal(val.x, again.x)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(ds, 1.0)


def test_split_generic_dataset(corpus):
    ds = TokenWindows(corpus, "train", seq_len=4, verify=False)
    train, val = train_val_split(ds, 0.25, seed=0)
    assert isinstance(val, Subset) and len(train) + len(val) == len(ds)
    x, _ = val.get_batch(np.array([0]))
    assert torch.equal(x, ds.get_batch(val.indices[:1])[0])


def test_array_dataset_and_files(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (6, 3), dtype=np.uint8)
    y = np.arange(6, dtype=np.int32)
    np.savez(tmp_path / "d.npz", inputs=x, labels=y)
    ds = load_arrays(tmp_path / "d.npz", x_key="inputs", y_key="labels")
    bx, by = ds.get_batch(np.array([1, 2]))
    assert bx.dtype == torch.float32 and by.dtype == torch.int64 and by.tolist() == [1, 2]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y.astype(np.float64))
    ds2 = load_arrays(tmp_path / "x.npy", tmp_path / "y.npy")
    assert ds2.get_batch(np.array([0]))[1].dtype == torch.float32
    with pytest.raises(ValueError, match="has no array 'x'"):
        load_arrays(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="pass the targets .npy file"):
        load_arrays(tmp_path / "x.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_arrays(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="same number of samples"):
        ArrayDataset(x, y[:3])


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_image_folder(tmp_path, mode, channels):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            shape = (10, 12, 3) if mode == "RGB" else (10, 12)
            img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
            img.save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds, names = load_image_folder(tmp_path, image_size=(8, 6))
    assert names == ["cat", "dog"]
    x, y = ds.get_batch(np.arange(len(ds)))
    assert x.shape == (6, channels, 8, 6) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path / "cat", 8)
