"""Exports for serving and sharing: consolidated safetensors + config.json + tokenizer.

:func:`export_checkpoint` turns a training checkpoint (saved under any layout) into one
``model.safetensors``, optionally cast to another dtype; :func:`load_exported` rebuilds the
model from it with no pickle and no torch.distributed. This is the artefact to hand to
others: unlike a training checkpoint, it is safe to load from an untrusted source.
"""

from baobab.export.artifact import load_exported, read_config
from baobab.export.consolidate import export_checkpoint

__all__ = ["export_checkpoint", "load_exported", "read_config"]
