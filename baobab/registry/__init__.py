"""A versioned model registry: push an export, pull it by name, verify it, move aliases.

Stores (:mod:`~baobab.registry.store`) hold content-addressed blobs, one JSON manifest per
version and refs; the local store uses the Hugging Face hub cache layout, so
``huggingface_hub`` and ``transformers`` read it by repo id. :mod:`~baobab.registry.core`
publishes, resolves, verifies and pulls over any store; :mod:`~baobab.registry.package`
turns an export into a snapshot's files and model card; :mod:`~baobab.registry.command`
is the ``baobab registry`` CLI and :func:`resolve_model_dir` turns ``models:/NAME@ALIAS``
into a verified local directory. Importing this package imports no torch.
"""

from baobab.registry.command import resolve_model_dir
from baobab.registry.names import ModelRef, parse_ref
from baobab.registry.store import LocalStore, Store

__all__ = ["LocalStore", "ModelRef", "Store", "parse_ref", "resolve_model_dir"]
