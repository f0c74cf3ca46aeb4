import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baobab.data import (
    Manifest,
    PrepareConfig,
    byte_tokenizer,
    find_files,
    iter_documents,
    prepare,
    stdlib_files,
    token_dtype,
)
from baobab.data.manifest import sha256_file
from baobab.data.prepare import val_score

DOCS = [
    "first document\nwith two lines\n",
    "  indented — ünïcödé 世界 🌍\t",
    "a literal <|endoftext|> stays text",
    "def f(x):\n    return x + 1\n",
    "short",
    "the quick brown fox jumps over the lazy dog " * 3,
]


def write_corpus(root: Path, n_files: int = 12) -> list[str]:
    """n_files text files in root/ and root/sub/; returns the documents in sorted-file order."""
    (root / "sub").mkdir(parents=True)
    paths = []
    for i in range(n_files):
        p = root / ("sub" if i % 2 else "") / f"doc{i:02d}.txt"
        p.write_text(f"{i}: " + DOCS[i % len(DOCS)], encoding="utf-8")
        paths.append(p)
    (root / "ignored.bin").write_bytes(b"\x00\x01")  # wrong extension: not picked up
    return [p.read_text(encoding="utf-8") for p in sorted(paths, key=str)]


def cfg(inputs, out, **kw) -> PrepareConfig:
    base = dict(tokenizer="bytes", workers=1, progress=False, val_fraction=0.3, shard_tokens=64)
    base.update(kw)
    return PrepareConfig(inputs=[str(i) for i in inputs], out=str(out), **base)


def decode_split(m: Manifest, split: str) -> list[str]:
    tok = m.tokenizer()
    arrays = [np.asarray(a) for a in m.open_tokens(split)]
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    assert ids.size == 0 or ids[-1] == m.eot_id  # every document ends with end-of-text
    pieces = np.split(ids, np.flatnonzero(ids == m.eot_id) + 1)[:-1]  # each ends with eot
    return [tok.decode(p[:-1]) for p in pieces]


def expected_split(docs: list[str], seed: int, frac: float) -> dict[str, list[str]]:
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):  # one document per text file
        out["val" if val_score(seed, i, 0) < frac else "train"].append(d)
    return out


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_round_trip_and_manifest(tmp_path, tokenizer):
    docs = write_corpus(tmp_path / "raw")
    out = tmp_path / "out"
    m = prepare(cfg([tmp_path / "raw"], out, tokenizer=tokenizer, vocab_size=300, min_frequency=1))
    want = expected_split(docs, seed=0, frac=0.3)
    assert want["val"] and want["train"]
    for split in ("train", "val"):
        assert decode_split(m, split) == want[split]

    loaded = Manifest.load(out)
    data = json.loads((out / "manifest.json").read_text())
    assert loaded.data == data == m.data
    assert data["dtype"] == "uint16" and loaded.dtype == np.uint16
    assert data["tokenizer"]["kind"] == tokenizer
    assert data["tokenizer"]["vocab_size"] == (259 if tokenizer == "bytes" else 300)
    assert data["sources"] == {"files": 12, "bytes": sum(len(d.encode()) for d in docs)}
    assert data["config"]["tokenizer"] == tokenizer
    for split in ("train", "val"):
        info = data["splits"][split]
        assert info["documents"] == len(want[split])
        sizes = [s["tokens"] for s in info["shards"]]
        assert sum(sizes) == info["tokens"] == loaded.split_tokens(split)
        assert all(n == 64 for n in sizes[:-1]) and 0 < sizes[-1] <= 64
        for shard, path in zip(info["shards"], loaded.shard_paths(split)):
            assert path.name == shard["file"] and path.name.startswith(f"{split}_")
            assert path.stat().st_size == 2 * shard["tokens"]
            assert sha256_file(path) == shard["sha256"]
    loaded.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp dirs left
    assert len(data["splits"]["train"]["shards"]) > 1


def test_workers_do_not_change_output(tmp_path):
    write_corpus(tmp_path / "raw")
    outs = []
    for w in (1, 2):
        out = tmp_path / f"out{w}"
        prepare(cfg([tmp_path / "raw"], out, workers=w))
        outs.append(out)
    a, b = (Manifest.load(o).data for o in outs)
    assert a["config"].pop("workers") == 1 and b["config"].pop("workers") == 2
    a["config"].pop("out"), b["config"].pop("out")
    assert a == b
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        if name == "manifest.json":  # differs only in config, compared above
            continue
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_dtype_rule():
    assert token_dtype(259) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(2**32) == np.uint32
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(2**32 + 1)


