"""Step time and memory of the optimizer step alone, YellowFin's paths beside its peers.

Gradients are preset, so only ``optimizer.step()`` is timed. For every model size and layout, all
optimizers share one set of parameters and gradients and are stepped in interleaved rounds, so a
busy machine slows them alike; the median over rounds is reported with ratios to fused Adam and to
momentum SGD. Writes ``benchmarks/step_speed.json``, ``docs/figures/step_speed.png`` and the table
in ``docs/performance.md`` (between its generated markers).

    python benchmarks/step_speed.py            # 1M, 10M, 50M parameters, two layouts (~20 min on 2 cores)
    python benchmarks/step_speed.py --quick    # 1M and 10M, fewer rounds
    python benchmarks/step_speed.py --device cuda   # YellowFin steps under set_sync_debug_mode("error")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.report import splice

ROOT = Path(__file__).resolve().parents[1]  # where the results and docs are written

LAYOUTS = {"large": 4, "small": 400}  # tensors per model: a few large ones, or hundreds of small ones
# Floats read + written per parameter per step, for the bandwidth model (docs/performance.md).
TRAFFIC = {"sgd": 5, "adam": 7, "yellowfin": 9}


def optimizers(params, device):
    """name -> (constructor, traffic family). Peers that are not installed are left out."""
    makers = {
        # the default, the scale-free tuner (docs/algorithm.md §8) in primal-average form (§11): the reference's
        # passes with more sums in pass 1, and x_0 to read; since docs/tuner.md §24 with the average of its gradient
        # points (one more lerp after the update), which "average=False" leaves out
        "yellowfin (loop)": (lambda: YellowFin(params, foreach=False), None),
        "yellowfin (foreach)": (lambda: YellowFin(params, foreach=True), None),
        "yellowfin (fused)": (lambda: YellowFin(params, fused=True), None),
        # the authors' algorithm (the bandwidth model's "yellowfin" row counts its traffic)
        "yellowfin reference (loop)": (lambda: YellowFin.reference_variant(params, foreach=False), "yellowfin"),
        "yellowfin reference (foreach)": (lambda: YellowFin.reference_variant(params, foreach=True), "yellowfin"),
        "yellowfin reference (fused)": (lambda: YellowFin.reference_variant(params, fused=True), "yellowfin"),
        # the iterate average (§10): one more lerp over x and xbar after the update (heavy ball's, as first measured)
        "yellowfin average=True (foreach)": (lambda: YellowFin(params, average=True, momentum_form="heavy_ball"), None),
        "yellowfin average=False (foreach)": (lambda: YellowFin(params, average=False), None),
        "yellowfin momentum_form=heavy_ball (foreach)": (lambda: YellowFin(params, momentum_form="heavy_ball"), None),
        # Adam's metric in heavy ball (as the table first measured it) and in its default form (docs/tuner.md §21)
        "yellowfin precondition=adam (loop)": (
            lambda: YellowFin(params, precondition="adam", momentum_form="heavy_ball", foreach=False), None),
        "yellowfin precondition=adam (foreach)": (
            lambda: YellowFin(params, precondition="adam", momentum_form="heavy_ball"), None),
        "yellowfin precondition=adam (fused)": (
            lambda: YellowFin(params, precondition="adam", momentum_form="heavy_ball", fused=True), None),
        "yellowfin precondition=adam primal_average (foreach)": (lambda: YellowFin(params, precondition="adam"), None),
        "yellowfin precondition=adam primal_average (fused)": (
            lambda: YellowFin(params, precondition="adam", fused=True), None),
        "sgd momentum (loop)": (lambda: torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=False), "sgd"),
        "sgd momentum (foreach)": (lambda: torch.optim.SGD(params, lr=1e-6, momentum=0.9, foreach=True), "sgd"),
        "adam (loop)": (lambda: torch.optim.Adam(params, lr=1e-6, foreach=False), "adam"),
        "adam (foreach)": (lambda: torch.optim.Adam(params, lr=1e-6, foreach=True), "adam"),
        "adam (fused)": (lambda: torch.optim.Adam(params, lr=1e-6, fused=True), "adam"),
    }
    try:
        import schedulefree

        def schedule_free():
            opt = schedulefree.AdamWScheduleFree(params, lr=1e-6)
            opt.train()
            return opt

        makers["schedule-free adamw"] = (schedule_free, None)
    except ImportError:
        print("schedulefree not installed: left out (pip install -e '.[bench]')")
    try:
        import prodigyopt

        makers["prodigy"] = (lambda: prodigyopt.Prodigy(params, lr=1.0), None)
    except ImportError:
        print("prodigyopt not installed: left out (pip install -e '.[bench]')")
    return makers


def make_params(count: int, tensors: int, device) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    size = count // tensors
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(size, generator=generator).to(device))
        p.grad = (1e-3 * torch.randn(size, generator=generator)).to(device)
        params.append(p)
    return params


class MemoryProbe:
    """Peak memory a step adds above what was allocated before it (bytes)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = _proc_status("VmHWM") - self.before


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def timed_step(opt, device, guard_sync: bool) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    guard = contextlib.nullcontext()
    if guard_sync:  # prove that YellowFin's step never waits for the device
        guard = _sync_debug_error()
    sync()
    start = time.perf_counter()
    with guard:
        opt.step()
    sync()
    return time.perf_counter() - start


