"""The registry's operations over any :class:`~baobab.registry.store.Store`: publish a
version, resolve names, move aliases, verify, pull into a local cache, remove.

Invariants (what the crash tests check): a version exists once its ref ``v<N>`` exists, and
it is written last, after every blob (each whole, by hash), the manifest blob and the
snapshot; so a push killed at any write leaves no visible half-version, and pushing the
same files again finishes the job (the same files as an existing version are that
version, not a new one). Versions never change; ``main`` follows the newest. Torch-free.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import baobab
from baobab.registry.names import LATEST, ModelRef, check_alias, ref_version, version_ref
from baobab.registry.store import CHUNK, LocalStore, Store, revision_of, sha256_file

MANIFEST_FORMAT = 1


def who() -> str:
    """The user recorded in alias history: ``$USER``, else the login name."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions(store: Store, name: str) -> dict[int, str]:
    """version -> revision of every version of ``name`` (empty when it has none)."""
    found = {ref_version(ref): rev for ref, rev in store.refs(name).items()}
    return dict(sorted((v, rev) for v, rev in found.items() if v is not None))


def aliases(store: Store, name: str) -> dict[str, int]:
    """alias -> version of ``name``'s aliases (``main`` excluded)."""
    by_revision = {rev: v for v, rev in versions(store, name).items()}
    return {
        ref: by_revision[rev]
        for ref, rev in store.refs(name).items()
        if ref_version(ref) is None and ref != LATEST and rev in by_revision
    }


def resolve(store: Store, ref: ModelRef) -> tuple[int, str]:
    """(version, revision) that ``ref`` names; an unknown name, version or alias is a
    ValueError naming the known ones."""
    known = versions(store, ref.name)
    if not known:
        names = ", ".join(store.repos()) or "none"
        raise ValueError(f"no model named '{ref.name}' in the registry; known: {names}.")
    if ref.version is not None:
        if ref.version not in known:
            have = ", ".join(map(str, known))
            raise ValueError(f"'{ref.name}' has no version {ref.version}; versions: {have}.")
        return ref.version, known[ref.version]
    if ref.alias is not None:
        named = aliases(store, ref.name)
        if ref.alias not in named:
            have = ", ".join(f"@{a}" for a in named) or "none"
            raise ValueError(f"'{ref.name}' has no alias @{ref.alias}; aliases: {have}.")
        return named[ref.alias], known[named[ref.alias]]
    latest = max(known)
    return latest, known[latest]


def publish(
    store: Store,
    name: str,
    files: dict[str, Path],
    meta: dict[str, Any],
    tag: str | None = None,
) -> tuple[int, bool]:
    """Publish ``files`` (snapshot name -> local path) as the next version of ``name``.

    Order: blobs, the manifest blob, the snapshot, the version ref, ``main``, then ``tag``
    (an alias). Returns (version, created): the same files as an existing version give
    that version and ``created=False`` (a repeated push after a crash ends here).
    """
    digests = {f: {"sha256": sha256_file(p), "size": p.stat().st_size} for f, p in files.items()}
    with store.lock(name):
        store.collect_garbage(name)  # what a killed push left: unreferenced, invisible
        known = versions(store, name)
        if known and store.refs(name).get(LATEST) != known[max(known)]:
            store.write_ref(name, LATEST, known[max(known)])  # a push killed before ``main``
        for version, revision in known.items():
            if store.read_manifest(name, revision)["files"] == digests:
                if tag is not None:
                    _move_alias(store, name, tag, version)
                return version, False
        version = max(known, default=0) + 1
        for file, entry in digests.items():
            if not store.has_blob(name, entry["sha256"]):  # dedup: a shared file is stored once
                store.put_blob(name, entry["sha256"], files[file])
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "version": version,
            "created_at": now(),
            "baobab_version": baobab.__version__,
            **meta,
            "files": digests,
        }
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        manifest_sha = hashlib.sha256(data).hexdigest()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.json"
            path.write_bytes(data)
            store.put_blob(name, manifest_sha, path)
        revision = revision_of(manifest_sha)
        store.publish_snapshot(name, revision, manifest, manifest_sha)
        store.write_ref(name, version_ref(version), revision)  # the version now exists
        store.write_ref(name, LATEST, revision)
        if tag is not None:
            _move_alias(store, name, tag, version)
    return version, True


def set_alias(store: Store, name: str, alias: str, version: int) -> None:
    """Point ``name@alias`` at ``version``, appending the move to the history."""
    check_alias(alias)
    with store.lock(name):
        resolve(store, ModelRef(name, version=version))
        _move_alias(store, name, alias, version)


