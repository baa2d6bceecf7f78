"""Choosing the controller's gain: closed-loop YellowFin at M = 16 (round-robin staleness) on the noisy
quadratic for gains 0.001 ... 0.1. For each gain: the mean absolute tracking error |mu* - mu_hat_T| over
the second half of the run, how much the applied momentum swings there (std), the final smoothed loss, and
how often the applied momentum sat on a clamp.

    python benchmarks/asynchrony/gain_sweep.py     -> gain_sweep.json
"""

import statistics

import torch

from common import get_task, save_json, simulate, smooth

GAINS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)
STEPS = 3000


def main():
    torch.set_num_threads(1)
    task = get_task("quadratic")
    rows = []
    for gain in GAINS:
        run = simulate(task, "yellowfin_closed", 16, STEPS, staleness="fixed", gain=gain)
        half = [r for r in run["trace"] if r["version"] > STEPS // 2]
        errors = [abs(r["mu_target"] - r["mu_hat_0"]) for r in half]
        applied = [r["mu_applied"] for r in half]
        row = {"gain": gain, "tracking_error": statistics.mean(errors),
               "applied_std": statistics.pstdev(applied), "applied_mean": statistics.mean(applied),
               "target_mean": statistics.mean(r["mu_target"] for r in half),
               "at_clamp": sum(a <= -0.5 + 1e-6 or a >= 0.99 - 1e-6 for a in applied) / len(applied),
               "final_loss": smooth(run["losses"])[-1], "diverged": run["diverged"],
               "trace": [(r["version"], r["mu_target"], r["mu_applied"], r["mu_hat_0"]) for r in run["trace"]]}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "trace"}, flush=True)
        save_json({"num_workers": 16, "staleness": "fixed", "steps": STEPS, "rows": rows}, "gain_sweep.json")


if __name__ == "__main__":
    main()
