"""Remote storage through ``fsspec``: object-store URLs (``s3://bucket/prefix``, any fsspec
URL), their credential rules and whole-object writes. A leaf of the flow (nothing of
baobab), so the registry, data and checkpoints all build on it. Imports no torch."""

from baobab.storage.objects import (
    check_reachable,
    check_url,
    is_remote,
    open_filesystem,
    put_bytes,
    put_file,
)

__all__ = ["check_reachable", "check_url", "is_remote", "open_filesystem", "put_bytes", "put_file"]
