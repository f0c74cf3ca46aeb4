"""Where a registry keeps its models: the :class:`Store` interface and the local store.

A store holds, per repository (``org/name``), content-addressed blobs, one JSON manifest
per version (itself a blob: its sha256 names the version's revision) and named refs (``v1``,
``v2``, ``main`` = the latest version, aliases such as ``champion``) that each hold a
revision. The local store lays this out as the Hugging Face hub cache does, so that
``huggingface_hub.scan_cache_dir`` and ``transformers``' ``from_pretrained(repo_id,
cache_dir=home)`` read it::

    <home>/models--<org>--<name>/
        blobs/<sha256>                 file contents, named by their hash (dedup per repo)
        refs/<ref>                     a 40-hex revision (no newline, as huggingface_hub writes)
        snapshots/<revision>/<file>    relative symlinks to ../../blobs/<sha256>
        baobab/history.jsonl           every alias move (who, when, from, to)
        baobab/lock, baobab/tmp/       one writer at a time; snapshots being assembled

An object store (fsspec, later) implements the same interface with the same blobs and one
JSON manifest per version, and no symlinks (``publish_snapshot`` does nothing there).

Every write goes through :func:`write_point`, which counts writes and kills the process at
the write named by ``BAOBAB_REGISTRY_KILL_AT`` (1-based): the crash tests' kill points.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

KILL_ENV = "BAOBAB_REGISTRY_KILL_AT"
MANIFEST_FILE = "baobab_manifest.json"  # the version's manifest, in its snapshot too
CHUNK = 1 << 20
_writes = 0


def write_point() -> None:
    """Count one write; at the write named by ``$BAOBAB_REGISTRY_KILL_AT``, die (SIGKILL)."""
    global _writes
    _writes += 1
    if os.environ.get(KILL_ENV) == str(_writes):
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def revision_of(manifest_sha: str) -> str:
    """The 40-hex revision (what refs hold, a snapshot's name) of a manifest's sha256."""
    return manifest_sha[:40]


def repo_folder(repo: str) -> str:
    """``org/name`` -> ``models--org--name`` (huggingface_hub's repo_folder_name)."""
    return "models--" + repo.replace("/", "--")


class Store(Protocol):
    """What the registry needs of a store; ``repo`` is ``org/name`` or ``name``."""

    def has_blob(self, repo: str, sha: str) -> bool: ...
    def put_blob(self, repo: str, sha: str, src: Path) -> None:
        """Store ``src`` (whose sha256 is ``sha``) so that it appears whole or not at all."""

    def open_blob(self, repo: str, sha: str) -> BinaryIO: ...
    def blob_size(self, repo: str, sha: str) -> int: ...
    def read_manifest(self, repo: str, revision: str) -> dict[str, Any]: ...
    def manifest_sha(self, repo: str, revision: str) -> str:
        """The sha256 of the manifest blob of ``revision`` (its first 40 hex digits)."""

    def publish_snapshot(
        self, repo: str, revision: str, manifest: dict[str, Any], manifest_sha: str
    ) -> None:
        """Make the version's files readable by name (local: symlinks; objects: nothing)."""

    def refs(self, repo: str) -> dict[str, str]: ...
    def write_ref(self, repo: str, ref: str, revision: str) -> None: ...
    def delete_ref(self, repo: str, ref: str) -> None: ...
    def repos(self) -> list[str]: ...
    def append_history(self, repo: str, record: dict[str, Any]) -> None: ...
    def history(self, repo: str) -> list[dict[str, Any]]: ...
    def lock(self, repo: str) -> contextlib.AbstractContextManager[None]: ...
    def collect_garbage(self, repo: str) -> list[str]: ...
    def delete_repo(self, repo: str) -> None: ...


class LocalStore:
    """A store in a local directory, in the Hugging Face hub cache layout (module docstring)."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home).expanduser()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.home)!r})"

    # -- paths --
    def repo_dir(self, repo: str) -> Path:
        return self.home / repo_folder(repo)

    def blob_path(self, repo: str, sha: str) -> Path:
        return self.repo_dir(repo) / "blobs" / sha

    def snapshot_dir(self, repo: str, revision: str) -> Path:
        return self.repo_dir(repo) / "snapshots" / revision

    # -- blobs --
    def has_blob(self, repo: str, sha: str) -> bool:
        return self.blob_path(repo, sha).is_file()

    def put_blob(self, repo: str, sha: str, src: Path) -> None:
        with open(src, "rb") as f:
            self.receive_blob(repo, sha, f)

    def receive_blob(self, repo: str, sha: str, source: BinaryIO, verify: bool = True) -> None:
        """Write a blob from ``source`` through ``<sha>.incomplete``, renamed into place only
        once whole (and, with ``verify``, only when its sha256 is ``sha``). An
        ``.incomplete`` left by a killed copy is resumed from its length: ``source`` must be
        seekable to there (a file, an fsspec object)."""
        final = self.blob_path(repo, sha)
        if final.is_file():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(sha + ".incomplete")
        done = partial.stat().st_size if partial.is_file() else 0
        source.seek(done)
        write_point()
        with open(partial, "ab") as out:
            shutil.copyfileobj(source, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        if verify and sha256_file(partial) != sha:
            partial.unlink()
            raise ValueError(f"blob {sha[:12]} of '{repo}' does not match its sha256; refused.")
        write_point()
        os.replace(partial, final)

    def open_blob(self, repo: str, sha: str) -> BinaryIO:
        return open(self.blob_path(repo, sha), "rb")

    def blob_size(self, repo: str, sha: str) -> int:
        return self.blob_path(repo, sha).stat().st_size

    # -- manifests and snapshots --
    def read_manifest(self, repo: str, revision: str) -> dict[str, Any]:
        path = self.snapshot_dir(repo, revision) / MANIFEST_FILE
        if not path.is_file():
            raise ValueError(f"'{repo}' has no manifest for revision {revision}.")
        return json.loads(path.read_text())

    def manifest_sha(self, repo: str, revision: str) -> str:
        link = self.snapshot_dir(repo, revision) / MANIFEST_FILE
        if not link.is_symlink():
            raise ValueError(f"'{repo}' has no manifest for revision {revision}.")
        return os.path.basename(os.readlink(link))

    def publish_snapshot(
        self, repo: str, revision: str, manifest: dict[str, Any], manifest_sha: str
    ) -> None:
        """Assemble ``snapshots/<revision>`` in ``baobab/tmp`` and rename it into place, so
        a snapshot is either whole or absent. The manifest blob must already be stored."""
        target = self.snapshot_dir(repo, revision)
        if target.is_dir():
            return
        tmp = self.repo_dir(repo) / "baobab" / "tmp" / revision
        shutil.rmtree(tmp, ignore_errors=True)
        files = {**{name: entry["sha256"] for name, entry in manifest["files"].items()},
                 MANIFEST_FILE: manifest_sha}  # fmt: skip
        for name, sha in files.items():
            link = tmp / name
            link.parent.mkdir(parents=True, exist_ok=True)
            # relative: snapshots/<rev>/<dirs...>/<file> -> ../../(../..)blobs/<sha>
            up = "../" * (len(Path(name).parts) + 1)
            write_point()
            link.symlink_to(f"{up}blobs/{sha}")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_point()
        os.replace(tmp, target)
        with contextlib.suppress(OSError):  # the staging folder, when no other is assembling
            tmp.parent.rmdir()

    def snapshot_problem(self, repo: str, revision: str, manifest: dict[str, Any]) -> str | None:
        """The first snapshot file that is not a link to its manifest's blob, else None."""
        snap = self.snapshot_dir(repo, revision)
        for name, entry in manifest["files"].items():
            link = snap / name
            if not link.is_symlink() or os.path.basename(os.readlink(link)) != entry["sha256"]:
                return name
        return None

    # -- refs --
    def refs(self, repo: str) -> dict[str, str]:
        refs_dir = self.repo_dir(repo) / "refs"
        if not refs_dir.is_dir():
            return {}
        return {
            p.relative_to(refs_dir).as_posix(): p.read_text().strip()
            for p in sorted(refs_dir.rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")
        }

    def write_ref(self, repo: str, ref: str, revision: str) -> None:
        path = self.repo_dir(repo) / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        write_point()
        tmp.write_text(revision)  # no newline: huggingface_hub reads the file verbatim
        write_point()
        os.replace(tmp, path)

    def delete_ref(self, repo: str, ref: str) -> None:
        write_point()
        (self.repo_dir(repo) / "refs" / ref).unlink(missing_ok=True)

    def repos(self) -> list[str]:
        if not self.home.is_dir():
            return []
        found = []
        for path in sorted(self.home.glob("models--*")):
            if (path / "refs").is_dir():
                found.append(path.name.removeprefix("models--").replace("--", "/"))
        return found

    # -- history, locking, garbage --
    def append_history(self, repo: str, record: dict[str, Any]) -> None:
        path = self.repo_dir(repo) / "baobab" / "history.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_point()
        with open(path, "a") as f:  # one short line per append: whole or torn at the end
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def history(self, repo: str) -> list[dict[str, Any]]:
        path = self.repo_dir(repo) / "baobab" / "history.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill
                records.append(json.loads(line))
        return records

    @contextlib.contextmanager
    def lock(self, repo: str) -> Iterator[None]:
        """One writer per repository; the kernel drops the lock when its holder dies."""
        path = self.repo_dir(repo) / "baobab" / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def collect_garbage(self, repo: str) -> list[str]:
        """Remove snapshots no ref names, blobs no remaining snapshot links to, and what
        killed writers left (``.incomplete``, ``.tmp``, ``baobab/tmp``). Returns the
        removed blobs' hashes. Call it holding the repository's lock."""
        root = self.repo_dir(repo)
        live = set(self.refs(repo).values())
        shutil.rmtree(root / "baobab" / "tmp", ignore_errors=True)
        kept: set[str] = set()
        for snap in sorted((root / "snapshots").glob("*")):
            if snap.name not in live:
                shutil.rmtree(snap)
                continue
            kept |= {os.path.basename(os.readlink(p)) for p in snap.rglob("*") if p.is_symlink()}
        removed = []
        for blob in sorted((root / "blobs").glob("*")):
            if blob.name not in kept:
                blob.unlink()
                if "." not in blob.name:
                    removed.append(blob.name)
        for tmp in (root / "refs").rglob("*.tmp"):
            tmp.unlink()
        return removed

    def delete_repo(self, repo: str) -> None:
        shutil.rmtree(self.repo_dir(repo), ignore_errors=True)
