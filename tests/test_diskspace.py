"""A full disk ends train, prepare and export with one sentence, on a really full file system.

The commands run in ``tests/diskspace_worker.py`` inside ``unshare -m`` with their output
on size-limited tmpfs mounts: the real writers (DCP with its checksums, safetensors, the
shard writer) meet a real ENOSPC. Needs root and unshare; skipped otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baobab.checkpoint import checkpoint_dirs, load_trained_model
from baobab.diskspace import NEARLY_FULL_BYTES, DiskFullError, disk_full_cause, writing

WORKER = Path(__file__).with_name("diskspace_worker.py")


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m is not permitted here: {probe.stderr.strip()}"
    return None


def _one_error_line(err: str) -> str:
    """The CLI's sentence; the run may print progress lines, never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_full_disk_is_one_sentence_for_train_prepare_and_export(tiny_corpus, tmp_path):
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    text = tmp_path / "text.txt"  # ~300 KB of text: ~600 KB of uint16 token shards
    text.write_text("".join(f"line {i} of a document that fills the disk\n" for i in range(7000)))
    done = subprocess.run(
        ["unshare", "-m", sys.executable, str(WORKER), str(tmp_path), str(tiny_corpus), str(text)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # train: the second checkpoint does not fit; the first stays whole and loadable.
    run = tmp_path / "train-fs" / "run"
    assert result["train"]["code"] == 1, result["train"]["err"]
    line = _one_error_line(result["train"]["err"])
    assert line.startswith(
        f"error: the disk is full: writing checkpoint step_00000004 in run directory '{run}' "
        "failed; its file system now has "
    ), line
    assert line.endswith("free of 900.0 KiB"), line
    copy = tmp_path / "run-copy"
    assert [p.name for p in checkpoint_dirs(copy)] == ["step_00000002"]  # none claimed complete
    model, meta = load_trained_model(copy)
    assert meta["step"] == 2

    # prepare: the shards do not fit; nothing is left behind.
    out = tmp_path / "prepare-fs" / "corpus"
    assert result["prepare"]["code"] == 1, result["prepare"]["err"]
    line = _one_error_line(result["prepare"]["err"])
    assert line.startswith(f"error: the disk is full: writing the prepared corpus '{out}' failed;")
    assert "free of 128.0 KiB" in line
    assert result["left"]["prepare-fs"] == []

    # export: the weights do not fit; no half-written export, no temporary directory.
    out = tmp_path / "export-fs" / "export"
    assert result["export"]["code"] == 1, result["export"]["err"]
    line = _one_error_line(result["export"]["err"])
    assert line.startswith(f"error: the disk is full: writing export directory '{out}' failed;")
    assert "free of 48.0 KiB" in line
    assert result["left"]["export-fs"] == []

    # torch.save's own words for a full disk, recognised by the free space left.
    saved = result["torch_save"]
    assert "unexpected pos" in saved["cause"] or "inline_container" in saved["cause"], saved
    assert saved["message"].startswith(
        f"the disk is full: writing a tensor in '{tmp_path}/save-fs'"
    )


def test_what_counts_as_a_full_disk(tmp_path):
    """Forwarded text counts; a writer's vague error counts only when the disk is full."""
    forwarded = RuntimeError(
        "rank 0 could not write the checkpoint: OSError: [Errno 28] No space left on device"
    )
    assert disk_full_cause(forwarded, tmp_path) == errno.ENOSPC
    vague = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert shutil.disk_usage(tmp_path).free > NEARLY_FULL_BYTES  # so this is not the disk
    assert disk_full_cause(vague, tmp_path) is None
    assert disk_full_cause(ValueError("bad value"), tmp_path) is None
    quota = pytest.raises(DiskFullError, match=r"^the disk quota is exceeded: writing x failed; ")
    with quota, writing("x", tmp_path):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(KeyError), writing("x", tmp_path):  # anything else passes unchanged
        raise KeyError("k")
