"""Is a checkpoint whole? Checked from its files alone, before a resume trusts it.

Atomic publishing (``layout.py``) means a ``step_*`` directory holding meta.json was whole
when it appeared; these checks catch what can happen to it afterwards (a truncated copy,
a full disk on another tool's write, a deleted shard) at the cost of reading headers only:

- meta.json and trainer_state.json parse as JSON objects;
- trainer_state.safetensors has a readable header and exactly the bytes it announces;
- DCP's ``.metadata`` loads and every shard file it points to exists and is long enough.

Reading ``.metadata`` unpickles it (DCP's format), which is fine for the run's own
directory: checkpoints are trusted training state (see ``baobab/checkpoint/__init__.py``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from baobab.checkpoint.layout import META_FILE, checkpoint_dirs, incomplete_checkpoints
from baobab.checkpoint.trainer_state import JSON_FILE, TENSORS_FILE


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint at ``path`` is whole, else the first problem, in words."""
    path = Path(path)
    for name in (META_FILE, JSON_FILE):
        try:
            if not isinstance(json.loads((path / name).read_text()), dict):
                return f"{name} is not a JSON object"
        except (OSError, ValueError) as err:
            return f"{name} is unreadable ({type(err).__name__})"
    problem = _check_safetensors(path / TENSORS_FILE)
    return problem or _check_dcp(path)


def _check_safetensors(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as err:
        return f"{path.name} is unreadable ({type(err).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    size = path.stat().st_size
    return None if size == expected else f"{path.name} has {size} bytes, not {expected}"


def _check_dcp(path: Path) -> str | None:
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # any failure to read it means the checkpoint cannot load
        return f"DCP .metadata is unreadable ({type(err).__name__})"
    needed: dict[str, int] = {}  # shard file -> bytes it must hold at least
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < end:
            return f"shard {name} is truncated ({shard.stat().st_size} of {end} bytes)"
    return None


def newest_loadable(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint of ``run_dir`` (or None), and every checkpoint passed
    over on the way (crash leftovers and newer broken ones), each with its reason."""
    ignored = list(incomplete_checkpoints(run_dir))
    for path in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, ignored
        ignored.append((path, problem))
    return None, ignored
