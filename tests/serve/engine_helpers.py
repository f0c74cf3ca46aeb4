"""Helpers for the engine tests: tiny gpt models (random or scripted), exported with
baobab's own checkpoint + export functions, and an engine loop that collects outputs.

The *scripted* model is a GPT-2-variant gpt whose blocks are zeroed so its logits depend on
the position only: position p predicts ``script[p]``. With the byte tokenizer (id == byte)
it emits a known text, multi-byte characters and stop strings included, with no training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from baobab.data import byte_tokenizer
from baobab.models import build_model

BYTE_VOCAB = 259  # 256 bytes + 3 special tokens
LLAMA = {}
GPT2 = {"norm": "layernorm", "mlp": "gelu", "position": "learned", "bias": True}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP barrier stalls
    (imported by each engine test module, where it applies to every test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_gpt(seed: int = 0, scale: float = 0.3, **overrides) -> torch.nn.Module:
    """gpt-nano with random weights spread wide enough that greedy argmaxes are decisive."""
    torch.manual_seed(seed)
    model = build_model("gpt-nano", **{"vocab_size": BYTE_VOCAB, "max_seq_len": 128, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def scripted_gpt(script: list[int], max_seq_len: int = 128, filler: int = ord(".")):
    """A gpt whose logits at position p peak (by ~20) at ``script[p]`` (``filler`` past it)."""
    targets = [script[p] if p < len(script) else filler for p in range(max_seq_len)]
    model = build_model(
        "gpt-nano",
        vocab_size=BYTE_VOCAB,
        max_seq_len=max_seq_len,
        n_layer=1,
        d_model=max_seq_len,
        n_head=2,
        n_kv_head=2,
        tie_embeddings=False,
        **GPT2,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.layers["0"].attention_norm, model.layers["0"].ffn_norm, model.norm):
            norm.weight.fill_(1.0)
        model.pos_embeddings.weight.copy_(torch.eye(max_seq_len))  # position p -> e_p
        for p, t in enumerate(targets):
            model.output.weight[t, p] = 2.0  # layernorm(e_p) is ~sqrt(C) at p, ~0 elsewhere
    return model.eval()


def export_gpt(root: Path, model: torch.nn.Module) -> Path:
    """Checkpoint and ``baobab export`` a gpt-nano-derived ``model`` with the byte tokenizer."""
    from baobab.checkpoint import save_checkpoint
    from baobab.export import export_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_tokenizer().save(root / "tokenizer.json")
    config = {k: v for k, v in dataclasses.asdict(model.cfg).items()}
    meta = {"model": {"name": "gpt-nano", "family": "gpt", "config": config}}
    ckpt = save_checkpoint(root / "run", 1, [model], [], {"step": 1}, meta, tokenizer)
    return export_checkpoint(ckpt, root / "export")


def run_to_completion(engine, max_steps: int = 10_000) -> dict[str, list]:
    """Step ``engine`` until idle; {request_id: [RequestOutput, ...]}."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def tokens_of(outputs: list) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def text_of(outputs: list) -> str:
    return "".join(o.text for o in outputs)
