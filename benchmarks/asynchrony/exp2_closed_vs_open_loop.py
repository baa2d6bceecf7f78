"""Experiment 2: closed-loop (sensor with the algorithmic step, and with the effective step alpha/M)
vs open-loop YellowFin, Adam and momentum SGD at M = 16 simulated workers.

Round-robin staleness (tau = M - 1 = 15 for every gradient, the same sequence for every method). Adam and
momentum SGD (mu = 0.9) get a 3-point (ResNet) or 4-point (char-LSTM) learning-rate grid each, tuned by their
final smoothed training loss under the same asynchrony. Target loss = the tuned Adam's best smoothed training loss; we report
iterations each method needs to reach it.

    python benchmarks/asynchrony/exp2_closed_vs_open_loop.py [fmnist_resnet|char_lstm|all]
Writes exp2_<task>.json; plot_exp2.py draws the figures.
"""

import sys

import torch

from common import get_task, iterations_to, save_json, simulate, smooth

NUM_WORKERS = 16
SETUPS = {
    # A smaller ResNet than the benchmark default (1 block per stage, width 8, batch 32) to fit 2 CPU cores.
    "fmnist_resnet": dict(options=dict(batch_size=32, blocks_per_stage=1, width=8), steps=600,
                          grids={"adam": (3e-4, 1e-3, 3e-3), "sgd": (0.003, 0.01, 0.03)}),
    # 500 steps (about 3 minutes a run on one loaded core); the grids bracket each baseline's best rate.
    "char_lstm": dict(options={}, steps=500, grids={"adam": (1e-3, 3e-3, 1e-2, 3e-2),
                                                     "sgd": (0.01, 0.03, 0.1, 0.3)}),
}


def main(names):
    torch.set_num_threads(1)
    for name in names:
        setup = SETUPS[name]
        task = get_task(name, **setup["options"])
        results = {"task": name, "num_workers": NUM_WORKERS, "staleness": "fixed",
                   "setup": {k: v for k, v in setup.items()}, "runs": []}

        def record(run):
            run["smoothed"] = smooth(run.pop("losses"))
            run["final"] = run["smoothed"][-1]
            results["runs"].append(run)
            print(name, run["method"], run["lr"], f"final {run['final']:.4f}", f"{run['seconds']:.0f}s",
                  flush=True)
            save_json(results, f"exp2_{name}.json")

        for method in ("yellowfin_closed", "yellowfin_closed_effective", "yellowfin_open"):
            record(simulate(task, method, NUM_WORKERS, setup["steps"], staleness="fixed"))
        for method, grid in setup["grids"].items():
            for lr in grid:
                record(simulate(task, method, NUM_WORKERS, setup["steps"], lr=lr,
                                momentum=0.9 if method == "sgd" else 0.0, staleness="fixed", sensors=True))
        best = {}
        for run in results["runs"]:
            key = run["method"]
            if not run["diverged"] and (key not in best or run["final"] < best[key]["final"]):
                best[key] = run
        target = min(best["adam"]["smoothed"])
        summary = {"target_loss": target}
        for method, run in best.items():
            summary[method] = {"lr": run["lr"], "iterations_to_target": iterations_to(run["smoothed"], target),
                               "best_smoothed_loss": min(run["smoothed"])}
        results["summary"] = summary
        print(name, summary, flush=True)
        save_json(results, f"exp2_{name}.json")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    main(list(SETUPS) if which == "all" else [which])
