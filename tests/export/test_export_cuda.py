"""Export and load on a CUDA GPU (skipped without one; ``benchmarks/gpu_check.sh`` runs
these): a model whose weights live on the GPU is checkpointed and exported, and the export
loads onto the GPU and the CPU with the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baobab.checkpoint import save_checkpoint
from baobab.data import byte_tokenizer
from baobab.export import export_checkpoint, load_exported
from baobab.models import build_model

pytestmark = pytest.mark.cuda


def cuda_trained_gpt() -> torch.nn.Module:
    """gpt-nano (byte vocabulary) after a few bf16-autocast AdamW steps on the GPU."""
    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=259, max_seq_len=64).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (4, 33), device="cuda")  # (B, T + 1)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])  # (B, T, V)
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def test_export_of_a_cuda_model_loads_on_cuda_and_cpu_alike(tmp_path):
    model = cuda_trained_gpt()
    tokenizer = byte_tokenizer().save(tmp_path / "tokenizer.json")
    meta = {"model": {"name": "gpt-nano", "family": "gpt",
                      "config": {"vocab_size": 259, "max_seq_len": 64}}, "objective": "causal_lm"}  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "run", 3, [model], [], {"step": 3}, meta, tokenizer)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        expected = model(ids.cuda())  # (B, T, V) float32

        on_gpu, _ = load_exported(export_checkpoint(ckpt, tmp_path / "fp32"), device="cuda")
        assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
        assert torch.equal(on_gpu(ids.cuda()), expected)  # same weights, same device, same bits

        on_cpu, _ = load_exported(tmp_path / "fp32")
        assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
        torch.testing.assert_close(on_cpu(ids), expected.cpu(), rtol=1e-4, atol=1e-4)

        bf16, _ = load_exported(
            export_checkpoint(ckpt, tmp_path / "bf16", dtype="bfloat16"), device="cuda"
        )
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(bf16(ids.cuda()).float(), expected, rtol=0.05, atol=0.05)
