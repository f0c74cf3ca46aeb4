"""The local registry through its CLI: round trip, versions sharing blobs, aliases with
history, tampering, removal with garbage collection, and bad input in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baobab.cli import main
from baobab.export.artifact import load_exported, read_config
from baobab.export.open import open_model
from baobab.registry import core, resolve_model_dir
from baobab.registry.card import read_card
from baobab.registry.names import ModelRef, parse_push, parse_ref
from baobab.registry.store import LocalStore


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(snapshot: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(snapshot.iterdir())}


@pytest.fixture(scope="module")
def registry(exports, tmp_path_factory) -> Path:
    """A registry with gpt-mini versions 1 (base) and 2 (its fine-tune, @staging) and mlp 1."""
    home = tmp_path_factory.mktemp("registry")
    assert main(["registry", "push", str(exports["llama"][1]), "gpt-mini", "--registry", str(home)]) == 0  # fmt: skip
    assert main(["registry", "push", str(exports["finetune"][1]), "gpt-mini:staging",
                 "--registry", str(home), "--parent", "models:/gpt-mini/1",
                 "--license", "apache-2.0"]) == 0  # fmt: skip
    assert main(["registry", "push", str(exports["mlp"][1]), "org/mlp", "--registry", str(home)]) == 0  # fmt: skip
    return home


def test_push_pull_round_trip_is_byte_identical_and_loads(registry, exports, tmp_path, capsys):
    code, out, _ = _cli(capsys, "pull", "gpt-mini/1", "--registry", str(registry),
                        "--cache", str(tmp_path / "cache"))  # fmt: skip
    assert code == 0
    pulled = Path(out.strip().splitlines()[-1])
    assert pulled.is_relative_to(tmp_path / "cache")
    source = LocalStore(registry).snapshot_dir("gpt-mini", core.versions(LocalStore(registry), "gpt-mini")[1])  # fmt: skip
    assert _files(pulled) == _files(source)
    assert all(p.is_symlink() and not Path(p.readlink()).is_absolute() for p in pulled.iterdir())
    # baobab reads the Hugging Face snapshot as an export: same description, same logits.
    model, _ = exports["llama"]
    assert read_config(pulled) == json.loads((exports["llama"][1] / "config.json").read_text())
    loaded, _ = load_exported(pulled)
    x = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert open_model(pulled).described["name"] == "gpt"
    # a second pull has nothing to copy and gives the same directory
    assert core.pull(LocalStore(registry), LocalStore(tmp_path / "cache"), parse_ref("gpt-mini/1")) == pulled  # fmt: skip


def test_versions_share_unchanged_blobs_and_a_repeated_push_is_the_same_version(registry, exports, capsys):  # fmt: skip
    store = LocalStore(registry)
    assert list(core.versions(store, "gpt-mini")) == [1, 2]
    m1, m2 = (store.read_manifest("gpt-mini", rev)["files"] for rev in core.versions(store, "gpt-mini").values())  # fmt: skip
    assert m1["tokenizer.json"] == m2["tokenizer.json"]  # the fine-tune shares its tokenizer
    assert m1["model.safetensors"] != m2["model.safetensors"]
    hashes = {e["sha256"] for m in (m1, m2) for e in m.values()}
    blobs = {p.name for p in (store.repo_dir("gpt-mini") / "blobs").iterdir()}
    assert blobs == hashes | {store.manifest_sha("gpt-mini", r) for r in core.versions(store, "gpt-mini").values()}  # fmt: skip
    code, out, _ = _cli(capsys, "push", str(exports["llama"][1]), "gpt-mini", "--registry", str(registry))  # fmt: skip
    assert code == 0 and "already in the registry as gpt-mini/1" in out
    assert list(core.versions(store, "gpt-mini")) == [1, 2]
    code, out, _ = _cli(capsys, "list", "--registry", str(registry))
    assert "gpt-mini  versions 1, 2  @staging=2" in out and "org/mlp  versions 1" in out


def test_the_card_and_manifest_carry_lineage_size_and_licence(registry, exports):
    store = LocalStore(registry)
    snap = store.snapshot_dir("gpt-mini", core.versions(store, "gpt-mini")[2])
    card = read_card(snap / "README.md")
    assert card["license"] == "apache-2.0" and card["base_model"] == "gpt-mini/1"
    from baobab.models import build_model, count_params

    # the header's shapes count what a meta-built model of the same config counts
    expected = count_params(build_model(exports["finetune"][0].cfg, device="meta"))
    assert card["baobab"] == {"family": "gpt", "size": "gpt", "parameters": expected,
                              "parent": "gpt-mini/1", "objective": "causal_lm", "step": 7,
                              "dtype": "float32"}  # fmt: skip
    manifest = json.loads((snap / "baobab_manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["layout"] == "huggingface"
    assert manifest["parent"] == "gpt-mini/1"
    mlp = store.snapshot_dir("org/mlp", core.versions(store, "org/mlp")[1])
    assert sorted(p.name for p in mlp.iterdir()) == [
        "README.md", "baobab_manifest.json", "config.json", "model.safetensors"]  # fmt: skip


def test_aliases_move_with_their_history(registry, capsys, monkeypatch):
    monkeypatch.setenv("USER", "ana")
    store = LocalStore(registry)
    assert _cli(capsys, "alias", "gpt-mini@champion", "1", "--registry", str(registry))[0] == 0
    assert _cli(capsys, "alias", "gpt-mini@champion", "2", "--registry", str(registry))[0] == 0
    assert core.resolve(store, parse_ref("models:/gpt-mini@champion"))[0] == 2
    moves = [(h["alias"], h["from"], h["to"], h["who"]) for h in store.history("gpt-mini")]
    assert moves[-2:] == [("champion", None, 1, "ana"), ("champion", 1, 2, "ana")]
    assert all("when" in h for h in store.history("gpt-mini"))
    code, _, err = _cli(capsys, "verify", "gpt-mini@prod", "--registry", str(registry))
    assert code == 2
    assert err.strip() == "error: 'gpt-mini' has no alias @prod; aliases: @champion, @staging."


def test_unknown_names_and_versions_are_named_with_the_known_ones(registry, capsys):
    code, _, err = _cli(capsys, "pull", "gpt-maxi", "--registry", str(registry))
    assert code == 2 and err.strip() == (
        "error: no model named 'gpt-maxi' in the registry; known: gpt-mini, org/mlp."
    )
    code, _, err = _cli(capsys, "show", "gpt-mini/9", "--registry", str(registry))
    assert code == 2 and err.strip() == "error: 'gpt-mini' has no version 9; versions: 1, 2."
    with pytest.raises(ValueError, match="not valid"):
        parse_push("a--b")
    with pytest.raises(ValueError, match="not 'main'"):
        parse_push("gpt-mini:v3")
    assert parse_ref("models:/org/m/3") == ModelRef("org/m", version=3)


def test_pushing_a_directory_that_is_not_an_export_writes_nothing(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"architectures": ["X"]}')
    code, _, err = _cli(capsys, "push", str(tmp_path / "notes"), "m", "--registry", str(tmp_path / "reg"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "is not a baobab export" in err
    assert not (tmp_path / "reg").exists()


def test_a_tampered_blob_is_refused_by_verify_and_pull(exports, tmp_path, capsys):
    home = tmp_path / "reg"
    assert _cli(capsys, "push", str(exports["gpt2"][1]), "g2", "--registry", str(home))[0] == 0
    assert _cli(capsys, "verify", "g2", "--registry", str(home))[0] == 0
    store = LocalStore(home)
    sha = store.read_manifest("g2", core.versions(store, "g2")[1])["files"]["model.safetensors"]["sha256"]  # fmt: skip
    blob = store.blob_path("g2", sha)
    original = blob.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    code, _, err = _cli(capsys, "verify", "g2/1", "--registry", str(home))
    assert code == 2 and err.strip() == (
        "error: file model.safetensors of 'g2' version 1 does not match its sha256 "
        "(corrupt, missing or tampered); pull it again."
    )
    code, _, err = _cli(capsys, "pull", "g2", "--registry", str(home), "--cache", str(tmp_path / "c"))  # fmt: skip
    assert code == 2 and "file model.safetensors of 'g2' version 1 does not match" in err
    cache = LocalStore(tmp_path / "c")
    assert cache.refs("g2") == {} and not cache.has_blob("g2", sha)
    assert not list((cache.repo_dir("g2") / "snapshots").glob("*"))
    with pytest.raises(ValueError, match="does not match its sha256"):
        resolve_model_dir("models:/g2/1", registry=str(home), cache=str(tmp_path / "c"))
    blob.write_bytes(original)
    core.verify(store, parse_ref("g2/1"))  # restored
    snap = store.snapshot_dir("g2", core.versions(store, "g2")[1])
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to("../../blobs/" + sha)  # a file swapped for another blob
    with pytest.raises(ValueError, match="file config.json of 'g2' version 1 is not the blob"):
        core.verify(store, parse_ref("g2/1"))


def test_rm_removes_a_version_and_collects_its_blobs(exports, tmp_path, capsys):
    home = tmp_path / "reg"
    for export in ("llama", "finetune"):
        assert _cli(capsys, "push", str(exports[export][1]), "m:champion", "--registry", str(home))[0] == 0  # fmt: skip
    store = LocalStore(home)
    before = {p.name for p in (store.repo_dir("m") / "blobs").iterdir()}
    code, _, err = _cli(capsys, "rm", "m/2", "--registry", str(home))
    assert code == 0, err
    after = {p.name for p in (store.repo_dir("m") / "blobs").iterdir()}
    files = store.read_manifest("m", core.versions(store, "m")[1])["files"]
    assert after == {e["sha256"] for e in files.values()} | {store.manifest_sha("m", core.versions(store, "m")[1])}  # fmt: skip
    assert after < before
    assert core.aliases(store, "m") == {}  # @champion named version 2: gone with it
    assert store.refs("m")["main"] == core.versions(store, "m")[1]
    assert resolve_model_dir("models:/m/1", registry=str(home)) == store.snapshot_dir("m", core.versions(store, "m")[1])  # fmt: skip
    assert _cli(capsys, "rm", "m", "--registry", str(home))[0] == 0
    assert not store.repo_dir("m").exists()
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_a_killed_pull_resumes_and_a_bad_partial_is_refused(registry, tmp_path):
    source, cache = LocalStore(registry), LocalStore(tmp_path / "cache")
    entry = source.read_manifest("gpt-mini", core.versions(source, "gpt-mini")[2])["files"]
    sha = entry["model.safetensors"]["sha256"]
    data = source.blob_path("gpt-mini", sha).read_bytes()
    partial = cache.blob_path("gpt-mini", sha).with_name(sha + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[: len(data) // 2])  # what a pull killed mid-copy leaves
    snap = core.pull(source, cache, parse_ref("gpt-mini@staging"))
    assert (snap / "model.safetensors").read_bytes() == data and not partial.exists()
    assert cache.refs("gpt-mini").keys() == {"v2", "staging", "main"}
    other = LocalStore(tmp_path / "other")
    bad = other.blob_path("gpt-mini", sha).with_name(sha + ".incomplete")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * 64)  # a partial that is not a prefix: the whole blob mismatches
    with pytest.raises(ValueError, match="file model.safetensors of 'gpt-mini' version 2 does not"):
        core.pull(source, other, parse_ref("gpt-mini/2"))
    assert not bad.exists() and other.refs("gpt-mini") == {}
    core.pull(source, other, parse_ref("gpt-mini/2"))  # starts over, and succeeds
    core.verify(other, parse_ref("gpt-mini/2"))


def test_generate_reads_a_registry_name(registry, exports, monkeypatch, capsys):
    from baobab.commands import generate

    monkeypatch.setenv("BAOBAB_REGISTRY", str(registry))
    by_name = generate("models:/gpt-mini/1", prompt="ab", max_tokens=5, temperature=0)
    by_dir = generate(str(exports["llama"][1]), prompt="ab", max_tokens=5, temperature=0)
    assert by_name == by_dir


def test_training_and_explain_read_registry_names(registry, exports, monkeypatch, capsys, tmp_path):
    """``--model.init models:/…`` is pulled once in the launching process (``baobab plan`` reads
    it like ``baobab train``), and ``baobab explain`` opens a name like a directory."""
    monkeypatch.setenv("BAOBAB_REGISTRY", str(registry))
    capsys.readouterr()
    assert (
        main(["plan", "--model.init", "models:/gpt-mini/1", "--data.seq_len", "16", "--json"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == str(resolve_model_dir("models:/gpt-mini/1"))
    out = tmp_path / "explained"
    argv = ["explain", "models:/gpt-mini/1", "--prompt", "ab", "--methods", "grad_x_input",
            "--out", str(out), "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "explanation.json").read_text())["family"] == "gpt"
    assert main(["plan", "--model.init=models:/gpt-mini@nope"]) == 2
    assert "has no alias @nope; aliases: " in capsys.readouterr().err
