import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from baobab.data import SPECIAL_TOKENS, Tokenizer, byte_tokenizer, train_bpe

TEXTS = [
    "Hello, world!\n",
    "  leading spaces\tand tabs\n\n",
    "unicode: héllo wörld — 世界 🌍🚀 ñ",
    "def f(x):\n    return x * 2  # comment\n",
    "a literal <|endoftext|> is just text",
    "",
    " ",
    "\r\n\x00\x7f",
]
CORPUS = [t * 3 for t in TEXTS] * 4


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=300, min_frequency=2)


def test_byte_tokenizer_ids_are_bytes():
    tok = byte_tokenizer()
    assert tok.vocab_size == 259
    assert (tok.eot_id, tok.pad_id, tok.mask_id) == (256, 257, 258)
    for text in TEXTS:
        assert tok.encode(text) == list(text.encode("utf-8"))


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_round_trip(kind, bpe):
    tok = byte_tokenizer() if kind == "bytes" else bpe
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(TEXTS)] == TEXTS


def test_special_tokens_are_plain_text_unless_allowed(bpe):
    for tok in (byte_tokenizer(), bpe):
        assert tok.eot_id not in tok.encode("x<|endoftext|>y")
        assert tok.encode("<|endoftext|>", allow_special=True) == [tok.eot_id]
        ids = [*tok.encode("ab"), tok.eot_id]
        assert tok.decode(ids) == "ab<|endoftext|>"
        assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_bpe_specials_and_merges(bpe):
    assert bpe.vocab_size == 300
    assert [bpe.eot_id, bpe.pad_id, bpe.mask_id] == [0, 1, 2]
    text = "def f(x):\n    return x * 2  # comment\n"
    assert len(bpe.encode(text)) < len(text.encode())  # merges were learned


def test_bpe_is_deterministic(bpe):
    again = train_bpe(iter(CORPUS), vocab_size=300, min_frequency=2)
    assert again.to_str() == bpe.to_str()


def test_save_load(tmp_path, bpe):
    for name, tok in (("bytes", byte_tokenizer()), ("bpe", bpe)):
        d = tmp_path / name
        d.mkdir()
        path = tok.save(d)
        assert path == d / "tokenizer.json"
        json.loads(path.read_text())  # a standard tokenizer.json
        for loaded in (Tokenizer.load(d), Tokenizer.load(path)):
            assert loaded.to_str() == tok.to_str()
            assert loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])
            assert loaded.eot_id == tok.eot_id


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json


def test_load_adds_missing_specials(tmp_path):
    raw = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 5
    assert [tok.eot_id, tok.pad_id, tok.mask_id] == [2, 3, 4]
    assert tok.encode("ab") == [0, 1]
    assert set(SPECIAL_TOKENS) <= set(tok.backend.get_vocab())


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        train_bpe(CORPUS, vocab_size=100)


def test_bpe_is_deterministic_across_processes(bpe):
    # Rust hash maps are seeded per process, so also compare against a fresh interpreter.
    code = (
        "import sys, json; from baobab.data import train_bpe; "
        "print(train_bpe(json.loads(sys.stdin.read()), 300, 2).to_str())"
    )
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(CORPUS),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == bpe.to_str()
