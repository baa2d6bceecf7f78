"""Updates per second against the number of workers, for each way yellowfin runs beyond one process.

    python benchmarks/distributed/throughput.py --out benchmarks/distributed/results.json

Modes (each a few seconds):
- ddp:       torchrun, N ranks (gloo), DistributedDataParallel + YellowFin; one update per step.
- zero:      the same with ZeroRedundancyOptimizer (zero_redundancy_yellowfin, YellowFin's shard_group).
- fsdp:      fully_shard + FullyShardedYellowFin (shard_group over the mesh's group).
- local_ps:  yellowfin.asynchrony.ParameterServer, N worker processes on this machine, closed loop.
- ray_ps:    yellowfin.distributed.ray_server.RayAsyncTrainer, N worker actors on a local Ray, closed loop.
- scalar_allreduce: the latency of the one all-reduce of 5 float64 scalars that shard_group adds per step.
The model is an MLP (784-256-256-10, 270k parameters, float32) on random data, batch 64 per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

BATCH = 64
SYNC_WARMUP, SYNC_STEPS = 10, 150
ASYNC_WARMUP, ASYNC_UPDATES = 30, 600
SCALAR_WARMUP, SCALAR_CALLS = 100, 2000


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def batches(worker_id: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(BATCH, 784, generator=generator), torch.randint(0, 10, (BATCH,), generator=generator)


# ------------------------------------------------------------------------------ synchronous (one rank)
def rank_main(mode: str, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from yellowfin import YellowFin
    from yellowfin.distributed import FullyShardedYellowFin, zero_redundancy_yellowfin

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "scalar_allreduce":
        # What shard_group adds to a step: one all-reduce of 5 float64 scalars (||g||^2, <gbar,g>, ||gbar||^2,
        # non-zero count, element count).
        scalars = torch.zeros(5, dtype=torch.float64)
        for call in range(SCALAR_WARMUP + SCALAR_CALLS):
            if call == SCALAR_WARMUP:
                dist.barrier()
                start = time.perf_counter()
            dist.all_reduce(scalars)
        seconds = time.perf_counter() - start
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"mode": mode, "workers": world, "calls": SCALAR_CALLS, "seconds": seconds,
                           "microseconds_per_call": 1e6 * seconds / SCALAR_CALLS}, f)
        dist.destroy_process_group()
        return
    model = make_model(0)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        trained, optimizer = model, FullyShardedYellowFin(model.parameters())
    else:
        trained = DistributedDataParallel(model)
        optimizer = (YellowFin(trained.parameters()) if mode == "ddp"
                     else zero_redundancy_yellowfin(trained.parameters()))
    data = batches(rank, 100 + rank)
    for step in range(SYNC_WARMUP + SYNC_STEPS):
        if step == SYNC_WARMUP:
            dist.barrier()
            start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(trained, next(data)).backward()
        optimizer.step()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"mode": mode, "workers": world, "updates": SYNC_STEPS, "seconds": seconds}, f)
    dist.destroy_process_group()


def run_sync(mode: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={workers}", __file__, "--rank-mode", mode, "--rank-out", out],
                       env=env, check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(out) as f:
            return json.load(f)


# ------------------------------------------------------------------------------ asynchronous
def run_local_ps(workers: int) -> dict:
    from yellowfin import YellowFin
    from yellowfin.asynchrony import ParameterServer

    torch.set_num_threads(1)
    model = make_model(0)
    server = ParameterServer(model, YellowFin(model.parameters()), loss_fn, batches, num_workers=workers,
                             closed_loop=True)
    with server:
        return timed_async_run(server, "local_ps", workers)


def run_ray_ps(workers: int, cpus: int) -> dict:
    from yellowfin.distributed.ray_server import RayAsyncTrainer

    # Fractional CPUs let more workers than cores be scheduled (on one machine they then share cores).
    with RayAsyncTrainer(make_model(0), loss_fn, batches, num_workers=workers, closed_loop=True,
                         worker_num_cpus=min(1.0, cpus / workers)) as trainer:
        return timed_async_run(trainer, "ray_ps", workers)


def timed_async_run(system, mode: str, workers: int) -> dict:
    """Warm ``system`` (a ParameterServer or RayAsyncTrainer) up, then time ASYNC_UPDATES updates."""
    system.run(ASYNC_WARMUP, timeout=120)
    start = time.perf_counter()
    report = system.run(ASYNC_UPDATES, timeout=300)
    seconds = time.perf_counter() - start
    return {"mode": mode, "workers": workers, "updates": ASYNC_UPDATES, "seconds": seconds,
            "mean_staleness": report["mean_staleness"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.json"))
    parser.add_argument("--modes", default="scalar_allreduce,ddp,zero,fsdp,local_ps,ray_ps")
    parser.add_argument("--sync-workers", default="1,2")
    parser.add_argument("--async-workers", default="1,2,4")
    parser.add_argument("--rank-mode", help=argparse.SUPPRESS)
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:
        rank_main(args.rank_mode, args.rank_out)
        return

    load_before = os.getloadavg()  # the machine is shared: record how busy it was
    modes = args.modes.split(",")
    results = []
    cpus = os.cpu_count() or 1
    for mode in modes:
        if mode == "scalar_allreduce":
            result = run_sync(mode, 2)
            print(f"{mode}: {result['microseconds_per_call']:.0f} us per call on 2 ranks", flush=True)
            results.append(result)
            continue
        counts = args.sync_workers if mode in ("ddp", "zero", "fsdp") else args.async_workers
        for workers in map(int, counts.split(",")):
            if mode in ("zero", "fsdp") and workers == 1:
                continue  # nothing to shard
            if mode == "ray_ps":
                import ray

                ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, configure_logging=False)
                try:
                    result = run_ray_ps(workers, cpus)
                finally:
                    ray.shutdown()
            elif mode == "local_ps":
                result = run_local_ps(workers)
            else:
                result = run_sync(mode, workers)
            result["updates_per_s"] = result["updates"] / result["seconds"]
            result["samples_per_s"] = result["updates_per_s"] * BATCH * (workers if mode in ("ddp", "zero", "fsdp")
                                                                         else 1)
            print(f"{mode:9s} workers={workers}  {result['updates_per_s']:8.1f} updates/s", flush=True)
            results.append(result)

    import importlib.metadata as metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    record = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "ray": version("ray"),
                          "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "model": "MLP 784-256-256-10 (269,322 parameters, float32), batch 64 per worker",
              "results": results}
    from yellowfin.files import atomic_write

    atomic_write(args.out, lambda f: json.dump(record, f, indent=1), text=True)


if __name__ == "__main__":
    main()
