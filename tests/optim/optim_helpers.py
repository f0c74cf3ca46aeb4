"""A tiny model with every parameter class: embedding, hidden and output matrices,
biases and norm weights."""

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, vocab: int = 10, dim: int = 8, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.emb(idx)))  # (B, dim) -> (B, hidden)
        return self.fc2(self.norm(x))  # (B, out)


def make_tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, 10, (6,), generator=g)
    target = torch.randn(6, 4, generator=g)
    device = next(model.parameters()).device
    return ((model(idx.to(device)) - target.to(device)) ** 2).mean()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, step).backward()
        optimizer.step()
