"""YellowFin beyond one machine (docs/distributed.md).

- Data parallel (DistributedDataParallel): use ``YellowFin`` as is. Every rank steps on the same
  all-reduced gradient, so every rank measures the same statistics and tunes the same mu and alpha.
- Sharded optimizer state: :func:`zero_redundancy_yellowfin` (ZeroRedundancyOptimizer) and
  :class:`FullyShardedYellowFin` (FSDP2 ``fully_shard``) sum the tuner's scalars over the shards.
- Asynchronous training on Ray: :class:`yellowfin.distributed.ray_server.RayAsyncTrainer` (needs the
  ``ray`` extra; imported on demand so that this package does not need Ray).
"""

from .sharding import FullyShardedYellowFin, zero_redundancy_yellowfin

__all__ = ["FullyShardedYellowFin", "zero_redundancy_yellowfin"]
