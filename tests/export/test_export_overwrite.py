"""--overwrite replaces an export and nothing else: never a run, a checkpoint, a corpus, an
input, or a directory that is not an export (issue 13, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baobab import commands
from baobab import data as bdata
from baobab.checkpoint import layout, save_checkpoint
from baobab.checkpoint.trainer_state import JSON_FILE
from baobab.cli import main
from baobab.data.manifest import MANIFEST_NAME
from baobab.export import atomic, export_hf, quantize_export, save_exported
from baobab.models import build_model
from baobab.train.metrics import METRICS_FILE

TINY = dict(vocab_size=300, n_layer=1, n_head=4, d_model=32, ffn_hidden=64, max_seq_len=32)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A run (one checkpoint), a prepared corpus, a baobab export, its int8 twin and a
    Hugging Face directory of the same tiny gpt, side by side."""
    root = tmp_path_factory.mktemp("overwrite")
    torch.manual_seed(0)
    model = build_model("gpt", **TINY)
    tok = bdata.byte_tokenizer().save(root / "tokenizer.json")
    described = {"name": "gpt", "family": "gpt", "config": TINY}
    meta = {"model": described, "objective": "causal_lm", "run": {}}
    save_checkpoint(root / "run", 1, [model], [], {"step": 1}, meta, tok)
    (root / "text.txt").write_text("def f(x):\n    return x\n" * 40)
    bdata.prepare(bdata.PrepareConfig(inputs=[str(root / "text.txt")], out=str(root / "corpus"),
                                      tokenizer="bytes", val_fraction=0.0, workers=1, progress=False))  # fmt: skip
    save_exported(model, root / "export", described, "causal_lm", 1, tok)
    quantize_export(root / "export", root / "int8", 8)
    export_hf(model, root / "hf", tokenizer_file=tok)
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("not an export")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# Each case as the CLI calls it: baobab.commands' function, its arguments ({r}: the root).
REFUSED = [  # (command, args, kwargs, what the sentence says)
    (commands.export, (), {"checkpoint": "{r}/run", "out": "{r}/run/checkpoints/step_00000001"},
     "is a checkpoint, which an export must never replace nor write into"),
    (commands.export, (), {"checkpoint": "{r}/run", "out": "{r}/run/export"},
     "is inside the run directory '{r}/run'"),
    (commands.export, (), {"checkpoint": "{r}/run", "out": "{r}/corpus"}, "is a prepared corpus"),
    (commands.hf_export, ("{r}/run",), {"out": "{r}/corpus/hf"}, "is inside the prepared corpus"),
    (commands.export, (), {"checkpoint": "{r}/run/checkpoints/step_00000001", "out": "{r}"},
     "contains the input '{r}/run/checkpoints/step_00000001', which writing there would delete"),
    (commands.hf_import, ("{r}/hf",), {"out": "{r}/hf"}, "is the input '{r}/hf'"),
    (commands.quantize, ("{r}/export", "{r}/export"), {}, "is the input '{r}/export'"),
    (commands.hf_export, ("{r}/export",), {"out": "{r}/mine"},
     "is not an export (config.json with *.safetensors), so even --overwrite true does not"),
]  # fmt: skip


def _call(root: Path, command, args, kwargs, overwrite: bool):
    args = [a.format(r=root) for a in args]
    kwargs = {k: v.format(r=root) for k, v in kwargs.items()}
    return command(*args, **kwargs, overwrite=overwrite)


@pytest.mark.parametrize(("command", "args", "kwargs", "says"), REFUSED)
def test_refused_even_with_overwrite_and_nothing_changes(root, command, args, kwargs, says):
    before = snapshot(root)
    for overwrite in (True, False):
        with pytest.raises(ValueError) as info:
            _call(root, command, args, kwargs, overwrite)
        message = str(info.value)
        assert message.startswith("--out '") and says.format(r=root) in message, message
    assert snapshot(root) == before


def test_the_cli_refuses_in_one_sentence(capsys, root):
    before = snapshot(root)
    argv = ["hf", "import", f"{root}/hf", "--out", f"{root}/corpus", "--overwrite", "true"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --out '{root}/corpus' is a prepared corpus, which an export must never "
        "replace nor write into; choose an --out outside it"
    )
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("command", "args", "kwargs"),
    [
        (commands.export, (), {"checkpoint": "{r}/run", "out": "{r}/export"}),
        (commands.quantize, ("{r}/export", "{r}/int8"), {}),
        (commands.hf_export, ("{r}/export",), {"out": "{r}/hf"}),  # an HF dir is an export
        (commands.hf_import, ("{r}/hf",), {"out": "{r}/export"}),
    ],
)
def test_an_export_is_replaced_only_when_asked(root, command, args, kwargs):
    out = Path((kwargs.get("out") or args[1]).format(r=root))
    before = snapshot(root)
    with pytest.raises(ValueError) as info:
        _call(root, command, args, kwargs, overwrite=False)
    assert str(info.value) == (
        f"--out '{out}' already holds an export; pass --overwrite true to replace it"
    )
    assert snapshot(root) == before
    assert _call(root, command, args, kwargs, overwrite=True) == out
    assert atomic.is_export(out)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_the_recognised_names_are_those_their_writers_use(root):
    assert atomic.CHECKPOINTS == layout.CHECKPOINTS and atomic.METRICS_FILE == METRICS_FILE
    assert atomic.TRAINER_STATE == JSON_FILE and atomic.MANIFEST_FILE == MANIFEST_NAME
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    assert (ckpt / atomic.DCP_METADATA).is_file()
    assert (root / "corpus" / atomic.FIRST_SHARD).is_file()
    kinds = {name: atomic.protected_kind(root / name) for name in ("run", "corpus", "export")}
    assert kinds == {"run": "run directory", "corpus": "prepared corpus", "export": None}
