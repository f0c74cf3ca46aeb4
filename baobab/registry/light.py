"""The torch-free half of a push, as a process of its own: ``python -m baobab.registry.light
FILES_JSON HOME NAME[:TAG]`` publishes already packaged files (``{"files": {name: path},
"meta": {...}}``, what :func:`baobab.registry.package.package_export` returns) into the
registry at HOME (a directory, or an object-store URL such as ``s3://bucket/prefix``).
The crash tests run it once per kill point (``BAOBAB_REGISTRY_KILL_AT``): it imports
baobab.registry and no torch, so each run starts in a fraction of a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from baobab.registry.command import open_store
from baobab.registry.core import publish
from baobab.registry.names import parse_push


def main(argv: list[str]) -> int:
    files_json, home, spec = argv
    packaged = json.loads(Path(files_json).read_text())
    name, tag = parse_push(spec)
    files = {k: Path(v) for k, v in packaged["files"].items()}
    version, created = publish(open_store(home), name, files, packaged["meta"], tag)
    print(json.dumps({"version": version, "created": created}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
