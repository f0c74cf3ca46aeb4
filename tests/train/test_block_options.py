"""Activation checkpointing and per-block compile change speed and memory, not numbers:
20 steps' losses within ``LOSS_RTOL`` (1e-5) of eager. Recomputation repeats the same
kernels (measured: bit-identical losses); compiled kernels fuse and reorder float32 sums like
another CPU's kernels (measured: at most 2.1e-7 relative, under AVX512, AVX2 or default ATen)."""

from __future__ import annotations

import pytest
from numerics import assert_losses_close

from baobab.cli import parse_run_config
from baobab.parallel import BlockOptions
from baobab.train import run


def losses_with(corpus, run_dir, *flags: str) -> list[float]:
    args = [
        "--model.name", "gpt-nano", "--model.overrides.n_layer", "4", "--data.path", str(corpus),
        "--data.seq_len", "32", "--data.batch_size", "4", "--optim.lr", "0.003", "--schedule.warmup_steps", "2",
        "--train.max_steps", "20", "--train.progress", "false", "--train.run_dir", str(run_dir), *flags,
    ]  # fmt: skip
    return run(parse_run_config(args)).losses


@pytest.fixture(scope="module")
def eager(tiny_corpus, tmp_path_factory):
    return losses_with(tiny_corpus, tmp_path_factory.mktemp("eager"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--blocks.activation_checkpointing", "full"],
        ["--blocks.activation_checkpointing", "selective", "--blocks.ac_every", "2"],
        ["--blocks.compile", "true", "--blocks.activation_checkpointing", "selective"],
        ["--blocks.compile_model", "true"],
    ],
    ids=["full-ac", "selective-ac", "compile+ac", "compile-model"],
)
def test_same_losses_as_eager(eager, tiny_corpus, tmp_path, flags):
    got = losses_with(tiny_corpus, tmp_path, *flags)
    assert_losses_close(got, eager)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown activation_checkpointing 'some'; choose one of"):
        BlockOptions(activation_checkpointing="some")
    with pytest.raises(ValueError, match="ac_every must be at least 1"):
        BlockOptions(ac_every=0)
    with pytest.raises(ValueError, match="set blocks.compile or blocks.compile_model, not both"):
        BlockOptions(compile=True, compile_model=True)


def test_options_reach_the_selected_blocks():
    from torch.distributed._composable.contract import _get_registry

    from baobab.models import build_model
    from baobab.parallel import apply_block_options

    model = build_model("gpt-nano", n_layer=4)
    apply_block_options(
        model, BlockOptions(activation_checkpointing="selective", ac_every=2, compile=True)
    )
    checkpointed = ["checkpoint" in (_get_registry(block) or {}) for block in model.layers.values()]
    assert checkpointed == [True, False, True, False]
    assert all(block._compiled_call_impl is not None for block in model.layers.values())
    names = [name for name, _ in build_model("gpt-nano", n_layer=4).named_parameters()]
    assert [name for name, _ in model.named_parameters()] == names  # nothing renamed
