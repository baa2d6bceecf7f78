"""Training runs on 2 ranks (gloo, loopback) and their single-process references.

Run under torchrun by test_sync.py: ``torchrun --standalone --nproc_per_node=2 distributed_scenarios.py
OUT_DIR SCENARIO...``. Each scenario writes ``OUT_DIR/SCENARIO_rank{r}.pt`` with the final parameters, the
tuner's stats and how many all-reduces each optimizer step made (or the error it raised).
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import torch
from torch import nn

from yellowfin import YellowFin

WORLD_SIZE = 2
STEPS = 30
BATCH = 16  # combined batch; each rank takes BATCH // WORLD_SIZE rows


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()


class EmbeddingRegressor(nn.Module):
    """Dense-gradient embedding: most rows get zero gradient, so the non-zero count matters."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(40, 4).double()
        self.head = nn.Linear(4, 1).double()

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(dim=1))


class WithUnusedParameter(nn.Module):
    """A small used layer and a larger parameter that gets no gradient: ZeRO puts the large one alone
    on one rank, whose optimizer then has nothing to step but must still enter the all-reduce."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(6, 1).double()
        self.unused = nn.Parameter(torch.randn(50, dtype=torch.float64))

    def forward(self, x):
        return self.layer(x)


def regression_batch(step: int, rank: int | None = None):
    """The combined batch of ``step`` (rank None) or this rank's half of it."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=generator, dtype=torch.float64)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(BATCH, 1, generator=generator, dtype=torch.float64)
    if rank is not None:
        rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        x, y = x[rows], y[rows]
    return x, y


def token_batch(step: int, rank: int | None = None):
    generator = torch.Generator().manual_seed(2000 + step)
    tokens = torch.randint(0, 10, (BATCH, 3), generator=generator)  # only 10 of 40 rows ever used
    y = tokens.double().mean(dim=1, keepdim=True) / 10.0
    if rank is not None:
        rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        tokens, y = tokens[rows], y[rows]
    return tokens, y


def mse(model, batch):
    inputs, target = batch
    return ((model(inputs) - target) ** 2).mean()


# The single-process reference of each scenario: model, batches, YellowFin options. The first five run the
# authors' tuner (named: the default is the scale-free one, which the scenarios after them run).
SETUPS = {
    "ddp": (make_mlp, regression_batch, {"tuner": "reference"}),
    "zero": (EmbeddingRegressor, token_batch, {"tuner": "reference", "sparsity_correction": True}),
    "zero_idle_shard": (WithUnusedParameter, regression_batch, {"tuner": "reference"}),
    "fsdp": (make_mlp, regression_batch, {"tuner": "reference"}),
    "zero_per_group": (make_mlp, regression_batch, {"tuner": "reference", "per_group_tuning": True}),
    # The scale-free tuner's extra sums (x, x_0, v) are sums over shards like the others.
    "zero_scale_free": (make_mlp, regression_batch, {"tuner": "scale_free"}),
    "fsdp_scale_free": (make_mlp, regression_batch, {"tuner": "scale_free"}),
    # The preconditioned tuner's metric eps is relative to the whole scope's metric, so sharding cannot move it
    # (in heavy ball; its default, the primal-average form, below).
    "zero_adam": (make_mlp, regression_batch, {"tuner": "scale_free", "precondition": "adam",
                                               "momentum_form": "heavy_ball"}),
    "fsdp_adam": (make_mlp, regression_batch, {"tuner": "scale_free", "precondition": "adam",
                                               "momentum_form": "heavy_ball"}),
    # ... and in its compiled flavour, whose kernels reduce each shard's tensors as the others do.
    "zero_adam_fused": (make_mlp, regression_batch, {"tuner": "scale_free", "precondition": "adam", "fused": True,
                                                     "momentum_form": "heavy_ball"}),
    # The iterate average is elementwise: each shard averages its own elements.
    "zero_average": (make_mlp, regression_batch, {"tuner": "scale_free", "average": True}),
    "fsdp_average": (make_mlp, regression_batch, {"tuner": "scale_free", "average": True}),
    # The primal-average form's update is elementwise too, and its distance a sum over shards.
    "zero_primal_average": (make_mlp, regression_batch, {"tuner": "scale_free", "momentum_form": "primal_average"}),
    "fsdp_primal_average": (make_mlp, regression_batch, {"tuner": "scale_free", "momentum_form": "primal_average"}),
    # ... in Adam's metric too, whose signal <g, z - xbar> is a sum over shards as well.
    "zero_adam_primal_average": (make_mlp, regression_batch, {"tuner": "scale_free", "precondition": "adam",
                                                              "momentum_form": "primal_average"}),
    "fsdp_adam_primal_average": (make_mlp, regression_batch, {"tuner": "scale_free", "precondition": "adam",
                                                              "momentum_form": "primal_average"}),
}


def hands_out_an_average(options: dict) -> bool:
    return bool(options.get("average")) or options.get("momentum_form") == "primal_average"


def param_groups(parameters, scenario: str):
    """Weights and biases as two tuned groups for the per-group scenario, else one group."""
    parameters = list(parameters)
    if not scenario.endswith("per_group"):
        return parameters
    return [{"params": [p for p in parameters if p.dim() > 1]}, {"params": [p for p in parameters if p.dim() <= 1]}]


