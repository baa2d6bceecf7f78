import torch

torch.set_num_threads(1)  # two cores are shared with the other tests in CI: keep runs reproducible
