"""Experiment 3: the real parameter server with 4 and 8 worker processes on this machine.

Closed-loop YellowFin on the char-LSTM task: the measured staleness distribution of the gradients the server
applied, and the controller tracking its target (mu*, applied mu, sensed mu_T over updates). One open-loop
run at 8 workers shows the sensed momentum without correction.

    python benchmarks/asynchrony/exp3_parameter_server.py
Writes exp3_parameter_server.json; plot_all.py draws the figures and the summary.
"""

import logging
import time

import torch

from common import get_task, save_json
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


def main():
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    task = get_task("char_lstm")
    results = {"task": "char_lstm", "updates": UPDATES, "runs": []}
    for num_workers, closed in RUNS:
        model = task.make_model(0)
        numel = sum(p.numel() for p in model.parameters())
        # Open loop: the same kind of sensor as a diagnostic, no controller.
        sensor = None if closed else MomentumSensor(numel, 512, seed=0, history=16 * num_workers + 8)
        server = ParameterServer(model, YellowFin(model.parameters()), task.loss, TaskBatches(task),
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
              report["staleness_counts"], flush=True)
        save_json(results, "exp3_parameter_server.json")


if __name__ == "__main__":
    main()
