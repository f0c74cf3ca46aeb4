"""Run ``baobab train``, ``prepare`` and ``export`` onto tiny tmpfs mounts; print the outcome.

``unshare -m python diskspace_worker.py ROOT CORPUS TEXT`` (as root): the mounts live in
this process's own mount namespace, so they vanish with it and nothing outside sees them.
Each command runs through ``baobab.cli.main`` with the real writers (DCP, safetensors, the
shard writer) meeting a really full file system. Prints one JSON line:
``{"train"|"prepare"|"export": {"code": exit code or None for an escaped exception,
"err": stderr}, "torch_save": {"message", "cause"}, "left": {mount: [names left in it]}}``; the run directory is copied to
``ROOT/run-copy`` so the test can check its checkpoints after the mounts are gone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

# Sizes: one checkpoint of the model below (~0.6 MB) fits in TRAIN_FS, two do not; the
# corpus from TEXT (~0.6 MB of uint16 shards) and the export (~90 KB) do not fit theirs.
TRAIN_FS, PREPARE_FS, EXPORT_FS = "900k", "128k", "48k"
TINY = '{"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1, "ffn_hidden": 64}'


def mount(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    return path


def cli(argv: list[str]) -> dict:
    from baobab.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException:  # a traceback is what the CLI must no longer end with
            code = None
            err.write(traceback.format_exc())
    return {"code": code, "err": err.getvalue()}


def torch_save(directory: Path) -> dict:
    """torch.save's zip writer on a full disk says only "unexpected pos N vs M", no errno."""
    import torch

    from baobab.diskspace import DiskFullError, writing

    try:
        with writing(f"a tensor in '{directory}'", directory):
            torch.save(torch.zeros(100_000), directory / "big.pt")
    except DiskFullError as err:
        return {"message": str(err), "cause": repr(err.__cause__)}
    return {"message": None, "cause": None}


def main() -> None:
    root, corpus, text = (Path(a) for a in sys.argv[1:4])
    result: dict = {}
    run = mount(root / "train-fs", TRAIN_FS) / "run"
    result["train"] = cli(
        ["train", "--model.name", "gpt-nano", "--model.overrides", TINY, "--data.path", str(corpus),
         "--data.seq_len", "16", "--data.batch_size", "2", "--train.max_steps", "4",
         "--train.save_every", "2", "--train.eval_every", "0", "--train.threads", "1",
         "--train.progress", "false", "--train.run_dir", str(run)]
    )  # fmt: skip
    prepared = mount(root / "prepare-fs", PREPARE_FS) / "corpus"
    result["prepare"] = cli(
        ["prepare", str(text), "--out", str(prepared), "--tokenizer", "bytes", "--workers", "1",
         "--progress", "false"]
    )  # fmt: skip
    exported = mount(root / "export-fs", EXPORT_FS) / "export"
    result["export"] = cli(["export", "--checkpoint", str(run), "--out", str(exported)])
    result["torch_save"] = torch_save(mount(root / "save-fs", EXPORT_FS))
    result["left"] = {name: sorted(os.listdir(root / name)) for name in ("prepare-fs", "export-fs")}
    if run.is_dir():
        shutil.copytree(run, root / "run-copy")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
