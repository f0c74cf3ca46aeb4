"""The registry on an object store (``s3://bucket/prefix``, any fsspec URL): the same blobs
as the local store, one JSON manifest per version, refs as small objects, and no symlinks::

    <root>/models--<org>--<name>/
        blobs/<sha256>                    file contents and manifests, named by their hash
        refs/<ref>                        a 40-hex revision (the first 40 of a manifest's sha256)
        history/<when>-<nanos>-<rand>.json  one object per alias move, listed in name order

Every write is one PUT (atomic on an object store) after :func:`write_point`, in the order
blobs, manifest, refs, so a killed push leaves unreferenced objects only, never a visible
half-version; the next push collects them. Object stores cannot append, so the history is
one object per move. There is no cross-process lock on an object store: one writer per
model at a time (readers are always safe). Credentials: :mod:`baobab.storage.objects`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from baobab.registry.store import repo_folder, write_point
from baobab.storage.objects import check_reachable, open_filesystem, put_bytes, put_file

_LOCKS: dict[str, threading.Lock] = {}


class ObjectStore:
    """A :class:`~baobab.registry.store.Store` on an fsspec object store (module docstring)."""

    def __init__(self, url: str, check: bool = True) -> None:
        """Open the store at ``url``; with ``check``, a missing or unreachable bucket is a
        ValueError of one sentence now rather than a client error later."""
        self.url = url
        self.fs, self.root = open_filesystem(url)
        if check:
            check_reachable(self.fs, url, self.root)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # -- paths --
    def repo_dir(self, repo: str) -> str:
        return f"{self.root}/{repo_folder(repo)}"

    def blob_path(self, repo: str, sha: str) -> str:
        return f"{self.repo_dir(repo)}/blobs/{sha}"

    def _list(self, path: str) -> list[str]:
        """Every object under ``path`` (recursive), sorted; none when it does not exist."""
        self.fs.invalidate_cache(path)
        try:
            return sorted(self.fs.find(path))
        except FileNotFoundError:
            return []

    # -- blobs --
    def has_blob(self, repo: str, sha: str) -> bool:
        return bool(self.fs.exists(self.blob_path(repo, sha)))

    def put_blob(self, repo: str, sha: str, src: Path) -> None:
        write_point()
        put_file(self.fs, src, self.blob_path(repo, sha), src.stat().st_size, sha)

    def open_blob(self, repo: str, sha: str) -> BinaryIO:
        return self.fs.open(self.blob_path(repo, sha), "rb")

    def blob_size(self, repo: str, sha: str) -> int:
        return int(self.fs.size(self.blob_path(repo, sha)))

    # -- manifests (blobs too: a revision is the first 40 hex of its manifest's sha256) --
    def manifest_sha(self, repo: str, revision: str) -> str:
        prefix = f"{self.repo_dir(repo)}/blobs/{revision}"
        found = [p.rsplit("/", 1)[1] for p in self._list(f"{self.repo_dir(repo)}/blobs")
                 if p.startswith(prefix)]  # fmt: skip
        if len(found) != 1:
            raise ValueError(f"'{repo}' has no manifest for revision {revision}.")
        return found[0]

    def read_manifest(self, repo: str, revision: str) -> dict[str, Any]:
        sha = self.manifest_sha(repo, revision)
        data = self.fs.cat_file(self.blob_path(repo, sha))
        if hashlib.sha256(data).hexdigest() != sha:
            raise ValueError(f"the manifest of '{repo}' revision {revision} is corrupt.")
        return json.loads(data)

    def publish_snapshot(
        self, repo: str, revision: str, manifest: dict[str, Any], manifest_sha: str
    ) -> None:
        """Nothing: an object store has no symlinks; the manifest is the snapshot."""

    # -- refs --
    def refs(self, repo: str) -> dict[str, str]:
        base = f"{self.repo_dir(repo)}/refs/"
        paths = self._list(base.rstrip("/"))
        if not paths:
            return {}
        data = self.fs.cat(paths)
        return {p.removeprefix(base): data[p].decode().strip() for p in paths}

    def write_ref(self, repo: str, ref: str, revision: str) -> None:
        write_point()
        put_bytes(self.fs, revision.encode(), f"{self.repo_dir(repo)}/refs/{ref}")

    def delete_ref(self, repo: str, ref: str) -> None:
        write_point()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{self.repo_dir(repo)}/refs/{ref}")

    def repos(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            folders = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = [p.rstrip("/").rsplit("/", 1)[1] for p in folders]
        found = [n.removeprefix("models--").replace("--", "/") for n in names
                 if n.startswith("models--")]  # fmt: skip
        return [repo for repo in sorted(found) if self.refs(repo)]

    # -- history: one object per move, named so that name order is time order --
    def append_history(self, repo: str, record: dict[str, Any]) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{time.time_ns() % 10**9:09d}-{secrets.token_hex(4)}.json"
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        write_point()
        put_bytes(self.fs, data, f"{self.repo_dir(repo)}/history/{name}")

    def history(self, repo: str) -> list[dict[str, Any]]:
        paths = self._list(f"{self.repo_dir(repo)}/history")
        if not paths:
            return []
        data = self.fs.cat(paths)
        return [json.loads(data[p]) for p in paths]

    # -- locking, garbage --
    @contextlib.contextmanager
    def lock(self, repo: str) -> Iterator[None]:
        """One writer per model within this process; across processes, see the module
        docstring (object stores have no lock)."""
        with _LOCKS.setdefault(f"{self.url}|{repo}", threading.Lock()):
            yield

    def collect_garbage(self, repo: str) -> list[str]:
        """Delete blobs that no ref's manifest names (what a killed push or an ``rm`` left).
        Returns the removed blobs' hashes. Call it as the model's only writer."""
        kept: set[str] = set()
        for revision in set(self.refs(repo).values()):
            with contextlib.suppress(ValueError):  # a ref whose version was removed
                sha = self.manifest_sha(repo, revision)
                kept.add(sha)
                kept |= {e["sha256"] for e in self.read_manifest(repo, revision)["files"].values()}
        removed = []
        for path in self._list(f"{self.repo_dir(repo)}/blobs"):
            sha = path.rsplit("/", 1)[1]
            if sha not in kept:
                write_point()
                self.fs.rm_file(path)
                removed.append(sha)
        return removed

    def delete_repo(self, repo: str) -> None:
        write_point()
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.repo_dir(repo), recursive=True)
