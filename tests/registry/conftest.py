"""Tiny exports to push: a Llama-style and a GPT-2-style gpt (Hugging Face snapshots) and an
mlp (carried as a baobab export), each with its model for logits comparisons."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from baobab.data import byte_tokenizer
from baobab.export import save_exported
from baobab.models import build_model

TINY = dict(vocab_size=259, n_layer=2, n_head=4, d_model=32, ffn_hidden=48, max_seq_len=32)
GPT2_VARIANT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, n_kv_head=4)


def make_export(path: Path, seed: int = 0, **overrides) -> tuple[torch.nn.Module, Path]:
    """A perturbed tiny gpt (every tensor away from its init) saved as an export with the
    byte tokenizer."""
    torch.manual_seed(seed)
    model = build_model("gpt", **{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    tok = path.parent / f"{path.name}-tokenizer.json"
    byte_tokenizer().save(tok)
    described = {"name": "gpt", "family": "gpt", "config": dataclasses.asdict(model.cfg)}
    save_exported(model, path, described, "causal_lm", step=7, tokenizer_file=tok)
    return model, path


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    root = tmp_path_factory.mktemp("exports")
    mlp = build_model("mlp")
    described = {"name": "mlp", "family": "mlp", "config": dataclasses.asdict(mlp.cfg)}
    save_exported(mlp, root / "mlp", described, None)
    return {
        "llama": make_export(root / "llama", 0),
        "finetune": make_export(root / "finetune", 1),  # same tokenizer, other weights
        "gpt2": make_export(root / "gpt2", 2, **GPT2_VARIANT),
        "mlp": (mlp, root / "mlp"),
    }
