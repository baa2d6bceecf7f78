"""Experiment 1: asynchrony begets momentum (docs/asynchrony.md §1-§2).

For M = 1, 2, 4, 8, 16 workers under simulated geometric staleness, momentum SGD with a fixed learning rate
is run over a grid of explicit momenta; we record iterations to a target loss (best explicit momentum vs M,
against the theory's prediction max(0, mu_best(M=1) - (1 - 1/M)) ) and the sensed total momentum with
explicit momentum 0 (algorithmic step and effective step alpha/M) against 1 - 1/M.

    python benchmarks/asynchrony/exp1_asynchrony_begets_momentum.py [quadratic|char_lstm|all]
Writes exp1_<task>.json next to this script; plot_all.py draws the figures and the summary.
"""

import sys

import torch

from common import get_task, save_json, simulate, smooth

WORKERS = (1, 2, 4, 8, 16)
SETUPS = {
    # lr fixed across M and momentum; the quadratic's exact excess loss is evaluated every 10 steps.
    "quadratic": dict(options={}, lr=0.002, steps=3000, seeds=(0, 1, 2),
                      momenta=(-0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 0.9)),
    # Sensor check only (explicit momentum 0): the same quadratic without gradient noise.
    "quadratic_noise_free": dict(options={"noise": 0.0}, lr=0.002, steps=1500, seeds=(0,), momenta=(0.0,)),
    "char_lstm": dict(options={}, lr=1.0, steps=200, seeds=(0,), momenta=(0.0, 0.3, 0.6, 0.9)),
}


def main(names):
    torch.set_num_threads(1)
    for name in names:
        setup = SETUPS[name]
        task = get_task(name.replace("_noise_free", ""), **setup["options"])
        eval_fn = task.exact_loss if name.startswith("quadratic") else None
        results = {"task": name, "setup": {k: v for k, v in setup.items()}, "runs": []}
        for num_workers in WORKERS:
            for momentum in setup["momenta"]:
                for seed in setup["seeds"]:
                    run = simulate(task, "sgd", num_workers, setup["steps"], seed=seed, lr=setup["lr"],
                                   momentum=momentum, eval_fn=eval_fn, eval_every=10 if eval_fn else 0)
                    run["smoothed"] = smooth(run.pop("losses"))[::5]
                    run["mu_hat_algorithmic"] = run["trace"][-1]["mu_hat_0"] if run["trace"] else None
                    run["mu_hat_effective"] = run["trace"][-1]["mu_hat_1"] if run["trace"] else None
                    run["mu_hat_trace"] = [(r["version"], r["mu_hat_0"], r["mu_hat_1"]) for r in run.pop("trace")]
                    results["runs"].append(run)
                    print(name, num_workers, momentum, seed, "diverged" if run["diverged"] else "ok",
                          f"{run['seconds']:.1f}s", run["mu_hat_algorithmic"], run["mu_hat_effective"], flush=True)
                save_json(results, f"exp1_{name}.json")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    main(list(SETUPS) if which == "all" else [which])
