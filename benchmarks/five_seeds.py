"""The char-LSTM on five seeds: is the relative clip's 0.3% behind tuned momentum SGD (three seeds, docs/tuner.md §10)
more than the seeds' spread?

Seeds 0-2 are the suite's and the ablation's runs (benchmarks/results, benchmarks/results-ablation); seeds 3 and 4
ran with the same commands into benchmarks/results-five-seeds:

    yellowfin bench char_lstm --optimizers sgd_momentum --seeds 0 3 4 --results benchmarks/results-five-seeds
        (its seed-0 grid copied there from benchmarks/results, so that lr = 1 is chosen as in the suite)
    yellowfin ablate char_lstm --variants scale_free_dowg_clip_average scale_free_dowg_average --seeds 3 4 \\
        --results benchmarks/results-five-seeds

Prints the final smoothed training loss per seed (the ablation's measure), the means, and the clip's paired
differences.

    python benchmarks/five_seeds.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from yellowfin.bench import metrics
from yellowfin.bench import results as results_io

HERE = Path(__file__).resolve().parent
STEPS, SEEDS = 1500, range(5)
RUNS = {  # name: (file name pattern, directory of seeds 0-2)
    "tuned momentum SGD (lr 1)": ("sgd_momentum_lr1_seed{seed}_steps{steps}.json", "results"),
    "DoWG rule + average, unclipped": ("yf_scale_free_dowg_average_seed{seed}_steps{steps}.json", "results-ablation"),
    "DoWG rule + relative clip + average": ("yf_scale_free_dowg_clip_average_seed{seed}_steps{steps}.json",
                                            "results-ablation"),
}


def final_smoothed(name: str, seed: int) -> float:
    pattern, first = RUNS[name]
    directory = HERE / (first if seed < 3 else "results-five-seeds") / "char_lstm"
    record = results_io.read_result(directory / pattern.format(seed=seed, steps=STEPS))
    return metrics.smooth(record["loss"], metrics.smoothing_window(STEPS))[-1]


def main() -> int:
    finals = {name: [final_smoothed(name, seed) for seed in SEEDS] for name in RUNS}
    print("| run | " + " | ".join(f"seed {seed}" for seed in SEEDS) + " | mean ± std |")
    print("|---|" + "---|" * (len(SEEDS) + 1))
    for name, values in finals.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} |")
    clipped, unclipped, tuned = (finals[name] for name in (
        "DoWG rule + relative clip + average", "DoWG rule + average, unclipped", "tuned momentum SGD (lr 1)"))
    for label, other in (("unclipped", unclipped), ("tuned momentum SGD", tuned)):
        differences = [a - b for a, b in zip(clipped, other)]
        print(f"clipped minus {label}, per seed: " + ", ".join(f"{d:+.4f}" for d in differences)
              + f"; mean {statistics.fmean(differences):+.4f} ± {statistics.stdev(differences) / len(SEEDS) ** 0.5:.4f} "
              "(standard error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
