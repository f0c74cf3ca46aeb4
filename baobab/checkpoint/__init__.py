"""Resumable training checkpoints: atomic, self-describing, keep-last-k."""

from baobab.checkpoint.store import (
    checkpoint_dirs,
    latest_checkpoint,
    load_state,
    load_trained_model,
    load_weights,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_state",
    "load_trained_model",
    "load_weights",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
]
