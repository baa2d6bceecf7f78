"""YellowFin over sharded optimizer state: ZeroRedundancyOptimizer and FSDP2 (``fully_shard``).

YellowFin tunes on global scalars of the gradient (||g||^2, ||gbar||^2, the non-zero count). When each
rank holds only a shard of the parameters, a rank's sums cover only its shard; tuning on them would give
every rank a different mu and alpha. The optimizer's ``shard_group`` option sums those scalars over the
group with one all-reduce per step (every rank enters it, with or without gradients), so every rank tunes
on the whole gradient. The helpers here wire that option up and refuse layouts where the sum over ranks
would not be the sum over the model.

    opt = zero_redundancy_yellowfin(ddp_model.parameters())         # ZeRO-1 over DDP
    opt = FullyShardedYellowFin(fsdp_model.parameters())             # FSDP2: params are DTensors
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ..optimizer import YellowFin, is_dtensor

try:  # DTensor moved under torch.distributed.tensor in 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor, Shard = None, None


def _param_groups(params: Iterable) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if isinstance(params[0], dict):
        return [dict(group, params=list(group["params"])) for group in params]
    return [{"params": params}]


def zero_redundancy_yellowfin(params: Iterable, process_group=None, **options):
    """``ZeroRedundancyOptimizer`` whose local optimizers are YellowFin tuned on the whole gradient.

    Each rank steps YellowFin on its partition of the parameters; ``shard_group`` (the same group ZeRO
    partitions over) makes the tuner's scalars global. ``options`` go to YellowFin, except ZeRO's own
    ``parameters_as_bucket_view``. Saving: ZeRO's consolidated ``state_dict()`` keeps only the
    per-parameter buffers and drops the tuner, so save ``optimizer.optim.state_dict()`` on every rank.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if options.pop("overlap_with_ddp", False):
        raise ValueError("overlap_with_ddp=True needs a functional optimizer; YellowFin is not one. "
                         "Call optimizer.step() after backward instead.")
    if "shard_group" in options:
        raise ValueError("shard_group is set from process_group (ZeRO partitions over that group)")
    group = process_group if process_group is not None else dist.group.WORLD
    groups = _param_groups(params)
    for param_group in groups:
        for p in param_group["params"]:
            if is_dtensor(p):
                raise ValueError("ZeroRedundancyOptimizer over DTensor parameters (FSDP2) shards them twice; "
                                 "use FullyShardedYellowFin for fully_shard models")
    bucket_view = options.pop("parameters_as_bucket_view", False)
    # The group is bound into the constructor rather than passed as a ZeRO keyword: ZeRO copies its
    # keywords into every parameter group, and a ProcessGroup there reaches YellowFin's group
    # validation and ZeRO's (pickled) state_dict.
    # per_group_tuning is an option of the optimizer, not of a parameter group: bound the same way.
    optimizer_options = {name: options.pop(name) for name in ("per_group_tuning",) if name in options}
    local_yellowfin = functools.partial(YellowFin, shard_group=group, **optimizer_options)
    return ZeroRedundancyOptimizer(groups, optimizer_class=local_yellowfin, process_group=group,
                                   parameters_as_bucket_view=bucket_view, **options)


class FullyShardedYellowFin(YellowFin):
    """YellowFin for FSDP2 models (``fully_shard``), whose parameters are DTensors sharded on dim 0.

    The optimizer steps each rank's local shards as plain tensors (``DTensor.to_local()`` views, so
    updates land in FSDP's sharded storage) and sums its scalars over the mesh's process group.
    Every parameter must be sharded (``Shard`` on a one-dimensional mesh, the same mesh for all): a
    replicated parameter, or a plain tensor that every rank holds in full, would be counted once per
    rank, so those raise ``ValueError``. HSDP (a 2-D mesh with ``Replicate``) is not supported.

    ``state_dict()`` holds this rank's shards of the buffers and the (identical) tuner; save and load
    it per rank with the same world size.
    """

    def __init__(self, params: Iterable, **options):
        if DTensor is None:  # pragma: no cover - older torch
            raise RuntimeError("FullyShardedYellowFin needs torch.distributed.tensor (torch >= 2.4)")
        if "shard_group" in options:
            raise ValueError("shard_group is taken from the parameters' device mesh")
        groups = _param_groups(params)
        mesh = None
        self._sharded: list[tuple[Tensor, Tensor]] = []  # (DTensor parameter, its local view)
        local_groups = []
        for index, group in enumerate(groups):
            local_params = []
            for p in group["params"]:
                mesh = _check_sharded(p, mesh, index)
                with torch.no_grad():
                    local = p.to_local()
                self._sharded.append((p, local))
                local_params.append(local)
            local_groups.append(dict(group, params=local_params))
        super().__init__(local_groups, shard_group=mesh.get_group(), **options)

    def _before_passes(self) -> None:
        """Point each local view at the current shard and hand it the shard of the gradient.

        FSDP2 may re-create a parameter's local tensor (lazy init, ``to_empty``, loading); rebinding
        ``.data`` keeps the optimizer's state keyed by the same tensor object."""
        with torch.no_grad():
            for p, local in self._sharded:
                shard = p.to_local()
                if shard.data_ptr() != local.data_ptr() or shard.shape != local.shape:
                    local.data = shard
                local.grad = None if p.grad is None else p.grad.to_local()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # FSDP2 accumulates into the DTensor's .grad, so that is the one to clear.
        for p, local in self._sharded:
            local.grad = None
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


def _check_sharded(p: Tensor, mesh, group_index: int):
    if not is_dtensor(p):
        raise ValueError(
            f"a parameter in group {group_index} (shape {tuple(p.shape)}) is a plain tensor, not a DTensor "
            "from fully_shard: every rank holds it whole, so summing statistics over ranks would count it once "
            "per rank. Apply fully_shard to the module that owns it (fully_shard(model) covers the rest).")
    if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
        raise ValueError(
            f"a parameter in group {group_index} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh; "
            "FullyShardedYellowFin needs Shard placements on a 1-D mesh (replicas would be counted once per "
            "replica, e.g. HSDP)")
    if mesh is not None and p.device_mesh != mesh:
        raise ValueError("parameters live on different device meshes; one optimizer must tune over one mesh")
    return p.device_mesh
