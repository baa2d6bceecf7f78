"""Re-run experiment 2's YellowFin variants with the optimizer as it is now and compare with the committed
results. yellowfin/optimizer.py kept changing (numerics of its foreach path included) while experiment 2
ran, and these noisy non-convex runs amplify rounding differences, so this measures how much the reported
YellowFin numbers depend on the optimizer version. Adam and momentum SGD do not use yellowfin/optimizer.py.

    python benchmarks/asynchrony/recheck_yellowfin.py [fmnist_resnet|char_lstm] [seed]
Writes exp2_recheck_<task>_seed<seed>.json.
"""

import json
import os
import subprocess
import sys

import torch

from common import HERE, get_task, save_json, simulate, smooth
from exp2_closed_vs_open_loop import NUM_WORKERS, SETUPS

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def main(name, seed):
    torch.set_num_threads(1)
    setup = SETUPS[name]
    task = get_task(name, **setup["options"])
    with open(os.path.join(HERE, f"exp2_{name}.json" if seed == 0 else f"exp2_{name}_seed{seed}.json")) as f:
        committed = {r["method"]: r for r in json.load(f)["runs"] if r["method"].startswith("yellowfin")}
    commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", "yellowfin/optimizer.py"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--short", "--", "yellowfin/optimizer.py"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    rows = []
    for method in committed:
        run = simulate(task, method, NUM_WORKERS, setup["steps"], seed=seed, staleness="fixed")
        smoothed = smooth(run["losses"])
        row = {"method": method, "final_now": smoothed[-1], "best_now": min(smoothed),
               "final_committed": committed[method]["final"], "best_committed": min(committed[method]["smoothed"])}
        rows.append(row)
        print(row, flush=True)
        save_json({"task": name, "seed": seed, "optimizer_commit": commit, "optimizer_modified": dirty,
                   "rows": rows}, f"exp2_recheck_{name}_seed{seed}.json")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fmnist_resnet", int(sys.argv[2]) if len(sys.argv) > 2 else 0)
