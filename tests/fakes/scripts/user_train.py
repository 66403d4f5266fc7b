"""A user's own training script: its own process group, DDP and optimizer. LEAK=graph|numpy|none.

LOADER=1: each step first takes an (index) batch from a torch DataLoader, whose dataset sleeps
SLOW_S seconds per item on rank SLOW_DATA_RANK (a starved loader on one rank)."""

import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

leak = os.environ.get("LEAK", "none")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
distributed = "RANK" in os.environ
cuda = os.environ.get("DEVICE") == "cuda"
device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
if cuda:
    torch.cuda.set_device(device)
if distributed:
    dist.init_process_group("nccl" if cuda else "gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 100)).to(device)
if distributed:
    model = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 64, device=device), torch.randint(0, 100, (64,), device=device)  # a fixed batch
history = []


class Indices(torch.utils.data.Dataset):
    def __init__(self, pause: float):
        self.pause = pause

    def __len__(self) -> int:
        return steps

    def __getitem__(self, i: int) -> int:
        time.sleep(self.pause)
        return i


slow = os.environ.get("RANK", "0") == os.environ.get("SLOW_DATA_RANK")
pause = float(os.environ.get("SLOW_S", "0")) if slow else 0.0
batches = iter(torch.utils.data.DataLoader(Indices(pause))) if os.environ.get("LOADER") else None
for step in range(steps):
    if batches is not None:
        next(batches)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if leak == "graph":
        history.append(out)  # the bug: the output is kept with its autograd graph
    elif leak == "numpy":
        history.append(np.ones(4096))  # 32 KiB of host memory outside torch, every step
    elif leak == "once" and step == steps // 2:
        history.append(torch.ones(2**22, device=device))  # one 16 MiB buffer, then flat
if distributed:
    dist.destroy_process_group()
print("done", steps, "steps")
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
