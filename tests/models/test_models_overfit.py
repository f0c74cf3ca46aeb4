"""Each family overfits a fixed random batch with a few Adam steps on CPU."""

import pytest
import torch
import torch.nn.functional as F

from baobab.models import build_model, task_of

V = 32
CASES = {
    "gpt": dict(
        vocab_size=V, n_layer=1, n_head=2, n_kv_head=1, d_model=16, ffn_hidden=32, max_seq_len=8
    ),
    "bert": dict(vocab_size=V, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, max_seq_len=8),
    "lstm": dict(vocab_size=V, d_embed=16, d_hidden=16, n_layer=1, max_seq_len=8),
    "resnet": dict(depth=18, num_classes=4, in_channels=1, small_input=True, width=4, image_size=8),
    "mlp": dict(),
    "mlp-digits": dict(in_features=8, hidden=(16,), out_features=4),
}


def batch(name: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    if task in ("causal_lm", "masked_lm"):
        return torch.randint(0, V, (4, 8)), torch.randint(0, V, (4, 8))
    if name == "resnet":
        return torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    if task == "classification":
        return torch.randn(8, 8), torch.randint(0, 4, (8,))
    return torch.randn(8, 10), torch.randn(8, 1)


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_falls(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, **CASES[name])
    task = task_of(model.cfg)
    x, y = batch(name, task)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = loss_fn(task, model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