def _move_alias(store: Store, name: str, alias: str, version: int) -> None:
    before = aliases(store, name).get(alias)
    if before == version:
        return
    # The record first: a move killed in between is in the history, not yet in effect.
    record = {"alias": alias, "from": before, "to": version, "who": who(), "when": now()}
    store.append_history(name, record)
    store.write_ref(name, alias, versions(store, name)[version])


def verify(store: Store, ref: ModelRef) -> tuple[int, dict[str, Any]]:
    """Re-hash the manifest and every file of the version ``ref`` names; the first that
    does not match its hash is a ValueError naming it. Returns (version, manifest)."""
    version, revision = resolve(store, ref)
    manifest_sha = store.manifest_sha(ref.name, revision)
    if _hash_blob(store, ref.name, manifest_sha) != manifest_sha or not manifest_sha.startswith(
        revision
    ):
        raise ValueError(f"the manifest of '{ref.name}' version {version} is corrupt.")
    manifest = store.read_manifest(ref.name, revision)
    for file, entry in manifest["files"].items():
        if _hash_blob(store, ref.name, entry["sha256"]) != entry["sha256"]:
            raise ValueError(
                f"file {file} of '{ref.name}' version {version} does not match its sha256 "
                "(corrupt, missing or tampered); pull it again."
            )
    if isinstance(store, LocalStore):
        wrong = store.snapshot_problem(ref.name, revision, manifest)
        if wrong is not None:
            raise ValueError(
                f"file {wrong} of '{ref.name}' version {version} is not the blob its manifest "
                "names (the snapshot was changed); pull it again."
            )
    return version, manifest


def _hash_blob(store: Store, name: str, sha: str) -> str | None:
    if not store.has_blob(name, sha):
        return None
    digest = hashlib.sha256()
    with store.open_blob(name, sha) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pull(source: Store, cache: LocalStore, ref: ModelRef) -> Path:
    """Copy the version ``ref`` names into ``cache`` (same layout) and return its snapshot.

    Each blob is copied through ``<sha>.incomplete`` (a killed pull resumes from there) and
    becomes visible only once its sha256 matches; then the snapshot and the refs
    (``v<N>``, the alias asked for, ``main`` when it is the source's newest).
    """
    version, revision = resolve(source, ref)
    if source is cache or (
        isinstance(source, LocalStore) and source.home.resolve() == cache.home.resolve()
    ):
        verify(source, ModelRef(ref.name, version=version))
        return cache.snapshot_dir(ref.name, revision)
    manifest_sha = source.manifest_sha(ref.name, revision)
    with cache.lock(ref.name):
        pairs = [(manifest_sha, "the manifest")]
        manifest = source.read_manifest(ref.name, revision)
        pairs += [(e["sha256"], f"file {f}") for f, e in manifest["files"].items()]
        for sha, what in pairs:
            with source.open_blob(ref.name, sha) as blob:
                try:
                    cache.receive_blob(ref.name, sha, blob)
                except ValueError:
                    raise ValueError(
                        f"{what} of '{ref.name}' version {version} does not match its sha256 "
                        "in the registry (corrupt or tampered); nothing was pulled."
                    ) from None
        cache.publish_snapshot(ref.name, revision, manifest, manifest_sha)
        cache.write_ref(ref.name, version_ref(version), revision)
        if ref.alias is not None:
            cache.write_ref(ref.name, ref.alias, revision)
        if version == max(versions(source, ref.name)):
            cache.write_ref(ref.name, LATEST, revision)
    return cache.snapshot_dir(ref.name, revision)


def remove(store: Store, ref: ModelRef) -> list[str]:
    """Remove one version (``NAME/N``) or a whole model (``NAME``), with the aliases that
    named it; blobs no other version uses are deleted. Returns what was removed."""
    if ref.alias is not None:
        raise ValueError("rm takes NAME/VERSION or NAME, not an alias; move the alias instead.")
    with store.lock(ref.name):
        known = versions(store, ref.name)
        resolve(store, ref)  # unknown names and versions are refused with the known ones
        if ref.version is None:
            store.delete_repo(ref.name)
            return [f"{ref.name} (versions {', '.join(map(str, known))})"]
        revision = known.pop(ref.version)
        for name, rev in store.refs(ref.name).items():
            if rev == revision:
                store.delete_ref(ref.name, name)
        if not known:
            store.delete_repo(ref.name)
            return [f"{ref.name}/{ref.version} (its last version)"]
        store.write_ref(ref.name, LATEST, known[max(known)])
        store.collect_garbage(ref.name)
    return [f"{ref.name}/{ref.version}"]