def reference_run(scenario: str) -> dict:
    """One process stepping YellowFin on the combined batch."""
    model_fn, batch_fn, options = SETUPS[scenario]
    model = model_fn(0)
    optimizer = YellowFin(param_groups(model.parameters(), scenario), **options)
    for step in range(STEPS):
        optimizer.zero_grad()
        mse(model, batch_fn(step)).backward()
        optimizer.step()
    averaged = {}
    if hands_out_an_average(options):
        with optimizer.averaged():
            averaged = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "stats": optimizer.stats(), "averaged": averaged}


# ------------------------------------------------------------------------------------------ ranks
class AllReduceCounter:
    """Counts torch.distributed.all_reduce calls while active."""

    def __init__(self):
        self.calls = 0
        self._original = None

    def __enter__(self):
        import torch.distributed as dist

        self._original = dist.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_reduce = self._original


def _train(model, optimizer, batch_fn, rank: int, local_half: bool) -> list[int]:
    calls_per_step = []
    for step in range(STEPS):
        optimizer.zero_grad()
        mse(model, batch_fn(step, rank if local_half else None)).backward()
        with AllReduceCounter() as counter:
            optimizer.step()
        calls_per_step.append(counter.calls)
    return calls_per_step


def _stats(optimizer):
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps the local YellowFin
    return inner.stats()


def run_scenario(scenario: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from yellowfin.distributed import FullyShardedYellowFin, zero_redundancy_yellowfin

    if scenario == "refusals":
        return {"errors": _refusals()}
    model_fn, batch_fn, options = SETUPS[scenario]
    model = model_fn(0)
    extra = {}
    if scenario == "ddp":
        ddp = DistributedDataParallel(model)
        optimizer = YellowFin(ddp.parameters(), **options)
        calls = _train(ddp, optimizer, batch_fn, rank, local_half=True)
    elif scenario in ("zero", "zero_per_group", "zero_scale_free", "zero_adam", "zero_adam_fused", "zero_average",
                      "zero_primal_average", "zero_adam_primal_average"):
        ddp = DistributedDataParallel(model)
        optimizer = zero_redundancy_yellowfin(param_groups(ddp.parameters(), scenario), **options)
        calls = _train(ddp, optimizer, batch_fn, rank, local_half=True)
        # Per-rank saving: the local YellowFin's state dict carries the tuner (ZeRO's consolidated one does not).
        extra["local_numel"] = sum(p.numel() for g in optimizer.optim.param_groups for p in g["params"])
        reloaded = zero_redundancy_yellowfin(param_groups(ddp.parameters(), scenario), **options)
        reloaded.optim.load_state_dict(optimizer.optim.state_dict())
        extra["reloaded_stats"] = reloaded.optim.stats()
        if hands_out_an_average(options):  # each rank averages the parameters it owns
            with optimizer.optim.averaged():
                extra["averaged"] = {name.replace("module.", ""): p.detach().clone()
                                     for name, p in ddp.named_parameters() if optimizer.optim.state[p]}
    elif scenario == "zero_idle_shard":
        # No DDP: every rank computes the combined batch's gradient itself.
        optimizer = zero_redundancy_yellowfin(model.parameters(), **options)
        extra["local_params_with_grad"] = None
        calls = _train(model, optimizer, batch_fn, rank, local_half=False)
        extra["local_params_with_grad"] = sum(
            p.grad is not None for g in optimizer.optim.param_groups for p in g["params"])
    elif scenario in ("fsdp", "fsdp_scale_free", "fsdp_adam", "fsdp_average", "fsdp_primal_average",
                      "fsdp_adam_primal_average"):
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        optimizer = FullyShardedYellowFin(model.parameters(), **options)
        calls = _train(model, optimizer, batch_fn, rank, local_half=True)
        extra["local_numel"] = sum(local.numel() for _, local in optimizer._sharded)
        reloaded = FullyShardedYellowFin(model.parameters(), **options)
        reloaded.load_state_dict(optimizer.state_dict())
        extra["reloaded_stats"] = reloaded.stats()
        if hands_out_an_average(options):  # the local shards' averages land in FSDP's storage: the gather sees them
            with optimizer.averaged():
                extra["averaged"] = dict(_gathered_copy(model).named_parameters())
        model = _gathered_copy(model)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    params = {name.replace("module.", ""): p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "stats": _stats(optimizer), "all_reduce_calls": calls, **extra}


def _refusals() -> dict:
    """The sharded layouts that must raise rather than tune on a shard's statistics (DTensors need a
    process group, so these run on the ranks): {case: the ValueError's message, or None if none}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from yellowfin.distributed import FullyShardedYellowFin, zero_redundancy_yellowfin

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    replicated = nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Replicate()]))
    sharded = nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Shard(0)]))
    cases = {
        "fsdp_replicated": lambda: FullyShardedYellowFin([replicated]),
        "fsdp_mixed_plain": lambda: FullyShardedYellowFin([sharded, nn.Parameter(torch.ones(3))]),
        "zero_over_dtensor": lambda: zero_redundancy_yellowfin([sharded]),
    }
    errors = {}
    for case, make in cases.items():
        try:
            make()
            errors[case] = None
        except ValueError as error:
            errors[case] = str(error)
    return errors


def _gathered_copy(model):
    """Full (unsharded) parameters of an FSDP2 model, as a plain module."""
    full = make_mlp(0)
    with torch.no_grad():
        for (name, p), target in zip(model.named_parameters(), full.parameters()):
            target.copy_(p.full_tensor())
    return full


def main(out_dir: str, scenarios: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        for scenario in scenarios:
            try:
                result = run_scenario(scenario, rank)
            except Exception as error:  # recorded for the test to show; the ranks stay in step
                result = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
            torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
