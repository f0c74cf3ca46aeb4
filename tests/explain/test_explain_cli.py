"""``baobab explain`` end to end: tiny models of each family, stored as exports and as a run
directory, explained through the CLI; what it writes equals what the Python API returns;
bad input ends with one sentence and exit 2."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baobab.cli import main
from baobab.data import Tokenizer, byte_tokenizer
from baobab.explain import explain
from baobab.explain.command import text_units
from baobab.explain.figures import (
    DPI,
    attention_inches,
    feature_inches,
    image_inches,
    strip_inches,
)
from baobab.export.artifact import save_exported
from baobab.export.open import open_model

VOCAB = 512  # the byte tokenizer's ids (259) fit


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """gpt-nano, bert-tiny and resnet18-digits exports, and an lstm-tiny run directory."""
    from baobab.checkpoint import save_checkpoint
    from baobab.models import build_model

    root = tmp_path_factory.mktemp("models")
    tokenizer = byte_tokenizer().save(root / "tokenizer.json")
    found = {}
    for name, family, objective in [("gpt-nano", "gpt", "causal_lm"),
                                    ("bert-tiny", "bert", "masked_lm")]:  # fmt: skip
        model = build_model(name, seed=0, vocab_size=VOCAB)
        described = {"name": name, "family": family, "config": {"vocab_size": VOCAB}}
        found[family] = save_exported(model, root / name, described, objective, 1, tokenizer)
    lstm = build_model("lstm-tiny", seed=0)
    meta = {"model": {"name": "lstm-tiny", "family": "lstm", "config": {}},
            "objective": "causal_lm"}  # fmt: skip
    save_checkpoint(root / "lstm-run", 1, [lstm], [], {"step": 1}, meta, tokenizer)
    found["lstm"] = root / "lstm-run"  # a run directory: its newest checkpoint is read
    resnet = build_model("resnet18-digits", seed=0)
    described = {"name": "resnet18-digits", "family": "resnet", "config": {}}
    found["resnet"] = save_exported(resnet, root / "resnet", described, "classification", 1)
    config = json.loads((found["resnet"] / "config.json").read_text())
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (found["resnet"] / "config.json").write_text(json.dumps({**config, "labels": names}))
    mlp = build_model("mlp", seed=0)  # the seed's regression net: 10 features -> 1
    described = {"name": "mlp", "family": "mlp", "config": {}}
    found["mlp"] = save_exported(mlp, root / "mlp", described, "regression", 1)
    return found


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["explain", *argv, "--progress", "false"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_size(path: Path) -> tuple[int, int]:
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG" and path.stat().st_size > 1000
    return image.size


def inches(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * DPI), round(size[1] * DPI)


def test_gpt_tokens_in_turn_equal_the_python_api(models, tmp_path, capsys) -> None:
    out = tmp_path / "gpt"
    args = ["--prompt", "def f(x):", "--max_tokens", "2", "--ig_steps", "16",
            "--methods", "ig,grad_x_input,occlusion", "--out", str(out)]  # fmt: skip
    code, stdout, err = run(capsys, str(models["gpt"]), *args)
    assert code == 0, err
    assert "report: " in stdout and "ig delta" in stdout
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["meta"]["family"] == "gpt" and doc["meta"]["command"].startswith("baobab explain")
    opened = open_model(models["gpt"])
    tokenizer = Tokenizer.load(opened.tokenizer_file)
    expected = explain(opened.model, tokenizer, prompt="def f(x):", max_tokens=2, ig_steps=16,
                       methods="ig,grad_x_input,occlusion")  # fmt: skip
    assert len(doc["steps"]) == 2 and doc["steps"][1]["context"][-1] == doc["steps"][0]["target"]
    for step, stored in zip(expected.steps, doc["steps"]):
        assert stored["target_ids"] == step.target_ids
        for attribution, kept in zip(step.attributions, stored["attributions"]):
            assert kept["method"] == attribution.method
            assert np.allclose(kept["scores"], attribution.scores, rtol=0, atol=1e-6)
    t = len(doc["steps"][-1]["context"])
    assert png_size(out / "attributions-ig.png") == inches(strip_inches(t, 2))
    cfg = opened.model.cfg
    assert png_size(out / "attention.png") == inches(attention_inches(cfg.n_layer, cfg.n_head))
    assert (out / "logit-lens.png").is_file() and (out / "report.html").is_file()


def test_the_progress_total_is_the_work_the_explanation_reports(models) -> None:
    """Exact for gradient x input and occlusion; an upper bound for integrated gradients,
    whose piecewise path may stop early where it is smooth (the bar then ends full)."""
    opened = open_model(models["gpt"])
    tokenizer = Tokenizer.load(opened.tokenizer_file)
    for methods in (["grad_x_input", "occlusion"], ["ig"]):
        for kwargs in ({"max_tokens": 3}, {"target": " yes"}, {"completion": "ab"}):
            done = []
            explain(opened.model, tokenizer, prompt="def f", methods=methods, ig_steps=8,
                    max_delta=10.0, progress=done.append, **kwargs)  # fmt: skip
            total = text_units(tokenizer, "gpt", "def f", kwargs.get("target"),
                              kwargs.get("completion"), kwargs.get("max_tokens", 0), methods, 8)  # fmt: skip
            if methods == ["ig"]:
                assert 0 < sum(done) <= total, kwargs
            else:
                assert sum(done) == total, kwargs


def test_progress_bar_ends_full(models, tmp_path, capsys) -> None:
    out = tmp_path / "bar"
    args = ["--prompt", "ab", "--ig_steps", "4", "--max_delta", "10", "--out", str(out),
            "--attention", "false"]  # fmt: skip
    assert main(["explain", str(models["gpt"]), *args]) == 0
    err = capsys.readouterr().err
    last = re.findall(r"(\d+)/(\d+)", err)[-1]
    assert last[0] == last[1] and "100%" in err
    assert not (out / "attention.png").exists()
    assert json.loads((out / "explanation.json").read_text())["attention"] is None


def test_bert_masked_token_and_lstm_run_directory_with_a_contrast(models, tmp_path, capsys):
    out = tmp_path / "bert"
    code, _, err = run(capsys, str(models["bert"]), "--prompt", "the <|mask|>at",
                       "--ig_steps", "16", "--out", str(out))  # fmt: skip
    assert code == 0, err
    step = json.loads((out / "explanation.json").read_text())["steps"][0]
    assert step["position"] == step["context"].index("<|mask|>")
    assert 'class="tok target"' in (out / "report.html").read_text()
    out = tmp_path / "lstm"
    code, stdout, err = run(capsys, str(models["lstm"]), "--prompt", "the cat", "--target", " #",
                            "--contrast", " ran", "--ig_steps", "16", "--out", str(out))  # fmt: skip
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    (step,) = doc["steps"]
    # " #" stays a text (an optional string flag would be read as YAML: a comment, None)
    assert step["target"] == " #" and step["contrast"] == " ran" and "rather than ' ran'" in stdout
    assert step["contrast_logprob"] < 0 and len(step["attributions"][0]["scores"]) == 7
    assert doc["attention"] is None and doc["logit_lens"] is None
    assert sorted(p.name for p in out.glob("*.png")) == ["attributions-ig.png"]


def test_resnet_from_an_npy_array_and_a_png(models, tmp_path, capsys) -> None:
    images = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)  # (N, H, W) grey
    np.save(tmp_path / "digits.npy", images)
    pixels = (images[0] * 255).astype(np.uint8)  # (8, 8): the PNG's grey levels
    Image.fromarray(pixels, "L").save(tmp_path / "digit.png")
    out = tmp_path / "resnet"
    code, _, err = run(capsys, str(models["resnet"]), "--inputs+", str(tmp_path / "digits.npy"),
                       "--inputs+", str(tmp_path / "digit.png"), "--methods", "ig",
                       "--ig_steps", "16", "--out", str(out))  # fmt: skip
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    assert len(doc["items"]) == 3 and np.asarray(doc["images"]).shape == (3, 1, 8, 8)
    assert np.allclose(doc["images"][2][0], pixels / 255, rtol=0, atol=1e-6)  # decoded as served
    assert np.allclose(doc["images"][:2], images[:, None], rtol=0, atol=0)
    assert all(item["label_name"] in doc["meta"]["label_names"] for item in doc["items"])
    panels = 2 + (doc["gradcam"] is not None)  # input, [Grad-CAM], ig
    for i in range(3):
        assert png_size(out / f"image-{i}.png") == inches(image_inches(panels))


def test_mlp_features_from_an_npy_array(models, tmp_path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 10)))
    out = tmp_path / "mlp"
    code, _, err = run(capsys, str(models["mlp"]), "--inputs+", str(tmp_path / "x.npy"),
                       "--methods", "ig,grad_x_input", "--out", str(out))  # fmt: skip
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["kind"] == "features" and [item["label"] for item in doc["items"]] == [None] * 3
    assert png_size(out / "features.png") == inches(feature_inches(3, 10))
    assert sorted(p.name for p in out.iterdir()) == [
        "explanation.json",
        "features.png",
        "report.html",
    ]


BAD = {
    "no prompt": (["--out", "{out}"], "needs --prompt"),
    "inputs for a gpt": (["--prompt", "a", "--inputs+", "x.npy", "--out", "{out}"], "--prompt"),
    "unknown method": (["--prompt", "a", "--methods", "ig,lime", "--out", "{out}"], "lime"),
    "zero ig steps": (["--prompt", "a", "--ig_steps", "0", "--out", "{out}"], "ig_steps"),
    "delta too large": (
        ["--prompt", "ab", "--ig_steps", "1", "--max_delta", "1e-12", "--out", "{out}"],
        "raise ig_steps",
    ),
    "out is the model": (["--prompt", "a", "--out", "{model}"], "--out"),
    "unknown device": (["--prompt", "a", "--explain.device", "tpu", "--out", "{out}"], "tpu"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_sentence(models, tmp_path, capsys, case: str) -> None:
    argv, words = BAD[case]
    argv = [a.format(out=tmp_path / "out", model=models["gpt"]) for a in argv]
    code, _, err = run(capsys, str(models["gpt"]), *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_of_an_image_model(models, tmp_path, capsys) -> None:
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 8, 8), np.float32))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for path, words in [("rgb.npy", "(N, 1, H, W)"), ("broken.png", "could not be decoded"),
                        ("missing.npy", "does not exist")]:  # fmt: skip
        code, _, err = run(capsys, str(models["resnet"]), "--inputs+", str(tmp_path / path),
                           "--out", str(tmp_path / "out"))  # fmt: skip
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run(capsys, str(models["resnet"]), "--prompt", "a", "--out", str(tmp_path / "o"))
    assert code == 2 and "--inputs" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_without_a_gpu_is_one_sentence(models, tmp_path, capsys) -> None:
    code, _, err = run(capsys, str(models["gpt"]), "--prompt", "a", "--explain.device", "cuda",
                       "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and err.strip() == (
        "error: explain.device is cuda but torch sees no CUDA GPU; use cpu."
    )


@pytest.mark.cuda
def test_explains_on_cuda_as_on_cpu(models, tmp_path, capsys) -> None:
    docs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        code, _, err = run(capsys, str(models["gpt"]), "--prompt", "def f", "--ig_steps", "16",
                           "--explain.device", device, "--out", str(out))  # fmt: skip
        assert code == 0, err
        docs.append(json.loads((out / "explanation.json").read_text()))
    cpu, cuda = (doc["steps"][0]["attributions"][0]["scores"] for doc in docs)
    assert np.allclose(cuda, cpu, rtol=0, atol=1e-3)
