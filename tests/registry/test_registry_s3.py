"""The registry on a real S3-compatible server on loopback (moto's server mode, the
``s3_server`` fixture of tests/conftest.py), through the CLI: round trip, versions sharing
blobs, aliases with history, tampering, ``kill -9`` during a push, and credentials that are
never written or printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from baobab.cli import main
from baobab.registry import core
from baobab.registry.names import parse_ref
from baobab.registry.objstore import ObjectStore
from baobab.registry.package import package_export
from baobab.registry.store import KILL_ENV, MANIFEST_FILE

pytest.importorskip("s3fs")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _blobs(objects: dict[str, bytes]) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in objects if "/blobs/" in k}


def _live_blobs(store: ObjectStore, name: str) -> set[str]:
    """The blobs the versions of ``name`` need: their manifests and files."""
    need = set()
    for revision in core.versions(store, name).values():
        need.add(store.manifest_sha(name, revision))
        need |= {e["sha256"] for e in store.read_manifest(name, revision)["files"].values()}
    return need


@pytest.fixture(scope="module")
def registry(s3_server, exports) -> str:
    """gpt-mini 1 (base) and 2 (its fine-tune, @staging) on S3."""
    url = s3_server.new_bucket("registry") + "/team/models"
    assert main(["registry", "push", str(exports["llama"][1]), "gpt-mini", "--registry", url]) == 0
    assert main(["registry", "push", str(exports["finetune"][1]), "gpt-mini:staging",
                 "--registry", url]) == 0  # fmt: skip
    return url


def test_round_trip_is_byte_identical_and_versions_share_blobs(
    registry, s3_server, exports, tmp_path, capsys
):
    # the same export pushed to a local registry gives the same files, byte for byte
    local = tmp_path / "local"
    assert main(["registry", "push", str(exports["llama"][1]), "gpt-mini", "--registry", str(local)]) == 0  # fmt: skip
    code, out, _ = _cli(capsys, "pull", "gpt-mini/1", "--registry", registry,
                        "--cache", str(tmp_path / "cache"))  # fmt: skip
    assert code == 0
    pulled = Path(out.strip().splitlines()[-1])
    assert pulled.is_relative_to(tmp_path / "cache")
    local_snap = next((local / "models--gpt-mini" / "snapshots").iterdir())
    names = sorted(p.name for p in pulled.iterdir())
    assert names == sorted(p.name for p in local_snap.iterdir())
    for name in names:
        if name != MANIFEST_FILE:  # the manifest holds its creation time
            assert (pulled / name).read_bytes() == (local_snap / name).read_bytes(), name
    manifest = json.loads((pulled / MANIFEST_FILE).read_text())
    assert manifest["version"] == 1 and set(manifest["files"]) == set(names) - {MANIFEST_FILE}
    # two versions share what did not change: the bucket holds each blob once
    store = ObjectStore(registry)
    files = [store.read_manifest("gpt-mini", rev)["files"] for rev in core.versions(store, "gpt-mini").values()]  # fmt: skip
    shared = {f for f in files[0] if files[0][f] == files[1][f]}
    assert "tokenizer.json" in shared and "model.safetensors" not in shared
    unique = {e["sha256"] for version in files for e in version.values()}
    blobs = _blobs(s3_server.objects(registry))
    assert len(blobs) == len(unique) + 2  # + the two manifests
    assert len(blobs) < sum(map(len, files)) + 2
    code, out, _ = _cli(capsys, "list", "--registry", registry)
    assert code == 0 and "gpt-mini  versions 1, 2  @staging=2" in out


def test_aliases_move_with_history_and_verify_show_rm(registry, s3_server, capsys):
    assert _cli(capsys, "alias", "gpt-mini@champion", "1", "--registry", registry)[0] == 0
    assert _cli(capsys, "alias", "gpt-mini@champion", "2", "--registry", registry)[0] == 0
    code, out, _ = _cli(capsys, "show", "gpt-mini@champion", "--registry", registry)
    shown = json.loads(out)
    assert code == 0 and shown["manifest"]["version"] == 2
    assert shown["aliases"] == {"champion": 2, "staging": 2}
    moves = [(h["alias"], h["from"], h["to"]) for h in shown["history"]]
    assert moves == [("staging", None, 2), ("champion", None, 1), ("champion", 1, 2)]
    assert all(h["who"] and h["when"] for h in shown["history"])
    code, out, _ = _cli(capsys, "verify", "gpt-mini@champion", "--registry", registry)
    assert code == 0 and "match their sha256" in out
    code, _, err = _cli(capsys, "show", "gpt-mini@nope", "--registry", registry)
    assert code != 0 and "aliases: @champion, @staging" in err


def test_rm_deletes_only_the_blobs_no_version_needs(s3_server, exports, capsys):
    url = s3_server.new_bucket("rm")
    for export in ("llama", "finetune"):
        assert main(["registry", "push", str(exports[export][1]), "m", "--registry", url]) == 0
    assert _cli(capsys, "rm", "m/1", "--registry", url)[0] == 0
    store = ObjectStore(url)
    assert list(core.versions(store, "m")) == [2]
    assert _blobs(s3_server.objects(url)) == _live_blobs(store, "m")
    assert _cli(capsys, "rm", "m", "--registry", url)[0] == 0
    assert s3_server.objects(url) == {}
    assert _cli(capsys, "list", "--registry", url)[1].strip() == "no models"


def test_a_tampered_object_is_refused_by_pull_and_verify(s3_server, exports, tmp_path, capsys):
    url = s3_server.new_bucket("tamper")
    assert main(["registry", "push", str(exports["mlp"][1]), "m", "--registry", url]) == 0
    store = ObjectStore(url)
    manifest = store.read_manifest("m", core.versions(store, "m")[1])
    file, entry = max(manifest["files"].items(), key=lambda item: item[1]["size"])
    bucket = url.removeprefix("s3://")
    key = f"models--m/blobs/{entry['sha256']}"
    data = bytearray(s3_server.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3_server.client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    cache = tmp_path / "cache"
    code, out, err = _cli(capsys, "pull", "m/1", "--registry", url, "--cache", str(cache))
    assert code != 0 and f"file {file} of 'm' version 1 does not match its sha256" in err
    assert err.strip().count(". ") == 0 and "Traceback" not in err  # one sentence
    assert not (cache / "models--m" / "snapshots").exists()  # nothing became visible
    code, _, err = _cli(capsys, "verify", "m", "--registry", url)
    assert code != 0 and f"file {file} of 'm' version 1 does not match its sha256" in err


def _light(files_json: Path, url: str, kill_at: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    cmd = [sys.executable, "-m", "baobab.registry.light", str(files_json), url, "m:staging"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def _packaged(export: Path, work: Path) -> Path:
    files, meta = package_export(export, work, "m")
    out = work / "files.json"
    out.write_text(json.dumps({"files": {k: str(v) for k, v in files.items()}, "meta": meta}))
    return out


@pytest.fixture(scope="module")
def packaged(exports, tmp_path_factory) -> dict[str, Path]:
    """The files of versions 1 and 2 as the light entry point reads them."""
    work = tmp_path_factory.mktemp("packaged")
    return {v: _packaged(exports[e][1], work / v) for v, e in (("v1", "llama"), ("v2", "finetune"))}


def _publish_in_process(files_json: Path, url: str) -> tuple[int, bool]:
    packaged = json.loads(files_json.read_text())
    files = {k: Path(v) for k, v in packaged["files"].items()}
    return core.publish(ObjectStore(url), "m", files, packaged["meta"], "staging")


# kill points of the push of version 2 (writes counted by write_point: 1 its one new blob, the
# weights; 2 the manifest; 3 the ref v2; 4 main; 5 the alias history; 6 the alias): before the
# blob, before the manifest, and after the version's ref but before ``main``.
KILL_POINTS = (1, 2, 4)


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_push_killed_on_the_object_store_then_repeated_is_whole(s3_server, packaged, kill_at):
    url = s3_server.new_bucket(f"kill{kill_at}") + "/reg"
    _publish_in_process(packaged["v1"], url)  # version 1, before the push that is killed
    v2 = packaged["v2"]
    run = _light(v2, url, kill_at)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    store = ObjectStore(url)
    visible = list(core.versions(store, "m"))
    assert visible == ([1, 2] if kill_at > 3 else [1])  # version 2 is whole once its ref exists
    for version in visible:
        core.verify(store, parse_ref(f"m/{version}"))
    # the repeated push, in this process (only the killed one needs a process of its own)
    assert _publish_in_process(v2, url) == (2, kill_at <= 3)
    assert list(core.versions(store, "m")) == [1, 2]
    for version in (1, 2):
        core.verify(store, parse_ref(f"m/{version}"))
    assert store.refs("m")["main"] == core.versions(store, "m")[2]
    assert core.aliases(store, "m") == {"staging": 2}
    assert _blobs(s3_server.objects(url)) == _live_blobs(store, "m")  # nothing left over


def test_credentials_are_never_written_or_printed(s3_server, exports, packaged, tmp_path, capsys):
    key, secret = s3_server.secrets
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # the push really used them
    url = s3_server.new_bucket("secrets")
    captured = []
    for argv in (
        ["push", str(exports["llama"][1]), "m:staging", "--registry", url],
        ["alias", "m@champion", "1", "--registry", url],
        ["show", "m@champion", "--registry", url],
        ["pull", "m@champion", "--registry", url, "--cache", str(tmp_path / "cache")],
        ["verify", "m", "--registry", url],
        ["list", "--registry", url],
        ["show", "m/9", "--registry", url],  # an error message too
    ):
        code, out, err = _cli(capsys, *argv)
        captured.append(out + err)
    light = _light(packaged["v2"], url, None)
    assert light.returncode == 0, light.stderr[-2000:]
    captured.append(light.stdout + light.stderr)
    # a URL with credentials in it is refused in one sentence that does not repeat them
    code, out, err = _cli(capsys, "list", "--registry", f"s3://{key}:{secret}@bucket/reg")
    assert code != 0 and "must not carry credentials" in err and "bucket/reg" in err
    captured.append(out + err)
    # a missing bucket, or an endpoint nobody listens on: one sentence each
    code, out, err = _cli(capsys, "list", "--registry", "s3://no-such-bucket/reg")
    assert code != 0 and "bucket 'no-such-bucket' not found" in err and "Traceback" not in err
    captured.append(out + err)
    written = list(s3_server.objects(url).values())
    written += [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(written) > 10
    for needle in (key, secret):
        assert not any(needle in text for text in captured)
        assert not any(needle.encode() in data for data in written)


def test_the_light_entry_point_on_s3_imports_no_torch(s3_server) -> None:
    code = ("import sys, baobab.registry.light as light; "
            "store = light.open_store(sys.argv[1]); store.repos(); print('torch' in sys.modules)")  # fmt: skip
    url = s3_server.new_bucket("light")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_killed_pull_from_s3_resumes_and_a_bad_partial_is_refused(
    registry, s3_server, tmp_path, capsys
):
    store = ObjectStore(registry)
    manifest = store.read_manifest("gpt-mini", core.versions(store, "gpt-mini")[1])
    entry = manifest["files"]["model.safetensors"]
    data = s3_server.objects(registry)[f"team/models/models--gpt-mini/blobs/{entry['sha256']}"]
    for partial, ok in ((data[: len(data) // 2], True), (b"x" * 100, False)):
        cache = tmp_path / ("good" if ok else "bad")
        blobs = cache / "models--gpt-mini" / "blobs"
        blobs.mkdir(parents=True)
        (blobs / f"{entry['sha256']}.incomplete").write_bytes(partial)  # a killed pull's
        code, out, err = _cli(capsys, "pull", "gpt-mini/1", "--registry", registry,
                              "--cache", str(cache))  # fmt: skip
        assert (code == 0) == ok, err
        if ok:
            assert (Path(out.strip()) / "model.safetensors").read_bytes() == data
        else:
            assert "file model.safetensors of 'gpt-mini' version 1 does not match" in err
            assert not (blobs / entry["sha256"]).exists()
