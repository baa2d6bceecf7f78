"""Figures and summary tables for the asynchrony experiments, from the committed results files.

    python benchmarks/asynchrony/plot_all.py   -> docs/figures/asynchrony/*.png and summary.md (printed too)
Missing results files are skipped.
"""

import json
import math
import os
import statistics

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import FIGURES, HERE, iterations_to, smooth  # noqa: E402

os.makedirs(FIGURES, exist_ok=True)
lines = []


def out(text=""):
    print(text)
    lines.append(text)


def load(name):
    path = os.path.join(HERE, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------- experiment 1
def exp1(task):
    data = load(f"exp1_{task}.json")
    if data is None:
        return
    runs = data["runs"]
    # Only the M values whose grid is complete (results files are written while experiments run).
    workers = sorted(m for m in {r["num_workers"] for r in runs} if any(
        r["num_workers"] == m and r["momentum"] == 0.0 for r in runs) and len(
        [r for r in runs if r["num_workers"] == m]) == len([r for r in runs if r["num_workers"] == runs[0]["num_workers"]]))
    momenta = sorted({r["momentum"] for r in runs})
    if task.startswith("quadratic"):
        target, curve_key, stride = 5.0, "evals", 10
        target_text = "exact excess loss f(x) - f(x*) <= 5 (evaluated every 10 steps)"
    else:
        # The loosest level every M reaches with its best momentum: max over M of the best smoothed loss.
        best_per_m = [min(min(r["smoothed"]) for r in runs if r["num_workers"] == m and not r["diverged"])
                      for m in workers]
        target, curve_key, stride = max(best_per_m), "smoothed", 5
        target_text = f"smoothed training loss <= {target:.3f} (max over M of each M's best)"

    def iters(run):
        if run["diverged"]:
            return None
        values = [v for _, v in run["evals"]] if curve_key == "evals" else run["smoothed"]
        return iterations_to(values, target, stride)

    out(f"### Experiment 1, {task}: lr {data['setup']['lr']}, {data['setup']['steps']} steps, "
        f"seeds {data['setup']['seeds']}, geometric staleness")
    out(f"Target: {target_text}. Iterations to target (median over seeds; '-' = not reached or diverged):")
    out("")
    out("| M | " + " | ".join(f"mu={m:g}" for m in momenta) + " | best mu | theory | sensed mu_T (alg.) | "
        "sensed mu_T (eff. alpha/M) | same, at 10% of the run (alg. / eff.) | 1-1/M |")
    out("|---" * (len(momenta) + 7) + "|")
    best_mu, sensed_alg, sensed_eff, early_alg, early_eff = [], [], [], [], []
    table = {}
    for m in workers:
        row = []
        for mu in momenta:
            values = [iters(r) for r in runs if r["num_workers"] == m and r["momentum"] == mu]
            reached = [v for v in values if v is not None]
            median = statistics.median(reached) if len(reached) * 2 > len(values) else None
            table[(m, mu)] = median
            row.append(median)
        finite = [(v, mu) for v, mu in zip(row, momenta) if v is not None]
        best_mu.append(min(finite)[1] if finite else float("nan"))
        zero = [r for r in runs if r["num_workers"] == m and r["momentum"] == 0.0]
        sensed_alg.append(statistics.median(r["mu_hat_algorithmic"] for r in zero))
        sensed_eff.append(statistics.median(r["mu_hat_effective"] for r in zero))
        early = [r["mu_hat_trace"][len(r["mu_hat_trace"]) // 10 - 1] for r in zero]
        early_alg.append(statistics.median(e[1] for e in early))
        early_eff.append(statistics.median(e[2] for e in early))
    theory = [max(min(momenta), best_mu[0] - (1 - 1 / m)) for m in workers]
    for i, m in enumerate(workers):
        out(f"| {m} | " + " | ".join(fmt(table[(m, mu)]) for mu in momenta) +
            f" | {fmt(best_mu[i])} | {fmt(theory[i])} | {fmt(sensed_alg[i])} | {fmt(sensed_eff[i])} | "
            f"{fmt(early_alg[i])} / {fmt(early_eff[i])} | {fmt(1 - 1 / m)} |")
    out("")
    out("theory = best mu at M=1 minus the implicit momentum 1 - 1/M, floored at the smallest grid value. "
        "Sensed mu_T: explicit mu = 0 runs, median over seeds, averaged estimate at the end of the run "
        "(and at 10% of the run, still in the transient).")
    out("")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(workers, best_mu, "o-", label="best explicit momentum (grid)")
    axes[0].plot(workers, theory, "k--", label="theory: mu*(M=1) - (1 - 1/M)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("workers M")
    axes[0].set_ylabel("explicit momentum")
    axes[0].set_title(f"{task}: best explicit momentum")
    axes[0].legend()
    axes[1].plot(workers, sensed_alg, "o-", label="sensed mu_T, algorithmic step alpha")
    axes[1].plot(workers, sensed_eff, "s-", label="sensed mu_T, effective step alpha/M")
    axes[1].plot(workers, early_alg, "o:", label="alpha, at 10% of the run")
    axes[1].plot(workers, early_eff, "s:", label="alpha/M, at 10% of the run")
    axes[1].plot(workers, [1 - 1 / m for m in workers], "k--", label="1 - 1/M")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("workers M")
    axes[1].set_title(f"{task}: sensed total momentum, explicit mu = 0")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, f"exp1_{task}.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- experiment 2
YF_METHODS = ("yellowfin_closed", "yellowfin_closed_effective", "yellowfin_open")


def second_half_mean(values):
    values = [v for v in values[len(values) // 2:] if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else float("nan")


def exp2(task, seed=0):
    name = f"exp2_{task}" if seed == 0 else f"exp2_{task}_seed{seed}"
    data = load(f"{name}.json")
    if data is None or "summary" not in data:
        return
    summary = data["summary"]
    best = {}
    for r in data["runs"]:
        if not r["diverged"] and (r["method"] not in best or r["final"] < best[r["method"]]["final"]):
            best[r["method"]] = r
    # Two targets: the script's (tuned Adam's best smoothed loss) and the loosest level every method's
    # best run reaches (max over methods of their best smoothed loss), so that all methods can be compared.
    target = summary["target_loss"]
    common = max(min(r["smoothed"]) for r in best.values())
    out(f"### Experiment 2, {task}: M = {data['num_workers']} round-robin staleness (tau = 15), "
        f"{data['setup']['steps']} steps, seed {seed}")
    out(f"Target A = tuned Adam's best smoothed training loss = {target:.4f}; target B = the loosest level "
        f"every method's best run reaches = {common:.4f}. Iterations to target ('-' = not reached).")
    out("")
    out("| method | lr | iterations to A | iterations to B | speedup vs Adam (B) | best smoothed loss | "
        "final smoothed loss | sensed mu_T (alpha), 2nd-half mean | mu* 2nd-half mean | applied mu 2nd-half mean |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    adam_b = iterations_to(best["adam"]["smoothed"], common) if "adam" in best else None
    for method, r in best.items():
        keys, trace = r["sensor_keys"], r["trace"]
        it_a, it_b = iterations_to(r["smoothed"], target), iterations_to(r["smoothed"], common)
        sensed = second_half_mean([t[keys["algorithmic"]] for t in trace])
        mu_star = second_half_mean([t.get("mu_target") for t in trace]) if "mu_target" in trace[0] else None
        applied = (second_half_mean([t.get("mu_applied") for t in trace]) if "mu_applied" in trace[0]
                   else r["momentum"] if method == "sgd" else None)
        out(f"| {method} | {fmt(r['lr'])} | {fmt(it_a)} | {fmt(it_b)} | "
            f"{fmt(adam_b / it_b if adam_b and it_b else None)} | {min(r['smoothed']):.4f} | {r['final']:.4f} | "
            f"{fmt(sensed)} | {fmt(mu_star)} | {fmt(applied)} |")
    out("")
    out("All runs (final smoothed loss): " + ", ".join(
        f"{r['method']}{'' if r['lr'] is None else '@' + format(r['lr'], 'g')}="
        f"{'diverged' if r['diverged'] else format(r['final'], '.4f')}" for r in data["runs"]))
    out("")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    axes = axes.ravel()
    for method, r in best.items():
        axes[0].plot(r["smoothed"], label=f"{method}" + ("" if r["lr"] is None else f" lr={r['lr']:g}"))
    axes[0].axhline(target, color="k", ls=":", label="target A (Adam's best)")
    axes[0].axhline(common, color="gray", ls="--", label="target B (all reach)")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("smoothed training loss")
    axes[0].set_title(f"{task}, M=16 simulated (tau=15), seed {seed}")
    axes[0].legend(fontsize=7)
    for ax, method in zip(axes[1:], YF_METHODS):
        runs = [r for r in data["runs"] if r["method"] == method]
        if not runs:
            ax.set_visible(False)
            continue
        r, keys = runs[0], runs[0]["sensor_keys"]
        trace = r["trace"]
        v = [t["version"] for t in trace]
        ax.plot(v, [t["mu_target"] for t in trace], lw=2, label="mu* (YellowFin target)")
        ax.plot(v, [t["mu_applied"] for t in trace], lw=2, label="mu applied")
        ax.plot(v, [t[keys["algorithmic"]] for t in trace], label="sensed mu_T, step alpha"
                + (" (controller)" if method == "yellowfin_closed" else ""))
        ax.plot(v, [t[keys["effective"]] for t in trace], ls="--", label="sensed mu_T, step alpha/M"
                + (" (controller)" if method == "yellowfin_closed_effective" else ""))
        ax.axhline(1 - 1 / data["num_workers"], color="k", ls=":", lw=0.8, label="1 - 1/M")
        ax.set_ylim(-0.6, 1.2)
        ax.set_xlabel("iteration")
        ax.set_title(method.replace("yellowfin_", "YellowFin ").replace("_", " ") + " loop")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, f"{name}.png"), dpi=100)
    plt.close(fig)


def exp2_overview(task):
    """One line per method over the seeds present: best and final smoothed loss, iterations to the loosest
    level every method reaches in every seed."""
    seeds = [(seed, load(f"exp2_{task}.json" if seed == 0 else f"exp2_{task}_seed{seed}.json")) for seed in (0, 1)]
    seeds = [(seed, d) for seed, d in seeds if d is not None and "summary" in d]
    if len(seeds) < 2:
        return
    best = {}
    for seed, data in seeds:
        for r in data["runs"]:
            key = (r["method"], seed)
            if not r["diverged"] and (key not in best or r["final"] < best[key]["final"]):
                best[key] = r
    methods = [m for m in ("yellowfin_closed", "yellowfin_closed_effective", "yellowfin_open", "adam", "sgd")
               if all((m, seed) in best for seed, _ in seeds)]
    level = max(min(best[(m, seed)]["smoothed"]) for m in methods for seed, _ in seeds)
    names = ", ".join(str(seed) for seed, _ in seeds)
    out(f"### Experiment 2, {task}, seeds {names} side by side")
    out(f"Target C = the loosest level every method reaches in every seed = {level:.4f}.")
    out("")
    out("| method | lr (per seed) | best smoothed loss (per seed) | final smoothed loss (per seed) | "
        "iterations to C (per seed) |")
    out("|---|---|---|---|---|")
    for m in methods:
        rs = [best[(m, seed)] for seed, _ in seeds]
        out(f"| {m} | {' / '.join(fmt(r['lr']) for r in rs)} | "
            f"{' / '.join(format(min(r['smoothed']), '.3f') for r in rs)} | "
            f"{' / '.join(format(r['final'], '.3f') for r in rs)} | "
            f"{' / '.join(fmt(iterations_to(r['smoothed'], level)) for r in rs)} |")
    out("")


# ------------------------------------------------------------------------------------------- experiment 3
def exp3():
    data = load("exp3_parameter_server.json")
    if data is None:
        return
    runs = data["runs"]
    out(f"### Experiment 3: parameter server, {data['task']}, {data['updates']} updates per run, "
        "worker processes on this 2-core machine")
    out("")
    out("| workers | loop | mean staleness | staleness distribution (>= 1%) | sensed mu_T final | mu* final | "
        "applied mu final | mean abs(mu* - sensed mu_T), 2nd half | smoothed loss final | seconds |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    for i, r in enumerate(runs):
        counts = {int(k): v for k, v in r["staleness_counts"].items()}
        total = sum(counts.values())
        dist = ", ".join(f"{k}:{v / total:.2f}" for k, v in sorted(counts.items()) if v / total >= 0.01)
        trace, last = r["trace"], r["trace"][-1]
        half = trace[len(trace) // 2:]
        error = statistics.mean(abs(t["mu_target"] - t["mu_hat"]) for t in half)
        loss = smooth([t["loss"] for t in trace])
        label = f"M={r['num_workers']} {'closed' if r['closed_loop'] else 'open'}"
        out(f"| {r['num_workers']} | {'closed' if r['closed_loop'] else 'open'} | {r['mean_staleness']:.2f} | "
            f"{dist} | {fmt(r['mu_hat'])} | {fmt(last['mu_target'])} | {fmt(last['mu_applied'])} | "
            f"{error:.3f} | {loss[-1]:.3f} | {r['seconds']:.0f} |")
        ks = sorted(counts)
        axes[0].bar([k + 0.27 * (i - 1) for k in ks], [counts[k] / total for k in ks], width=0.27, label=label)
        axes[1].plot([t["version"] for t in trace], loss, label=label)
        ax = axes[3 + i]
        v = [t["version"] for t in trace]
        ax.plot(v, [t["mu_target"] for t in trace], lw=2, label="mu* (YellowFin target)")
        ax.plot(v, [t["mu_applied"] for t in trace], lw=2, label="mu applied")
        ax.plot(v, [t["mu_hat"] for t in trace], label="sensed mu_T (step alpha)")
        ax.axhline(1 - 1 / r["num_workers"], color="k", ls=":", lw=0.8, label="1 - 1/M")
        ax.set_ylim(-1, 1.2)
        ax.set_title(f"server, {label} loop")
        ax.set_xlabel("update")
        ax.legend(fontsize=7, loc="lower left")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_xlabel("measured staleness (updates)")
    axes[0].set_ylabel("fraction of applied gradients")
    axes[0].set_title("staleness distribution")
    axes[0].legend()
    axes[1].set_xlabel("update")
    axes[1].set_ylabel("smoothed training loss")
    axes[1].set_title("training loss (workers' batches)")
    axes[1].legend()
    axes[2].set_visible(False)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "exp3_parameter_server.png"), dpi=100)
    plt.close(fig)
    out("")


def gain_sweep():
    data = load("gain_sweep.json")
    if data is None:
        return
    out(f"### Gain sweep: closed-loop YellowFin, quadratic, M = {data['num_workers']} {data['staleness']} "
        f"staleness, {data['steps']} steps (second-half statistics)")
    out("")
    out("| gain | mean abs(mu* - sensed mu_T) | applied mu mean | applied mu std | target mean | at clamp | "
        "final smoothed loss |")
    out("|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        out(f"| {r['gain']:g} | {r['tracking_error']:.4f} | {r['applied_mean']:.3f} | {r['applied_std']:.4f} | "
            f"{r['target_mean']:.3f} | {r['at_clamp']:.2f} | {'diverged' if r['diverged'] else fmt(r['final_loss'], 5)} |")
    out("")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in data["rows"]:
        trace = r["trace"]
        ax.plot([t[0] for t in trace], [t[1] - t[3] for t in trace], label=f"gain {r['gain']:g}", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mu* - sensed mu_T")
    ax.set_title("controller tracking error by gain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "gain_sweep.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    for task in ("quadratic", "quadratic_noise_free", "char_lstm"):
        exp1(task)
    for task in ("fmnist_resnet", "char_lstm"):
        for seed in (0, 1):
            exp2(task, seed)
        exp2_overview(task)
    exp3()
    gain_sweep()
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
