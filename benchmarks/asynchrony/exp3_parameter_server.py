"""Experiment 3: the real parameter server with 4 and 8 worker processes on this machine.

Closed-loop YellowFin on the char-LSTM task: the measured staleness distribution of the gradients the server
applied, and the controller tracking its target (mu*, applied mu, sensed mu_T over updates). One open-loop
run at 8 workers shows the sensed momentum without correction.

    python benchmarks/asynchrony/exp3_parameter_server.py
Writes exp3_parameter_server.json; plot_all.py draws the figures and the summary.

    python benchmarks/asynchrony/exp3_parameter_server.py --scale-free
runs the scale-free tuner (closed loop, its step cut for the staleness the server reports) at 4 and 8 workers
instead, into exp3_parameter_server_scale_free.json, and prints each run's final loss beside the reference's.
"""

import json
import logging
import os
import sys
import time

import torch

from common import HERE, get_task, save_json
from yellowfin import YellowFin
from yellowfin.asynchrony import MomentumSensor, ParameterServer

UPDATES = 600
RUNS = [(4, True), (8, True), (8, False)]


class TaskBatches:
    """batch_factory for the workers: each worker draws its own stream of batches."""

    def __init__(self, task):
        self.task = task

    def __call__(self, worker_id, seed):
        return self.task.train_batches(seed)


def final_loss(run: dict) -> float:
    """The mean loss of the last 50 updates the server applied (each measured on its worker's model)."""
    losses = [record["loss"] for record in run["trace"]][-50:]
    return sum(losses) / len(losses)


def main(scale_free: bool = False):
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    task = get_task("char_lstm")
    # (the scale-free tuner as measured, before DoWG's distance hold, docs/tuner.md §16)
    options = {"tuner": "scale_free", "hold_distance_uphill": False} if scale_free else {"tuner": "reference"}
    name = "exp3_parameter_server_scale_free.json" if scale_free else "exp3_parameter_server.json"
    results = {"task": "char_lstm", "updates": UPDATES, "tuner": options["tuner"], "runs": []}
    for num_workers, closed in [run for run in RUNS if run[1]] if scale_free else RUNS:
        model = task.make_model(0)
        numel = sum(p.numel() for p in model.parameters())
        # Open loop: the same kind of sensor as a diagnostic, no controller.
        sensor = None if closed else MomentumSensor(numel, 512, seed=0, history=16 * num_workers + 8)
        server = ParameterServer(model, YellowFin(model.parameters(), **options), task.loss, TaskBatches(task),
                                 num_workers=num_workers, closed_loop=closed, sensor=sensor, seed=0)
        started = time.time()
        with server:
            report = server.run(UPDATES, timeout=500)
        report["seconds"] = time.time() - started
        report["closed_loop"] = closed
        report["num_workers"] = num_workers
        report["trace"] = [{k: r.get(k) for k in ("version", "staleness", "loss", "mu_hat", "mu_target",
                                                   "mu_applied", "lr")} for r in server.trace]
        results["runs"].append(report)
        print(num_workers, closed, {k: report[k] for k in ("mean_staleness", "mu_hat", "momentum_offset",
                                                          "seconds", "rejected")},
              report["staleness_counts"], f"final loss {final_loss(report):.4f}", flush=True)
        save_json(results, name)
    if scale_free:
        with open(os.path.join(HERE, "exp3_parameter_server.json")) as f:
            reference = json.load(f)
        for run in reference["runs"]:
            print(f"reference, {run['num_workers']} workers, closed loop {run['closed_loop']}: "
                  f"final loss {final_loss(run):.4f}")


if __name__ == "__main__":
    main(scale_free="--scale-free" in sys.argv)
