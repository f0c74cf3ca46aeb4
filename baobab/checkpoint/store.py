"""Checkpoints on disk: complete or absent, never half-written.

Layout of a run directory::

    run_dir/checkpoints/step_00000100/
        model.safetensors   weights (shared/tied tensors stored once)
        state.pt            optimizer, schedule, data position, RNG, step (tensors and
                            plain containers only, so it loads with weights_only=True)
        meta.json           step, model family/name/config, task; written last
        tokenizer.json      when the run has one, so the checkpoint stands alone

A checkpoint is written into a hidden ``.tmp-*`` sibling and renamed into place in one
``os.replace``; a crash at any point leaves the previous checkpoints untouched and the
temporary directory is ignored (and swept by the next save). Only directories holding a
``meta.json`` count as checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

CHECKPOINTS = "checkpoints"
MODEL_FILE, STATE_FILE, META_FILE, TOKENIZER_FILE = (
    "model.safetensors",
    "state.pt",
    "meta.json",
    "tokenizer.json",
)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"'{path}' is neither a checkpoint nor a run directory holding one")
    return newest


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_file: str | Path | None = None,
    keep_last: int = 3,
) -> Path:
    """Write a complete checkpoint for ``step`` and prune all but the newest ``keep_last``."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the final one): swap atomically
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for old_ckpt in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(path) / META_FILE).read_text())


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into ``model``; a mismatch is refused with one sentence."""
    ckpt = resolve_checkpoint(path)
    try:
        missing, unexpected = load_model(model, str(ckpt / MODEL_FILE), strict=False)
    except RuntimeError as err:  # shape mismatch
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"checkpoint '{ckpt}' does not match the model: {first}") from None
    if missing or unexpected:
        detail = (
            f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        )
        raise ValueError(f"checkpoint '{ckpt}' does not match the model: {detail}")


def load_trained_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as and load its weights (eval mode)."""
    from baobab import models  # checkpoints describe models; models know nothing of checkpoints

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model_cfg = models.get_config(meta["model"]["name"], **meta["model"]["config"])
    model = models.build_model(model_cfg)
    load_weights(ckpt, model)
    return model.to(device).eval(), meta


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint (never unpickles arbitrary objects)."""
    return torch.load(resolve_checkpoint(path) / STATE_FILE, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