def test_refuses_to_overwrite_and_replaces_only_when_complete(tmp_path):
    write_corpus(tmp_path / "raw")
    out = tmp_path / "out"
    first = prepare(cfg([tmp_path / "raw"], out))
    with pytest.raises(ValueError, match="already holds a prepared corpus; pass --overwrite"):
        prepare(cfg([tmp_path / "raw"], out))
    # A failing overwrite (bad jsonl line) must leave the old corpus untouched.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 has no 'text' field"):
        prepare(cfg([bad], out, overwrite=True))
    assert Manifest.load(out).data == first.data
    Manifest.load(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out", "raw"]
    second = prepare(cfg([tmp_path / "raw"], out, overwrite=True, seed=1))
    assert Manifest.load(out).data == second.data != first.data


def test_refuses_a_directory_it_did_not_write(tmp_path):
    write_corpus(tmp_path / "raw")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="is not a prepared corpus"):
        prepare(cfg([tmp_path / "raw"], tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^input '.*nope' does not exist$"):
        prepare(cfg([tmp_path / "nope"], tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files with extensions"):
        find_files([tmp_path / "empty"])
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="all 1 input files are empty"):
        prepare(cfg([tmp_path / "empty"], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_no_validation_document(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(
        ValueError,
        match=r"no document fell into the validation split \(1 documents, val_fraction 0.01\)",
    ):
        prepare(cfg([tmp_path / "one.txt"], tmp_path / "out", val_fraction=0.01, seed=3))
    m = prepare(cfg([tmp_path / "one.txt"], tmp_path / "out", val_fraction=0.0))
    assert m.split_tokens("val") == 0 and m.shard_paths("val") == []
    assert decode_split(m, "train") == ["just one document"]


def test_corrupt_shard_fails_verify(tmp_path):
    write_corpus(tmp_path / "raw")
    m = prepare(cfg([tmp_path / "raw"], tmp_path / "out"))
    shard = m.shard_paths("train")[1]
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    m.verify("val")
    with pytest.raises(
        ValueError,
        match=f"^shard {shard.name} failed its checksum: the corpus in .*out is corrupt; re-run baobab prepare$",
    ):
        m.verify("train")


def test_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json; run `baobab prepare` first"):
        Manifest.load(tmp_path)


def test_jsonl_parquet_and_tokenizer_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"row {i} " + DOCS[i % len(DOCS)] for i in range(30)]
    with (raw / "a.jsonl").open("w", encoding="utf-8") as f:
        for r in rows[:15]:
            f.write(json.dumps({"body": r}) + "\n")
        f.write("\n")  # blank lines are skipped
    pq.write_table(
        pa.table({"body": rows[15:], "n": list(range(15))}), raw / "b.parquet", row_group_size=4
    )
    assert list(iter_documents(raw / "a.jsonl", "body")) == rows[:15]
    assert list(iter_documents(raw / "b.parquet", "body")) == rows[15:]
    with pytest.raises(ValueError, match="b.parquet has no column 'text'"):
        list(iter_documents(raw / "b.parquet"))

    byte_tokenizer().save(tmp_path / "tok.json")
    m = prepare(cfg([raw], tmp_path / "out", text_key="body", tokenizer=str(tmp_path / "tok.json")))
    assert m.data["tokenizer"]["kind"] == "file"
    assert m.split_documents("train") + m.split_documents("val") == 30
    docs = decode_split(m, "train") + decode_split(m, "val")
    assert sorted(docs) == sorted(rows)
    # document index within a file feeds the split hash
    want_val = [r for i, r in enumerate(rows[:15]) if val_score(0, 0, i) < 0.3]
    want_val += [r for i, r in enumerate(rows[15:]) if val_score(0, 1, i) < 0.3]
    assert decode_split(m, "val") == want_val


def test_find_files_rules(tmp_path):
    write_corpus(tmp_path / "raw", n_files=3)
    odd = tmp_path / "notes.md"
    odd.write_text("markdown is read as text")
    files = find_files([tmp_path / "raw", odd, tmp_path / "raw" / "doc00.txt"])
    assert files == sorted(files, key=str) and len(files) == len(set(files)) == 4
    assert odd in files and all(p.suffix in (".txt", ".md") for p in files)
    assert list(iter_documents(odd)) == ["markdown is read as text"]


def test_config_validation(tmp_path):
    for kw, word in [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"shard_tokens": 0}, "shard_tokens"),
        ({"workers": -1}, "workers"),
    ]:
        with pytest.raises(ValueError, match=word):
            cfg([tmp_path], tmp_path / "out", **kw)
    with pytest.raises(FileNotFoundError, match="tokenizer 'missing.json'"):
        prepare(cfg([tmp_path], tmp_path / "out", tokenizer="missing.json"))


def test_stdlib_files():
    files = stdlib_files()
    assert len(files) > 100
    parts = {part for f in files for part in f.parts[-4:-1]}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert not any(f.name.startswith("test_") for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
