"""The command line: every subcommand end to end, and one clear sentence for each bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baobab import models
from baobab.cli import main, parse_run_config
from baobab.recipes import recipe_names


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "nano"
    code = main(
        ["train", "--model.name", "gpt-nano", "--data.path", str(tiny_corpus), "--data.seq_len", "32",
         "--data.batch_size", "4", "--train.max_steps", "6", "--train.eval_every", "3", "--train.log_every", "1",
         "--schedule.warmup_steps", "1", "--train.run_dir", str(run_dir), "--train.progress", "false"]
    )  # fmt: skip
    assert code == 0
    return run_dir


def error_of(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_validates(name):
    cfg = parse_run_config(["--recipe", name])
    model = models.build_model(
        models.get_config(cfg.model.name, **cfg.model.overrides), device="meta"
    )
    assert models.count_params(model) > 0


def test_unknown_recipe_names_the_known_ones(capsys):
    err = error_of(capsys, ["train", "--recipe", "nope"])
    assert err == "error: unknown recipe 'nope'; known recipes: " + ", ".join(recipe_names())


def test_unknown_key_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--optim.lrr", "1"])
    assert exit_info.value.code == 2
    assert "--optim.lrr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model.name", "gpt-huge"], "unknown model 'gpt-huge'; known models:"),
        (["--optim.name", "adamx"], "unknown optimizer 'adamx'; choose one of:"),
        (["--optim.lr", "-1"], "lr must be a finite number > 0"),
        (["--data.kind", "video"], "unknown data.kind 'video'; choose one of:"),
        (["--train.max_steps", "0"], "train.max_steps must be at least 1"),
    ],
)
def test_bad_values_get_one_sentence(capsys, tmp_path, argv, message):
    err = error_of(
        capsys,
        ["train", "--train.run_dir", str(tmp_path), "--data.path", str(tmp_path / "none"), *argv],
    )
    assert err.startswith("error: " + message)
    assert "\n" not in err and not (tmp_path / "none").exists()


def test_prepare_missing_and_empty_inputs(capsys, tmp_path):
    err = error_of(
        capsys, ["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]
    )
    assert "does not exist" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    err = error_of(capsys, ["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_prepare_cli_round_trip(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld\n" * 50)
    (tmp_path / "b.txt").write_text("def f(x):\n    return x\n" * 50)
    argv = ["prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(tmp_path / "out"),
            "--tokenizer", "bytes", "--val_fraction", "0.5", "--seed", "1", "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    assert "train:" in capsys.readouterr().out
    err = error_of(capsys, argv)  # a second run must not overwrite the first
    assert "already holds a prepared corpus" in err and "\n" not in err


def test_corrupt_shard_is_refused(capsys, tiny_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    shard = next(corpus.glob("train_*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    err = error_of(
        capsys,
        ["train", "--model.name", "gpt-nano", "--data.path", str(corpus), "--data.seq_len", "32",
         "--train.max_steps", "2", "--train.run_dir", str(tmp_path / "run"), "--train.progress", "false"],
    )  # fmt: skip
    assert "failed its checksum" in err


def test_checkpoint_that_does_not_match_the_model(capsys, trained_run, tiny_corpus, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    err = error_of(
        capsys,
        ["train", "--model.name", "gpt-nano", "--model.overrides.n_layer", "3", "--data.path", str(tiny_corpus),
         "--data.seq_len", "32", "--data.batch_size", "4", "--train.max_steps", "8", "--train.resume", "true",
         "--schedule.warmup_steps", "1", "--train.run_dir", str(run_dir), "--train.progress", "false"],
    )  # fmt: skip
    assert "does not match the model" in err


def test_generate_eval_plot(capsys, trained_run, tmp_path):
    argv = [
        "generate",
        "--checkpoint",
        str(trained_run),
        "--prompt",
        "def ",
        "--max_tokens",
        "12",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert main(["eval", "--checkpoint", str(trained_run)]) == 0
    assert "val_loss" in capsys.readouterr().out
    png = tmp_path / "curves.png"
    assert main(["plot", str(trained_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_refuses_bad_checkpoints(capsys, tmp_path):
    err = error_of(capsys, ["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
    assert "is neither a checkpoint nor a run directory" in err


def test_models_lists_large_sizes_without_allocating(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llama-8b" in out and "8.03G" in out


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "baobab", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "quickstart" in done.stdout


def test_export_and_quantize_commands(capsys, trained_run, tmp_path):
    from baobab.export import load_exported, load_quantized

    exported, quantized = tmp_path / "export", tmp_path / "int8"
    assert main(["export", "--checkpoint", str(trained_run), "--out", str(exported)]) == 0
    assert main(["quantize", str(exported), str(quantized), "--bits", "8"]) == 0
    model, _ = load_exported(exported)
    qmodel, config = load_quantized(quantized)
    assert config["quantization"]["bits"] == 8
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert float((model(x) - qmodel(x)).abs().max()) < 0.1
    capsys.readouterr()
    assert error_of(
        capsys,
        ["quantize", str(exported), str(tmp_path / "q3"), "--bits", "3"],
    )


def test_export_over_its_own_run_keeps_the_run(capsys, trained_run, tmp_path):
    # Issue 13, item 7: this exact command replaced the run, checkpoints included.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    argv = ["export", "--checkpoint", str(run), "--out", str(run), "--overwrite", "true"]
    assert error_of(capsys, argv) == (
        f"error: --out '{run}' is a run directory, which an export must never replace nor "
        "write into; choose an --out outside it"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert len(list((run / "checkpoints").glob("step_*"))) >= 1


def test_flags_may_be_spelled_with_hyphens(capsys):
    # --max-tokens reaches generate's max_tokens, which refuses 0 before any loading.
    err = error_of(capsys, ["generate", "--checkpoint", "nowhere", "--max-tokens", "0"])
    assert err == "error: max_tokens must be at least 1, got 0"
