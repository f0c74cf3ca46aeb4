"""The seed's Horovod program, import line swapped to baobab.horovod, trains like plain torch.

Under ``torchrun --nproc-per-node 2`` each rank sees half of every global batch
(DistributedSampler, no shuffle: rank 0 and rank 1 shards together are the global batch),
and the averaged gradient of two equal shards is the full-batch gradient; so both ranks must
end with the parameters of one plain-torch process over the full batches. Run alone, the
same script is a size-1 job and must match too. Within ``sgd_tolerance`` (tests/numerics.py):
plain SGD adds no more than rounding to rounding, 2 ulps of the parameters' scale a step;
the two ranks run other kernels than the reference, as on another CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hvd_launch import alone, torchrun  # tests/horovod is on sys.path (pytest's rootdir import)
from numerics import assert_tensors_close, sgd_tolerance
from seed_horovod_train import EPOCHS, GLOBAL_BATCH, SAMPLES, Net, synthetic_data
from torch.utils.data import DataLoader


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """The seed's §4.1 loop in plain torch, one process, full global batches, rank 0's init."""
    torch.manual_seed(1234)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_loader = DataLoader(synthetic_data(), batch_size=GLOBAL_BATCH, shuffle=False)
    for _ in range(EPOCHS):
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = torch.mean((model(data) - target) ** 2)
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_matches(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    steps = EPOCHS * (SAMPLES // GLOBAL_BATCH)
    scale = max(t.abs().max().item() for t in reference.values())
    assert_tensors_close(got, reference, sgd_tolerance(steps, scale), "parameters")


def test_two_ranks_match_single_process_full_batch(tmp_path, reference):
    torchrun("seed_horovod_train.py", str(tmp_path), kernels="default")
    ranks = [_load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in reference:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    _assert_matches(ranks[0], reference)


def test_same_script_runs_alone_as_size_one(tmp_path, reference):
    alone("seed_horovod_train.py", str(tmp_path))
    _assert_matches(_load(tmp_path / "rank0.pt"), reference)
