"""Fine-tuning from a model directory (fully or with LoRA), and knowledge distillation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_trainer import lm_args, losses

from baobab import data as bdata
from baobab.checkpoint import load_trained_model
from baobab.cli import main, parse_run_config
from baobab.export import export_checkpoint, export_hf
from baobab.train import run
from baobab.train.objectives import CausalLM, Distillation


@pytest.fixture(scope="module")
def base_run(tiny_corpus, tmp_path_factory) -> Path:
    """A briefly trained gpt-nano: the base model and teacher of these tests."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run(parse_run_config(lm_args(tiny_corpus, run_dir, "--train.max_steps", "8")))
    return run_dir


def finetune_args(corpus: Path, run_dir: Path, init: Path, *extra: str) -> list[str]:
    args = lm_args(corpus, run_dir, "--model.init", str(init), "--train.max_steps", "6", *extra)
    return ["finetune", *args[2:]]  # drop --model.name: the base decides the model


def test_lora_finetune_trains_only_the_adapters(base_run, tiny_corpus, tmp_path):
    out = tmp_path / "lora"
    assert main(finetune_args(tiny_corpus, out, base_run, "--lora.rank", "4",
                              "--lora.targets", "[wq,wv]")) == 0  # fmt: skip
    base, _ = load_trained_model(base_run)
    tuned, meta = load_trained_model(out)  # adapters merged into their base weights
    assert meta["lora"]["rank"] == 4 and meta["model"]["name"] == "gpt-nano"
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    assert base_sd.keys() == tuned_sd.keys()  # the plain model's keys: no adapter left
    for key, tensor in base_sd.items():
        adapted = key.endswith(("attention.wq.weight", "attention.wv.weight"))
        assert torch.equal(tensor, tuned_sd[key]) != adapted, key
    # The merged fine-tune exports like any checkpoint.
    export_checkpoint(out, tmp_path / "export")


def test_finetune_from_an_export_or_hf_dir_starts_from_the_same_weights(
    base_run, tiny_corpus, tmp_path
):
    export_checkpoint(base_run, tmp_path / "export")
    export_hf(base_run, tmp_path / "hf")
    runs = {}
    for source in ("export", "hf"):
        runs[source] = tmp_path / f"from-{source}"
        args = finetune_args(tiny_corpus, runs[source], tmp_path / source, "--lora.rank", "2")
        assert main(args) == 0
    from_ckpt = tmp_path / "from-checkpoint"
    assert main(finetune_args(tiny_corpus, from_ckpt, base_run, "--lora.rank", "2")) == 0
    # The HF round trip stores the same numbers, so all three runs are the same run.
    assert losses(runs["export"]) == losses(from_ckpt)
    assert losses(runs["hf"]) == pytest.approx(losses(from_ckpt), rel=1e-5)


def test_full_finetune_continues_from_the_base(base_run, tiny_corpus, tmp_path):
    out = tmp_path / "full"
    assert main(finetune_args(tiny_corpus, out, base_run)) == 0
    # Same seed, same first batch: the base run saw it at random init, the fine-tune at the
    # base's weights, which already learned something.
    assert losses(out)[1] < losses(base_run)[1]


def test_finetune_refusals(base_run, tiny_corpus, tmp_path, capsys):
    assert main(["finetune", *lm_args(tiny_corpus, tmp_path / "a", "--train.max_steps", "2")]) == 2
    assert "baobab finetune needs --model.init" in capsys.readouterr().err
    args = finetune_args(tiny_corpus, tmp_path / "b", tmp_path / "missing")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    args = finetune_args(tiny_corpus, tmp_path / "c", base_run, "--lora.targets", "[nope]")
    assert main(args) == 2
    assert "matches no nn.Linear" in capsys.readouterr().err
    # Data encoded with another tokenizer than the base model's is refused.
    files = [str(p) for p in bdata.stdlib_files()[:10]]
    bpe = tmp_path / "bpe"
    bdata.prepare(bdata.PrepareConfig(inputs=files, out=str(bpe), vocab_size=300, workers=1,
                                      val_fraction=0.3, progress=False))  # fmt: skip
    assert main(finetune_args(bpe, tmp_path / "d", base_run)) == 2
    assert "another tokenizer than the base model's" in capsys.readouterr().err
    args = lm_args(tiny_corpus, tmp_path / "e", "--train.max_steps", "2")
    assert main(["train", *args, "--train.precision", "bf16-params"]) == 2
    assert "bf16-params needs FSDP" in capsys.readouterr().err


def test_distillation_loss_is_the_tempered_kl_plus_the_label_loss():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(5, 7)
    student = torch.nn.Linear(5, 7)
    x, y = torch.randn(3, 4, 5), torch.randint(0, 7, (3, 4))
    objective = Distillation(CausalLM(), teacher, temperature=2.0, alpha=0.3)
    batch = objective.prepare(x, y)
    loss, _ = objective.loss(student, batch)
    s, t = student(x) / 2.0, teacher(x) / 2.0
    p_t = t.softmax(-1)
    kl = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()  # per token, then mean
    hard = F.cross_entropy(student(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, 0.3 * 4.0 * kl + 0.7 * hard)
    assert objective.for_evaluation().name == "causal_lm"


def test_distillation_recipe_learns_from_the_teacher(base_run, tiny_corpus, tmp_path):
    no_soft, student = tmp_path / "alpha0", tmp_path / "student"
    teacher = ("--distill.teacher", str(base_run))
    # alpha 0 leaves only the label loss: exactly the plain run (the teacher's own).
    args = lm_args(tiny_corpus, no_soft, "--train.max_steps", "8", *teacher, "--distill.alpha", "0")
    run(parse_run_config(args))
    assert losses(no_soft) == losses(base_run)
    steps = ("--train.max_steps", "3")
    # A student that starts as the teacher has nothing to learn from it at first.
    args = lm_args(tiny_corpus, student, *steps, *teacher, "--distill.alpha", "1")
    result = run(parse_run_config([*args, "--model.init", str(base_run)]))
    assert result.losses[0] == pytest.approx(0.0, abs=1e-6)
    assert "val_ppl" in result.val  # evaluation reports the plain label loss


def test_distill_recipe_validates():
    cfg = parse_run_config(["--recipe", "distill"])
    assert cfg.distill.teacher == "runs/quickstart" and cfg.model.name == "gpt-nano"
    cfg = parse_run_config(["--recipe", "lora"])
    assert cfg.lora.rank == 8 and cfg.model.init == "runs/quickstart"
