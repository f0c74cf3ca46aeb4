"""``baobab registry push|pull|list|show|alias|verify|rm``: the typed functions the CLI calls.

The registry is ``--registry DIR|URL``, else ``$BAOBAB_REGISTRY``, else
``~/.cache/baobab/registry`` (a local store in the Hugging Face hub cache layout); a URL such
as ``s3://bucket/prefix`` is an object store (:mod:`~baobab.registry.objstore`). Pulls go
into ``--cache DIR``, else ``$BAOBAB_CACHE``, else the registry itself when it is local
(then a pull only verifies). Bad input is a ValueError of one sentence (exit 2).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from baobab.registry import core
from baobab.registry.names import parse_push, parse_ref
from baobab.registry.store import LocalStore, Store
from baobab.storage import is_remote

HOME_ENV, CACHE_ENV = "BAOBAB_REGISTRY", "BAOBAB_CACHE"
DEFAULT_HOME = "~/.cache/baobab/registry"


def open_store(registry: str | None = None) -> Store:
    """The store at ``registry``: a directory (default: $BAOBAB_REGISTRY or ~/.cache/...), or
    an object-store URL such as ``s3://bucket/prefix`` (credentials from the environment)."""
    where = registry or os.environ.get(HOME_ENV) or DEFAULT_HOME
    if is_remote(where):
        from baobab.registry.objstore import ObjectStore  # deferred: imports fsspec

        return ObjectStore(where)
    return LocalStore(Path(where.removeprefix("file://")).expanduser())


def open_cache(store: Store, cache: str | None = None) -> LocalStore:
    """Where pulls go: ``cache``, $BAOBAB_CACHE, or the registry itself when it is local."""
    where = cache or os.environ.get(CACHE_ENV)
    if where:
        return LocalStore(where)
    if isinstance(store, LocalStore):
        return store
    return LocalStore("~/.cache/baobab/hub")


def push(
    export: str,
    name: str,
    /,
    registry: str | None = None,
    parent: str | None = None,
    license: str | None = None,
) -> int:
    """Publish an export directory as the next version of NAME[:TAG] (TAG: an alias to set).

    Args:
        export: a directory written by ``baobab export`` (or ``baobab hf import``).
        name: NAME or ORG/NAME, optionally with :TAG, e.g. gpt-mini:staging.
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
        parent: the model this one derives from (e.g. models:/gpt-mini/1), for its lineage.
        license: the licence written in the model card (default: other).
    """
    from baobab.registry.package import check_export, package_export

    repo, tag = parse_push(name)
    check_export(export)  # refused before anything is loaded or written
    store = open_store(registry)
    if parent is not None and parent.startswith("models:/"):
        version, _ = core.resolve(store, parse_ref(parent))
        parent = f"{parse_ref(parent).name}/{version}"
    with tempfile.TemporaryDirectory() as work:
        files, meta = package_export(export, work, repo, parent, license)
        version, created = core.publish(store, repo, files, meta, tag)
    said = "pushed" if created else "already in the registry as"
    print(f"{said} {repo}/{version}" + (f" (@{tag})" if tag else ""))
    return version


def pull(model: str, /, registry: str | None = None, cache: str | None = None) -> Path:
    """Pull NAME[@ALIAS|/VERSION] into the cache, verify every file, print its directory.

    Args:
        model: NAME, NAME@ALIAS or NAME/VERSION (models:/ prefix allowed).
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
        cache: the cache directory (default: $BAOBAB_CACHE, or the registry when local).
    """
    store = open_store(registry)
    path = core.pull(store, open_cache(store, cache), parse_ref(model))
    print(path)
    return path


def resolve_model_dir(
    model: str | Path, registry: str | None = None, cache: str | None = None
) -> Path:
    """The directory of ``model``: a ``models:/NAME@ALIAS`` or ``models:/NAME/3`` pulled into
    the cache and verified, or any other path as it is."""
    if isinstance(model, str) and model.startswith("models:/"):
        store = open_store(registry)
        return core.pull(store, open_cache(store, cache), parse_ref(model))
    return Path(model)


def list_models(registry: str | None = None) -> list[dict[str, Any]]:
    """List the registry's models with their versions and aliases.

    Args:
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
    """
    store = open_store(registry)
    rows = []
    for repo in store.repos():
        found = core.versions(store, repo)
        if not found:
            continue
        named = core.aliases(store, repo)
        rows.append({"name": repo, "versions": list(found), "aliases": named})
        tags = " ".join(f"@{a}={v}" for a, v in named.items())
        print(f"{repo}  versions {', '.join(map(str, found))}  {tags}".rstrip())
    if not rows:
        print("no models")
    return rows


def show(model: str, /, registry: str | None = None) -> dict[str, Any]:
    """Show a version's manifest (files, sizes, hashes, card), the aliases and their history.

    Args:
        model: NAME, NAME@ALIAS or NAME/VERSION.
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
    """
    store = open_store(registry)
    ref = parse_ref(model)
    version, revision = core.resolve(store, ref)
    shown = {
        "manifest": store.read_manifest(ref.name, revision),
        "revision": revision,
        "aliases": core.aliases(store, ref.name),
        "history": store.history(ref.name),
    }
    print(json.dumps(shown, indent=2))
    return shown


def alias(model_alias: str, version: int, /, registry: str | None = None) -> None:
    """Point NAME@ALIAS at VERSION (the move is appended to the alias history).

    Args:
        model_alias: NAME@ALIAS, e.g. gpt-mini@champion.
        version: the version the alias names from now on.
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
    """
    ref = parse_ref(model_alias)
    if ref.alias is None:
        raise ValueError(f"'{model_alias}' names no alias: write NAME@ALIAS.")
    core.set_alias(open_store(registry), ref.name, ref.alias, int(version))
    print(f"{ref.name}@{ref.alias} -> {version}")


def verify(model: str, /, registry: str | None = None) -> int:
    """Re-hash every file of NAME[@ALIAS|/VERSION]; a mismatch names the file (exit 2).

    Args:
        model: NAME, NAME@ALIAS or NAME/VERSION.
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
    """
    ref = parse_ref(model)
    version, manifest = core.verify(open_store(registry), ref)
    print(f"{ref.name}/{version}: {len(manifest['files'])} files match their sha256")
    return version


def rm(model: str, /, registry: str | None = None) -> list[str]:
    """Remove NAME/VERSION or a whole NAME; blobs no version uses are deleted.

    Args:
        model: NAME/VERSION or NAME.
        registry: the registry directory (default: $BAOBAB_REGISTRY or ~/.cache/baobab/registry).
    """
    removed = core.remove(open_store(registry), parse_ref(model))
    print("removed " + ", ".join(removed))
    return removed
