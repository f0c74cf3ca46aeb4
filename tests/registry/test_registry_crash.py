"""``kill -9`` at every write of a push, then the same push again: the registry is whole.

The push's torch-free half runs in ``baobab.registry.light`` (no torch import: each kill
point costs one interpreter start), killing itself with SIGKILL at the write named by
BAOBAB_REGISTRY_KILL_AT. Each kill point starts from a registry holding version 1 and kills
the push of version 2 (tagged @staging); after it, no half-version is visible, and the
repeated push leaves versions 1 and 2 whole, hub-scannable and with nothing left over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from baobab.registry import core
from baobab.registry.names import parse_ref
from baobab.registry.package import package_export
from baobab.registry.store import KILL_ENV, LocalStore

huggingface_hub = pytest.importorskip("huggingface_hub")


def _light(files_json: Path, home: Path, kill_at: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    cmd = [sys.executable, "-m", "baobab.registry.light", str(files_json), str(home), "m:staging"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def _packaged(export: Path, work: Path) -> Path:
    files, meta = package_export(export, work, "m")
    out = work / "files.json"
    out.write_text(json.dumps({"files": {k: str(v) for k, v in files.items()}, "meta": meta}))
    return out


def _consistent(home: Path, versions: list[int]) -> None:
    store = LocalStore(home)
    assert list(core.versions(store, "m")) == versions
    for version in versions:
        core.verify(store, parse_ref(f"m/{version}"))
    assert store.refs("m")["main"] == core.versions(store, "m")[max(versions)]
    info = huggingface_hub.scan_cache_dir(home)
    assert info.warnings == []
    (repo,) = info.repos
    assert {r.commit_hash for r in repo.revisions} <= set(store.refs("m").values())


def test_a_push_killed_at_any_write_then_repeated_leaves_a_whole_registry(exports, tmp_path):
    v1 = _packaged(exports["llama"][1], tmp_path / "w1")
    v2 = _packaged(exports["finetune"][1], tmp_path / "w2")
    base = tmp_path / "base"
    assert _light(v1, base, None).returncode == 0
    kill_at, killed = 0, 0
    while True:
        kill_at += 1
        home = tmp_path / f"home{kill_at}"
        shutil.copytree(base, home, symlinks=True)
        run = _light(v2, home, kill_at)
        if run.returncode == 0:  # past the last write: the push completed
            assert json.loads(run.stdout) == {"version": 2, "created": True}
            _consistent(home, [1, 2])
            break
        assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
        killed += 1
        store = LocalStore(home)
        visible = list(core.versions(store, "m"))
        assert visible in ([1], [1, 2])  # version 2 is whole once its ref exists
        for version in visible:
            core.verify(store, parse_ref(f"m/{version}"))
        rerun = _light(v2, home, None)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert json.loads(rerun.stdout)["version"] == 2
        _consistent(home, [1, 2])
        assert core.aliases(store, "m") == {"staging": 2}
        leftovers = [p for p in store.repo_dir("m").rglob("*") if p.name.endswith((".incomplete", ".tmp"))]  # fmt: skip
        assert leftovers == [] and not (store.repo_dir("m") / "baobab" / "tmp").exists()
        shutil.rmtree(home)
    assert killed >= 20, f"only {killed} kill points"
    print(f"{killed} kill points")


def test_the_light_entry_point_imports_no_torch() -> None:
    code = "import sys, baobab.registry.light; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
