"""Streaming detokenization: whole characters only, stop strings across increments."""

from __future__ import annotations

import random

import pytest

from baobab.data import byte_tokenizer, train_bpe
from baobab.serve.detokenize import IncrementalDetokenizer

TEXT = "a漢🌳é! naïve 字"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add([i]) for i in ids]


def test_one_byte_at_a_time_never_splits_a_character(tok):
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode())  # byte tokenizer: one token per byte
    detok = IncrementalDetokenizer(tok)
    pieces = feed(detok, ids) + [detok.finish()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # the 4-byte tree arrives whole on its 4th byte, nothing before
    start = len("a漢".encode())
    assert pieces[start : start + 4] == ["", "", "", "🌳"]


def test_bpe_tokens_round_trip():
    tok = train_bpe([TEXT * 20, "naïve trees 漢字 🌳🌳"] * 5, vocab_size=300, min_frequency=2)
    ids = tok.encode(TEXT * 3)
    detok = IncrementalDetokenizer(tok)
    pieces = feed(detok, ids) + [detok.finish()]
    assert "".join(pieces) == TEXT * 3
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_spanning_tokens_is_cut_and_excluded(tok):
    detok = IncrementalDetokenizer(tok, stop=["<END>"])
    pieces = feed(detok, tok.encode("hi 漢<EN"))
    assert "".join(pieces) == "hi 漢"  # "<EN" could begin the stop string: held back
    assert detok.add(tok.encode("D")) == "" and detok.stop_string is None
    assert detok.add(tok.encode(">")) == "" and detok.stop_string == "<END>"
    assert detok.add(tok.encode("more")) == "" and detok.finish() == ""
    assert detok.text == "hi 漢"


def test_held_back_text_is_released_once_ruled_out(tok):
    detok = IncrementalDetokenizer(tok, stop=["<END>"])
    assert "".join(feed(detok, tok.encode("x<EN"))) == "x"
    assert detok.add(tok.encode("!")) == "<EN!"
    assert detok.stop_string is None


def test_earliest_of_several_stop_strings_wins(tok):
    detok = IncrementalDetokenizer(tok, stop=["world", "lo"])
    pieces = [detok.add(tok.encode("hello world"))]
    assert pieces == ["hel"] and detok.stop_string == "lo"


def test_stop_string_at_the_start_gives_empty_text(tok):
    detok = IncrementalDetokenizer(tok, stop=["ab"])
    assert feed(detok, tok.encode("abc")) == ["", "", ""]
    assert detok.stop_string == "ab" and detok.text == ""


def test_finish_releases_held_text_and_incomplete_characters(tok):
    detok = IncrementalDetokenizer(tok, stop=["<END>"])
    partial = "🌳".encode()[:2]
    pieces = feed(detok, [*tok.encode("ok <EN"), *partial])
    assert "".join(pieces) == "ok "
    assert detok.finish() == "<EN\ufffd"  # an ended request shows what it has


def test_invalid_bytes_are_released_three_tokens_late(tok):
    detok = IncrementalDetokenizer(tok)
    ids = [0xE9] * 8 + tok.encode("ok")  # lone lead bytes: never a character
    pieces = feed(detok, ids) + [detok.finish()]
    assert pieces[:4] == ["", "", "", "\ufffd"]  # the first byte, once 3 more followed
    assert "".join(pieces) == tok.decode(ids) == "\ufffd" * 8 + "ok"


def test_special_tokens_are_skipped(tok):
    detok = IncrementalDetokenizer(tok)
    pieces = feed(detok, [*tok.encode("a"), tok.pad_id, *tok.encode("b")])
    assert "".join(pieces) == "ab"


def test_random_byte_streams_join_to_the_full_decode(tok):
    rng = random.Random(0)
    for trial in range(400):
        if trial % 2:  # valid UTF-8: no increment ever shows U+FFFD
            chars = [rng.choice(["a", "é", "漢", "🌳", " ", "ж"]) for _ in range(rng.randrange(20))]
            ids = list("".join(chars).encode())
        else:  # arbitrary bytes
            ids = [rng.randrange(256) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tok)
        pieces = feed(detok, ids) + [detok.finish()]
        assert "".join(pieces) == tok.decode(ids), ids
        assert not (trial % 2 and any("\ufffd" in p for p in pieces)), ids
