"""The seed document's §4.2 Horovod program, written as a Horovod user would, completed with a
data loader; only the import line differs from ``import horovod.torch as hvd``.

Run: ``torchrun --standalone --nproc-per-node 2 seed_horovod_train.py OUT_DIR`` (or alone with
``python seed_horovod_train.py OUT_DIR``). Each rank saves its final parameters to
``OUT_DIR/rank{r}.pt``. Data and sizes are shared with the test's plain-torch reference.
"""

import sys
from pathlib import Path

import torch
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import baobab.horovod as hvd

SAMPLES, GLOBAL_BATCH, EPOCHS = 32, 16, 100


def synthetic_data() -> TensorDataset:
    """Fixed inputs (SAMPLES, 10) and a noisy linear target (SAMPLES, 1), equal on every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 10, generator=g)
    y = x @ torch.linspace(-1, 1, 10).unsqueeze(1) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return TensorDataset(x, y)


# 定义模型
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 5)
        self.fc2 = torch.nn.Linear(5, 1)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = self.fc2(x)
        return x


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])

    # 初始化Horovod
    hvd.init()

    # 分配GPU资源
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")

    # Each rank starts from different weights; broadcast_parameters makes them rank 0's.
    torch.manual_seed(1234 + hvd.rank())

    dataset = synthetic_data()
    sampler = DistributedSampler(dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    train_loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // hvd.size(), sampler=sampler)

    # 初始化模型和优化器
    model = Net().to(device)
    optimizer = optim.SGD(model.parameters(), lr=0.01)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    # 训练模型
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for data, target in train_loader:
            data = data.to(device)
            target = target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = torch.mean((output - target) ** 2)
            loss.backward()
            optimizer.step()

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / f"rank{hvd.rank()}.pt")
    hvd.shutdown()
