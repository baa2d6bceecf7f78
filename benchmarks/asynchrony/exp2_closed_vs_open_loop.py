"""Experiment 2: closed-loop (sensor with the algorithmic step, and with the effective step alpha/M)
vs open-loop YellowFin, Adam and momentum SGD at M = 16 simulated workers.

Round-robin staleness (tau = M - 1 = 15 for every gradient, the same sequence for every method). Adam and
momentum SGD (mu = 0.9) get a 3-point (ResNet) or 4-point (char-LSTM) learning-rate grid each, tuned by their
final smoothed training loss under the same asynchrony; when the best rate is on an edge of the grid the
grid is extended past that edge (at most twice, extend_edges). Target loss = the tuned Adam's best smoothed
training loss; we report iterations each method needs to reach it (plot_all.py adds a looser common target).

    python benchmarks/asynchrony/exp2_closed_vs_open_loop.py [fmnist_resnet|char_lstm|all] [seed] [--extend-only]
        [--add-scale-free] [--only METHOD]
Writes exp2_<task>.json (seed 0, the default) or exp2_<task>_seed<seed>.json; plot_all.py draws the
figures and the summary. --extend-only adds the edge extensions to an existing results file; --add-scale-free
adds the scale-free tuner's closed-loop runs, in both metrics (common.SCALE_FREE_METHODS), to one. --only METHOD
runs one of those (or of common.SCREEN_METHODS) alone into a file of its own, exp2_<task>[_seed<seed>]_<METHOD>.json,
beside the results file (whose summary it leaves as it is).
"""

import json
import os
import sys

import torch

from common import HERE, SCALE_FREE_METHODS, SCREEN_METHODS, get_task, iterations_to, save_json, simulate, smooth

NUM_WORKERS = 16
SETUPS = {
    # A smaller ResNet than the benchmark default (1 block per stage, width 8, batch 32) to fit 2 CPU cores.
    "fmnist_resnet": dict(options=dict(batch_size=32, blocks_per_stage=1, width=8), steps=600,
                          grids={"adam": (3e-4, 1e-3, 3e-3), "sgd": (0.003, 0.01, 0.03)}),
    # 500 steps (about 3 minutes a run on one loaded core); the grids bracket each baseline's best rate.
    "char_lstm": dict(options={}, steps=500, grids={"adam": (1e-3, 3e-3, 1e-2, 3e-2),
                                                     "sgd": (0.01, 0.03, 0.1, 0.3)}),
}


MAX_EXTENSIONS = 2  # grid points added beyond an edge of a learning-rate grid, per side


def extend_edges(results, setup, run_one):
    """Tuning that cannot end on an edge of its grid: while a baseline's best learning rate is the smallest
    (largest) one tried, try one more step below (above) it, with the grid's own ratio; at most
    MAX_EXTENSIONS times per baseline."""
    for method in setup["grids"]:
        for _ in range(MAX_EXTENSIONS):
            runs = [r for r in results["runs"] if r["method"] == method]
            finite = [r for r in runs if not r["diverged"]]
            if not finite or len(runs) < 2:
                break
            best = min(finite, key=lambda r: r["final"])["lr"]
            lrs = sorted({r["lr"] for r in runs})
            if best == lrs[0]:
                new = lrs[0] * lrs[0] / lrs[1]
            elif best == lrs[-1]:
                new = lrs[-1] * lrs[-1] / lrs[-2]
            else:
                break
            run_one(method, float(f"{new:.3g}"))


def summarize(results):
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
    return summary


def finished(run):
    """The run with its loss curve smoothed and its final smoothed loss, as the results files keep it."""
    run["smoothed"] = smooth(run.pop("losses"))
    run["final"] = run["smoothed"][-1]
    return run


def main(names, seed=0, extend_only=False, add_scale_free=False, only=None):
    """``extend_only``: load the results file and only add the edge extensions (for a file written before
    extend_edges existed); ``add_scale_free``: load it and only add the scale-free tuner's runs; ``only``: run that
    scale-free method alone, into a file of its own."""
    if only is not None and only not in SCALE_FREE_METHODS and only not in SCREEN_METHODS:
        raise SystemExit(f"--only {only!r}: choose one of {', '.join([*SCALE_FREE_METHODS, *SCREEN_METHODS])}")
    torch.set_num_threads(1)
    for name in names:
        setup = SETUPS[name]
        task = get_task(name, **setup["options"])
        filename = f"exp2_{name}.json" if seed == 0 else f"exp2_{name}_seed{seed}.json"
        if only is not None:
            run = finished(simulate(task, only, NUM_WORKERS, setup["steps"], seed=seed, staleness="fixed"))
            print(name, only, f"final {run['final']:.4f}", f"{run['seconds']:.0f}s", flush=True)
            save_json({"task": name, "num_workers": NUM_WORKERS, "staleness": "fixed", "seed": seed, "runs": [run]},
                      filename.replace(".json", f"_{only}.json"))
            continue
        if extend_only or add_scale_free:
            with open(os.path.join(HERE, filename)) as f:
                results = json.load(f)
        else:
            results = {"task": name, "num_workers": NUM_WORKERS, "staleness": "fixed", "seed": seed,
                       "setup": {k: v for k, v in setup.items()}, "runs": []}

        def record(run):
            results["runs"].append(finished(run))
            print(name, run["method"], run["lr"], f"final {run['final']:.4f}", f"{run['seconds']:.0f}s",
                  flush=True)
            save_json(results, filename)

        def run_baseline(method, lr):
            record(simulate(task, method, NUM_WORKERS, setup["steps"], seed=seed, lr=lr,
                            momentum=0.9 if method == "sgd" else 0.0, staleness="fixed", sensors=True))

        if add_scale_free:
            results["runs"] = [run for run in results["runs"] if run["method"] not in SCALE_FREE_METHODS]
            for method in SCALE_FREE_METHODS:
                record(simulate(task, method, NUM_WORKERS, setup["steps"], seed=seed, staleness="fixed"))
        elif not extend_only:
            for method in ("yellowfin_closed", "yellowfin_closed_effective", "yellowfin_open"):
                record(simulate(task, method, NUM_WORKERS, setup["steps"], seed=seed, staleness="fixed"))
            for method, grid in setup["grids"].items():
                for lr in grid:
                    run_baseline(method, lr)
        if not add_scale_free:
            extend_edges(results, setup, run_baseline)
        print(name, summarize(results), flush=True)
        save_json(results, filename)


if __name__ == "__main__":
    argv = sys.argv[1:]
    only = None
    if "--only" in argv:
        at = argv.index("--only")
        if at + 1 >= len(argv):
            raise SystemExit("--only needs a method name")
        only = argv.pop(at + 1)
        argv.pop(at)
    args = [a for a in argv if not a.startswith("--")]
    which = args[0] if args else "all"
    main(list(SETUPS) if which == "all" else [which], int(args[1]) if len(args) > 1 else 0,
         extend_only="--extend-only" in argv, add_scale_free="--add-scale-free" in argv, only=only)
