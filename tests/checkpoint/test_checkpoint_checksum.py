"""One flipped byte in a checkpoint, its size unchanged, is found by every reader.

A real run (gpt-nano, one layer, 4 steps, a checkpoint every 2) is trained once; each test
copies its run directory and flips one byte of the newest checkpoint's DCP shard on disk:
either in the zip structure torch.save wrote around a weight (torch.load then fails with a
traceback) or in the middle of the weight's bytes (which used to load silently).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from baobab.checkpoint import load_trained_model, verify_checkpoint
from baobab.cli import main, parse_run_config

WEIGHT = "model.tok_embeddings.weight"


def run_args(corpus: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--model.name", "gpt-nano", "--model.overrides.n_layer", "1", "--data.path", str(corpus),
        "--data.seq_len", "16", "--data.batch_size", "2", "--optim.name", "adamw",
        "--train.max_steps", str(steps), "--train.save_every", "2", "--train.progress", "false",
        "--train.run_dir", str(run_dir), "--train.threads", "1", "--train.eval_batches", "1",
        "--train.eval_every", "0", "--train.log_every", "1", "--train.peak_flops", "1e12", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> Path:
    from baobab.train import run

    run_dir = tmp_path_factory.mktemp("checksum") / "run"
    run(parse_run_config(run_args(tiny_corpus, run_dir, 4)))
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def flip(ckpt: Path, where: str) -> None:
    """Flip one byte of the shard holding the embedding weight, in place (size unchanged)."""
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == WEIGHT)
    shard = ckpt / info.relative_path
    data = bytearray(shard.read_bytes())
    record = bytes(data[info.offset : info.offset + info.length])
    if where == "zip structure":  # the name of the pickle in the zip's central directory
        at = info.offset + record.rindex(b"data.pkl")
    else:  # the middle of the weight's float32 values
        at = info.offset + info.length // 2
    data[at] ^= 0x10
    size = shard.stat().st_size
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size


@pytest.mark.parametrize("where", ["zip structure", "tensor data"])
def test_a_flipped_byte_is_reported_by_verify_eval_and_export(run_dir, where, capsys, tmp_path):
    newest = run_dir / "checkpoints" / "step_00000004"
    flip(newest, where)
    problem = verify_checkpoint(newest)
    assert problem == "shard __0_0.distcp does not match its xxh3_128 checksum (its bytes changed)"
    capsys.readouterr()
    for argv in (
        ["eval", "--checkpoint", str(newest)],
        ["export", "--checkpoint", str(newest), "--out", str(tmp_path / "export")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: checkpoint '{newest}' is damaged: {problem}"), err
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "export").exists()


def test_resume_passes_over_a_damaged_checkpoint_with_a_report(run_dir, tiny_corpus, capsys):
    flip(run_dir / "checkpoints" / "step_00000004", "tensor data")
    capsys.readouterr()
    assert main(["train", *run_args(tiny_corpus, run_dir, 6, "--train.resume", "true")]) == 0
    err = capsys.readouterr().err
    reason = "shard __0_0.distcp does not match its xxh3_128 checksum (its bytes changed)"
    assert f"ignored checkpoint .tmp-broken-step_00000004: {reason}" in err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (resume,) = [r for r in records if r.get("event") == "resume"]
    assert resume["step"] == 2 and resume["checkpoint"] == "step_00000002"
    assert resume["ignored"] == [{"checkpoint": ".tmp-broken-step_00000004", "reason": reason}]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert verify_checkpoint(run_dir / "checkpoints" / "step_00000006") is None


def test_a_checkpoint_without_checksums_loads_with_one_warning(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "step_00000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["checksums"]  # as baobab wrote meta.json before checksums
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ckpt) is None
    capsys.readouterr()
    model, loaded = load_trained_model(ckpt)
    assert loaded["step"] == 4
    err = capsys.readouterr().err
    assert err == (
        f"warning: checkpoint '{ckpt}' has no checksums (saved by an older baobab); "
        "loading it unverified\n"
    )


def test_a_changed_meta_json_is_found(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "step_00000004"
    text = (ckpt / "meta.json").read_text()
    (ckpt / "meta.json").write_text(text.replace('"step": 4', '"step": 5'))  # 0x34 -> 0x35
    problem = "meta.json does not match its xxh3_128 checksum (its text changed)"
    assert verify_checkpoint(ckpt) == problem
    with pytest.raises(ValueError, match="is damaged: meta.json does not match"):
        load_trained_model(ckpt)


def test_checkpoints_that_record_sha256_verify_too(tmp_path):
    from baobab.checkpoint import checksum, save_checkpoint
    from baobab.models import build_model

    with checksum.saving_with("sha256"):
        ckpt = save_checkpoint(tmp_path, 1, [build_model("gpt-nano")], [], {"step": 1}, {})
    sums = json.loads((ckpt / "meta.json").read_text())["checksums"]
    assert sums["algorithm"] == "sha256" and "sha256" in sums["files"]["__0_0.distcp"]
    assert verify_checkpoint(ckpt) is None
    flip(ckpt, "tensor data")
    assert verify_checkpoint(ckpt) == (
        "shard __0_0.distcp does not match its sha256 checksum (its bytes changed)"
    )
