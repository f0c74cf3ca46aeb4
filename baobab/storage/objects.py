"""Object stores through ``fsspec``: one place for URLs, credentials and whole-object writes.

Credentials come from the environment only (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, read by the client library itself, or its standard config files);
baobab never passes, stores, logs or prints them. A URL with credentials in it
(``s3://KEY:SECRET@bucket``) is refused, and the refusal does not repeat them. The endpoint
of an S3-compatible server is ``$BAOBAB_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL``; the
region ``$AWS_REGION``, else ``$AWS_DEFAULT_REGION``.

An object PUT is atomic (readers see the old object, or none, or the whole new one), so each
write here is one put; there is no rename and no append. Listings are not cached (refs and
manifests change under other processes).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENDPOINT_ENVS = ("BAOBAB_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
REHASH_LIMIT = 64 << 20  # uploads up to this size are read back and re-hashed; larger: size


def is_remote(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names a remote store (``scheme://``, not ``file://``)."""
    text = str(url)
    return "://" in text and not text.startswith("file://")


# ``scheme://user:secret@host...``; a secret may hold "/" (AWS secrets do), so the userinfo
# is anything up to the last "@" that follows a ":", not only what urlsplit calls netloc.
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^@]*:[^@]*@")


def check_url(url: str) -> str:
    """``url`` itself, or a ValueError of one sentence when it carries credentials (the
    sentence names the store without them)."""
    parts = urlsplit(url)
    if _USERINFO.match(url) or parts.username is not None or parts.password is not None:
        where = url.split("://", 1)[0] + "://" + url.rsplit("@", 1)[1]
        raise ValueError(
            f"the store URL {where} must not carry credentials (user:secret@); set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment instead."
        )
    return url


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for ``protocol`` from the environment: endpoint and region, never keys
    (the client reads those itself), listings uncached."""
    if protocol not in ("s3", "s3a"):
        return {}
    client: dict[str, Any] = {}
    endpoint, region = _first_env(ENDPOINT_ENVS), _first_env(REGION_ENVS)
    if endpoint:
        client["endpoint_url"] = endpoint
    if region:
        client["region_name"] = region
    return {"client_kwargs": client, "use_listings_cache": False}


def open_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, root path inside it) of ``url``, e.g. ``s3://bucket/prefix``."""
    import fsspec  # deferred: local-only users never import it

    check_url(url)
    protocol = url.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options(protocol))
    except ImportError:
        raise ValueError(
            f"{protocol}:// stores need an fsspec backend that is not installed "
            "(for s3://: pip install 'baobab[s3]')."
        ) from None
    return fs, root.rstrip("/")


def check_reachable(fs: Any, url: str, root: str) -> None:
    """A ValueError of one sentence when the bucket of ``url`` (S3) is missing or cannot be
    reached with the environment's endpoint and credentials; other stores are not checked.
    The sentence names the error's type only: a client's message may echo a request."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"s3", "s3a"}:
        return
    bucket = root.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as err:  # network, permission, endpoint: the client's many types
        raise ValueError(
            f"the store {url} cannot be reached ({type(err).__name__}); check "
            "BAOBAB_S3_ENDPOINT_URL and the AWS_* credentials in the environment."
        ) from None
    if not found:  # s3fs answers False for a missing bucket and an unreachable endpoint alike
        raise ValueError(
            f"the store {url}: bucket '{bucket}' not found or the endpoint not reachable; "
            "create the bucket, or check BAOBAB_S3_ENDPOINT_URL and the AWS_* credentials."
        )


def put_file(fs: Any, src: Path, path: str, size: int, sha256: str | None = None) -> None:
    """Upload ``src`` to ``path`` as one object, then check it: its size always, and its
    sha256 (when given) by reading it back when it is at most REHASH_LIMIT bytes."""
    fs.put_file(str(src), path)
    _check_upload(fs, path, size, sha256)


def put_bytes(fs: Any, data: bytes, path: str, sha256: str | None = None) -> None:
    """Write ``data`` to ``path`` as one object and check it as :func:`put_file` does."""
    fs.pipe_file(path, data)
    _check_upload(fs, path, len(data), sha256)


def _check_upload(fs: Any, path: str, size: int, sha256: str | None) -> None:
    if fs.size(path) != size:
        raise ValueError(f"the upload of {path} was cut short (size differs); push again.")
    if sha256 is not None and size <= REHASH_LIMIT:
        digest = hashlib.sha256(fs.cat_file(path)).hexdigest()
        if digest != sha256:
            raise ValueError(f"the upload of {path} does not match its sha256; push again.")