@contextlib.contextmanager
def _sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def measure(count: int, layout: str, device, rounds: int, warmup: int) -> list[dict]:
    torch._dynamo.reset()  # each model compiles afresh, as in a training process (and no recompile limit)
    params = make_params(count, LAYOUTS[layout], device)
    rows = {}
    for name, (make, family) in optimizers(params, device).items():
        opt = make()
        start = time.perf_counter()
        for _ in range(warmup):  # the fused path compiles here
            opt.step()
        warm = time.perf_counter() - start
        rows[name] = dict(opt=opt, family=family, times=[], warmup_s=warm, peak=None)
    for round_index in range(rounds):
        for name, row in rows.items():
            guard = device.type == "cuda" and name.startswith("yellowfin") and "loop" not in name
            if round_index == 0:
                with MemoryProbe(device) as probe:
                    row["times"].append(timed_step(row["opt"], device, guard))
                row["peak"] = probe.peak
            else:
                row["times"].append(timed_step(row["opt"], device, guard))
    results = []
    for name, row in rows.items():
        results.append(dict(
            optimizer=name, family=row["family"], params=count, layout=layout, tensors=LAYOUTS[layout],
            median_ms=1e3 * statistics.median(row["times"]), min_ms=1e3 * min(row["times"]),
            rounds=rounds, warmup_s=row["warmup_s"], step_peak_bytes=row["peak"],
            state_bytes_per_param=state_bytes(row["opt"]) / count,
        ))
    by_name = {r["optimizer"]: r for r in results}
    for r in results:
        r["vs_fused_adam"] = r["median_ms"] / by_name["adam (fused)"]["median_ms"]
        r["vs_sgd_momentum"] = r["median_ms"] / by_name["sgd momentum (foreach)"]["median_ms"]
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| parameters | layout | optimizer | median step (ms) | vs fused Adam | vs momentum SGD (foreach) "
        "| state bytes/param | step peak extra (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = "" if r["step_peak_bytes"] is None else f"{r['step_peak_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {r['params'] / 1e6:g}M | {r['layout']} ({r['tensors']} tensors) | {r['optimizer']} "
            f"| {r['median_ms']:.1f} | {r['vs_fused_adam']:.2f} | {r['vs_sgd_momentum']:.2f} "
            f"| {r['state_bytes_per_param']:.1f} | {peak} |"
        )
    return "\n".join(lines)


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = sorted({r["layout"] for r in results})
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["optimizer"] for r in results))
    for ax, layout in zip(axes[0], layouts):
        for name in names:
            rows = sorted((r for r in results if r["layout"] == layout and r["optimizer"] == name),
                          key=lambda r: r["params"])
            style = "-" if name.startswith("yellowfin") else "--"
            ax.plot([r["params"] for r in rows], [r["median_ms"] for r in rows], style, marker="o", label=name,
                    linewidth=2.2 if name.startswith("yellowfin") else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("median step time (ms)")
        ax.set_title(f"{layout} layout ({LAYOUTS[layout]} tensors)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M and 10M parameters, 5 rounds")
    parser.add_argument("--sizes", type=float, nargs="+", help="parameter counts in millions")
    parser.add_argument("--rounds", type=int, help="timed steps per optimizer (interleaved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "step_speed.json")
    parser.add_argument("--no-docs", action="store_true", help="do not write the figure and docs table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(m * 1e6) for m in (args.sizes or ([1, 10] if args.quick else [1, 10, 50]))]
    rounds = args.rounds or (5 if args.quick else 9)

    load_before = os.getloadavg()
    results = []
    for layout in LAYOUTS:
        for count in sizes:
            started = time.perf_counter()
            rows = measure(count, layout, device, rounds, warmup=3)
            results.extend(rows)
            yf = next(r for r in rows if r["optimizer"] == "yellowfin (fused)")
            print(f"{count / 1e6:g}M {layout}: {time.perf_counter() - started:.0f} s; yellowfin (fused) "
                  f"{yf['median_ms']:.1f} ms = {yf['vs_fused_adam']:.2f}x fused Adam, "
                  f"{yf['vs_sgd_momentum']:.2f}x momentum SGD", flush=True)
    record = dict(
        command="python benchmarks/step_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     threads=torch.get_num_threads(), device=str(device),
                     device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()),
        load_average_before=load_before, load_average_after=os.getloadavg(),
        traffic_floats_per_param=TRAFFIC, results=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(table(results))
    print(f"wrote {args.out}")
    if not args.no_docs:
        figure(results, ROOT / "docs" / "figures" / "step_speed.png")
        doc = ROOT / "docs" / "performance.md"
        if doc.exists():
            body = (f"Command: `{record['command'].strip()}`, {record['date_utc']}, {record['machine']['device']} "
                    f"({record['machine']['cpus']} cores, {record['machine']['threads']} threads, torch "
                    f"{record['machine']['torch']}); load average {load_before[0]:.1f} before, "
                    f"{record['load_average_after'][0]:.1f} after.\n\n" + table(results))
            doc.write_text(splice(doc.read_text(), "step_speed", body))
            print(f"updated {doc} and docs/figures/step_speed.png")


if __name__ == "__main__":
    main()
