"""Resumable distributed training checkpoints: DCP state, atomic completion, keep-last-k.

Every rank calls :func:`save_checkpoint` and :func:`load_checkpoint`; weights and optimizer
state go through torch.distributed.checkpoint (DCP) keyed by parameter name, so a checkpoint
saved under one parallel layout loads under any other, or in one process with no process
group at all (:func:`load_trained_model`). See ``store.py`` for the on-disk layout and the
save protocol, ``trainer_state.py`` for how the trainer's own state is stored, ``layout.py``
for what a crash at any instant leaves behind, ``checksum.py`` for the checksum of every
file that meta.json records (taken as the files are written, checked on every load) and
``verify.py`` for checking a checkpoint's files before resuming from it.

Trust: a checkpoint is trusted training state, for resuming your own runs. DCP writes its
``.metadata`` file (and non-tensor optimizer values) with pickle, so never load a checkpoint
directory someone handed you. The artefact meant for sharing is what ``baobab export``
writes (:mod:`baobab.export`): consolidated safetensors plus JSON, loaded without pickle;
weights loaded from anywhere else must come from safetensors too.
"""

from baobab.checkpoint.layout import (
    checkpoint_dirs,
    incomplete_checkpoints,
    latest_checkpoint,
    read_meta,
    recover_interrupted,
    resolve_checkpoint,
)
from baobab.checkpoint.store import (
    load_checkpoint,
    load_trained_model,
    save_checkpoint,
    wait_for_checkpoint,
)
from baobab.checkpoint.trainer_state import load_trainer_state, save_trainer_state
from baobab.checkpoint.verify import newest_loadable, verify_checkpoint

__all__ = [
    "checkpoint_dirs",
    "incomplete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trained_model",
    "load_trainer_state",
    "newest_loadable",
    "read_meta",
    "recover_interrupted",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_trainer_state",
    "verify_checkpoint",
    "wait_for_checkpoint",
]
