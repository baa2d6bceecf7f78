"""A model whose gradient (4 MB) is far larger than a pipe's or a socket's buffer, with its batches: the
asynchrony and Ray tests use it to check that a worker blocked on sending a large gradient still exits."""

import torch
from torch import nn

WIDE = 1024


def make_wide_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(WIDE, WIDE)


def wide_batches(worker_id: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(4, WIDE, generator=generator)
        yield x, x.flip(1)
