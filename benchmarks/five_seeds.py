"""Five seeds where three cannot decide: the char-LSTM (is the relative clip's 0.3% behind tuned momentum SGD more
than the seeds' spread?), the ResNet-20 (is the clip with its trigger behind it?), and the two tasks where the
trigger's margin is small at three seeds (the autoencoder, the ResNet-8), and for the record the three where it is
not (the digits MLP, logistic regression, the quadratic); docs/tuner.md §10.

Seeds 0-2 are the suite's and the ablation's runs (benchmarks/results, benchmarks/results-ablation); seeds 3 and 4
ran with the same commands into benchmarks/results-five-seeds, e.g. for the char-LSTM:

    yellowfin bench char_lstm --optimizers sgd_momentum --seeds 0 3 4 --results benchmarks/results-five-seeds
        (its seed-0 grid copied there from benchmarks/results, so that the suite's learning rate is chosen)
    yellowfin ablate char_lstm --variants scale_free_dowg_clip_average scale_free_dowg_average \\
        scale_free_dowg_clip_trigger_average --seeds 3 4 --results benchmarks/results-five-seeds

The preconditioned tuner's two rules (docs/tuner.md §12) ran on seeds 3 and 4 of every task the same way, and so
did each metric's default with the first move 1e-2 and the neutral rule times sqrt(1.5) (§14):

    yellowfin ablate <the seven tasks> --variants scale_free_adam_dowg_neutral scale_free_adam --seeds 3 4 \\
        --results benchmarks/results-five-seeds
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_start_1e-2_average \\
        scale_free_adam_dowg_neutral_start_1e-2 --seeds 3 4 --results benchmarks/results-five-seeds
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_neutral_lr_1.22_clip_trigger_average --seeds 3 4 \\
        --results benchmarks/results-five-seeds

and the plain default with DoWG's step held to linear growth (§15), and each metric's default with its distance held
where the run climbs (§16; in Adam's metric on the two tasks where the hold acted, the autoencoder and the char-LSTM):

    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_growth_cap_average --seeds 3 4 \\
        --results benchmarks/results-five-seeds
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_hold_average --seeds 3 4 \\
        --results benchmarks/results-five-seeds
    yellowfin ablate autoencoder char_lstm --variants scale_free_adam_dowg_neutral_start_1e-2_hold_average \\
        --seeds 3 4 --results benchmarks/results-five-seeds

and the plain default (with the hold) from the first move 1e-2 (§16.1):

    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_hold_start_1e-2_average --seeds 3 4 \\
        --results benchmarks/results-five-seeds

and the plain default in primal-averaging form (§18; its seeds 0-2 in benchmarks/results-primal-average), and it and
the default with the clip acting on every gradient above its level (§19; seeds 0-2 in benchmarks/results-clip-trigger):

    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_hold_primal_average --seeds 3 4 \\
        --results benchmarks/results-five-seeds
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_hold_primal_average \\
        scale_free_dowg_clip_hold_average --seeds 3 4 --results benchmarks/results-five-seeds

Prints, per task, the final smoothed training loss per seed (the ablation's measure), the means, each variant's
paired differences against tuned momentum SGD, the neutral DoWG rule's against DoG's in Adam's metric, the
first move 1e-2 against 1e-3 in each metric, the neutral rule times sqrt(1.5) and the growth cap against the plain
default as it was before §16, each metric's distance hold against its default without it, the first move 1e-2
against the default with the hold, and the primal-averaging form against the default.

    python benchmarks/five_seeds.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from yellowfin.bench import metrics
from yellowfin.bench import results as results_io

HERE = Path(__file__).resolve().parent
SEEDS = range(5)
TUNED = "tuned momentum SGD"
VARIANTS = {
    "DoWG rule + average, unclipped (first measured)": "scale_free_dowg_average",
    "DoWG rule + relative clip + average (trigger 2)": "scale_free_dowg_clip_average",
    "DoWG rule + relative clip + average (trigger 10)": "scale_free_dowg_clip_trigger_average",
    "Adam's metric, DoG rule": "scale_free_adam",
    "Adam's metric, neutral DoWG rule": "scale_free_adam_dowg_neutral",
    "DoWG rule + relative clip + average (trigger 10), first move 1e-2":
        "scale_free_dowg_clip_trigger_start_1e-2_average",
    "Adam's metric, neutral DoWG rule, first move 1e-2": "scale_free_adam_dowg_neutral_start_1e-2",
    "neutral DoWG rule times sqrt(1.5) + relative clip + average":
        "scale_free_dowg_neutral_lr_1.22_clip_trigger_average",
    "DoWG rule + relative clip + average (trigger 10), growth cap":
        "scale_free_dowg_clip_trigger_growth_cap_average",
    "DoWG rule + relative clip + average (trigger 10), distance hold (the plain default from §16 to §20)":
        "scale_free_dowg_clip_trigger_hold_average",
    "DoWG rule + relative clip + average (trigger 10), distance hold, first move 1e-2":
        "scale_free_dowg_clip_trigger_hold_start_1e-2_average",
    "Adam's metric, neutral DoWG rule, first move 1e-2, distance hold":
        "scale_free_adam_dowg_neutral_start_1e-2_hold_average",
    "the plain default in primal-averaging form (momentum_form, §18)":
        "scale_free_dowg_clip_trigger_hold_primal_average",
    "the plain default with clip_trigger=2 (§19)": "scale_free_dowg_clip_hold_average",
    "the primal-average form with clip_trigger=2 (§19; the default since §20)":
        "scale_free_dowg_clip_hold_primal_average",
}
# Where a variant's seeds 0-2 are, if not in benchmarks/results-ablation.
FIRST_SEEDS = {"scale_free_dowg_clip_trigger_hold_primal_average": "results-primal-average",
               "scale_free_dowg_clip_hold_average": "results-clip-trigger",
               "scale_free_dowg_clip_hold_primal_average": "results-clip-trigger"}
# Paired differences printed beside those against tuned momentum SGD: (run, minus run).
PAIRS = (("Adam's metric, neutral DoWG rule", "Adam's metric, DoG rule"),
         ("DoWG rule + relative clip + average (trigger 10), first move 1e-2",
          "DoWG rule + relative clip + average (trigger 10)"),
         ("Adam's metric, neutral DoWG rule, first move 1e-2", "Adam's metric, neutral DoWG rule"),
         ("neutral DoWG rule times sqrt(1.5) + relative clip + average",
          "DoWG rule + relative clip + average (trigger 10)"),
         ("DoWG rule + relative clip + average (trigger 10), growth cap",
          "DoWG rule + relative clip + average (trigger 10)"),
         ("DoWG rule + relative clip + average (trigger 10), distance hold (the plain default from §16 to §20)",
          "DoWG rule + relative clip + average (trigger 10)"),
         ("DoWG rule + relative clip + average (trigger 10), distance hold, first move 1e-2",
          "DoWG rule + relative clip + average (trigger 10), distance hold (the plain default from §16 to §20)"),
         ("Adam's metric, neutral DoWG rule, first move 1e-2, distance hold",
          "Adam's metric, neutral DoWG rule, first move 1e-2"),
         ("the plain default in primal-averaging form (momentum_form, §18)",
          "DoWG rule + relative clip + average (trigger 10), distance hold (the plain default from §16 to §20)"),
         ("the plain default with clip_trigger=2 (§19)",
          "DoWG rule + relative clip + average (trigger 10), distance hold (the plain default from §16 to §20)"),
         ("the primal-average form with clip_trigger=2 (§19; the default since §20)",
          "DoWG rule + relative clip + average (trigger 10), distance hold (the plain default from §16 to §20)"))
_ADAM_HOLD = "Adam's metric, neutral DoWG rule, first move 1e-2, distance hold"
# (every variant but the first, which ran on the char-LSTM alone, and Adam's metric's hold, which ran five seeds
# where it acted)
_PLAIN_HOLD_ONLY = tuple(run for run in tuple(VARIANTS)[1:] if run != _ADAM_HOLD)
TASKS = {  # task: (steps, tuned momentum SGD's learning rate, the variants run on five seeds)
    "char_lstm": (1500, "1", tuple(VARIANTS)),
    "fmnist_resnet": (300, "0.03", _PLAIN_HOLD_ONLY),
    "autoencoder": (2000, "1", tuple(VARIANTS)[1:]),
    "fmnist_resnet8": (300, "0.1", _PLAIN_HOLD_ONLY),
    "digits_mlp": (600, "0.1", _PLAIN_HOLD_ONLY),
    "logreg": (2000, "0.003", _PLAIN_HOLD_ONLY),
    "quadratic": (3000, "0.0003", _PLAIN_HOLD_ONLY),  # (the exact excess loss, at the average for the tuner)
}


def path(task: str, run: str, seed: int) -> Path:
    steps, lr, _ = TASKS[task]
    if run == TUNED:
        first, name = "results", f"sgd_momentum_lr{lr}_seed{seed}_steps{steps}.json"
    else:
        first = FIRST_SEEDS.get(VARIANTS[run], "results-ablation")
        name = f"yf_{VARIANTS[run]}_seed{seed}_steps{steps}.json"
    return HERE / (first if seed < 3 else "results-five-seeds") / task / name


def final_smoothed(task: str, run: str, seed: int) -> float | None:
    record = results_io.read_result(path(task, run, seed))  # (None: not run)
    if record is None:
        return None
    curve = record["exact_loss"] if task == "quadratic" else record["loss"]
    return metrics.smooth(curve, metrics.smoothing_window(record["steps"]))[-1]


def main() -> int:
    for task, (_, _, variants) in TASKS.items():
        runs = (TUNED, *variants)
        finals = {run: [final_smoothed(task, run, seed) for seed in SEEDS] for run in runs}
        print(f"\n{task}\n\n| run | " + " | ".join(f"seed {seed}" for seed in SEEDS) + " | mean ± std |")
        print("|---|" + "---|" * (len(SEEDS) + 1))
        for run, values in finals.items():
            cells = " | ".join("–" if v is None else f"{v:.4f}" for v in values)
            known = [v for v in values if v is not None]
            print(f"| {run} | {cells} | {statistics.fmean(known):.4f} ± {statistics.stdev(known):.4f} |")
        comparisons = [(run, TUNED) for run in variants] + [pair for pair in PAIRS if set(pair) <= set(variants)]
        for run, other in comparisons:
            pairs = [(a, b) for a, b in zip(finals[run], finals[other]) if a is not None and b is not None]
            if len(pairs) < 2:
                continue
            differences = [a - b for a, b in pairs]
            print(f"{run} minus {other}, per seed: " + ", ".join(f"{d:+.4f}" for d in differences)
                  + f"; mean {statistics.fmean(differences):+.4f} ± "
                  f"{statistics.stdev(differences) / len(differences) ** 0.5:.4f} (standard error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
