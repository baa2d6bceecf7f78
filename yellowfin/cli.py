"""The `yellowfin` command line (also `python -m yellowfin`): demo, bench, ablate, report.

Heavy imports happen inside the subcommands so that `yellowfin --help` answers at once."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from yellowfin.bench.errors import BadInputError

EXIT_DATA_MISSING = 1
EXIT_BAD_INPUT = 2  # as argparse exits for a malformed command line
EXIT_INTERRUPTED = 130
SEED_LIMIT = 2**32  # seeds must fit every generator the benchmarks seed (torch, numpy)


def _parsed(text: str, convert: Callable[[str], Any], allowed: Callable[[Any], bool], unparsable: str,
            out_of_range: str) -> Any:
    """An argparse type: ``convert(text)`` if it converts and is ``allowed``, else the matching error."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{unparsable}, got {text!r}") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"{out_of_range}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _parsed(text, int, lambda value: value >= 1, "expected a positive integer", "expected a positive integer")


def _seed(text: str) -> int:
    return _parsed(text, int, lambda value: 0 <= value < SEED_LIMIT, "expected an integer seed",
                   f"a seed must be an integer from 0 to {SEED_LIMIT - 1}")


def _positive_minutes(text: str) -> float:
    return _parsed(text, float, lambda value: math.isfinite(value) and value > 0, "expected a number of minutes",
                   "minutes must be a positive finite number")


def _demo(args: argparse.Namespace) -> int:
    from yellowfin.bench.demo import run_demo

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_demo(minutes=args.minutes, data_dir=args.data_dir, out_dir=args.out, seed=args.seed,
                      max_steps=args.steps, progress=not args.no_progress)
    print()
    print(result.table)
    print()
    print(f"Figure (loss curves, tuned mu and alpha): {result.figure}")
    print(f"Numbers: {result.summary_path}")
    return 0


def _task_options(args: argparse.Namespace) -> dict[str, dict]:
    """The data options given on the command line, for every task that takes them (Task.data_options)."""
    from yellowfin.bench.tasks import TASKS

    given = {"data_dir": args.data_dir, "text_path": args.text_path, "cache_dir": args.cache_dir}
    return {name: {option: given[option] for option in getattr(factory, "data_options", ()) if given[option]}
            for name, factory in TASKS.items()}


def _bench(args: argparse.Namespace) -> int:
    from yellowfin.bench import results as results_io
    from yellowfin.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS
    from yellowfin.bench.runner import DEFAULT_SEEDS, QUICK_SEEDS, SuiteConfig, run_suite
    from yellowfin.bench.tasks import TASKS, get_task

    if args.list:
        print("tasks (default steps / quick steps):")
        for name in TASKS:
            task = get_task(name)
            print(f"  {name:14s} {task.default_steps:5d} / {task.quick_steps:4d}   metric: {task.metric}")
        print("optimizers:")
        for spec in OPTIMIZERS.values():
            extra = "" if spec.available() else f"   [not installed: pip install {spec.pip_name}]"
            print(f"  {spec.name:18s} {spec.kind:8s} {spec.label}{extra}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for kind, given, known in (("task", args.tasks, TASKS), ("optimizer", args.optimizers or (), OPTIMIZERS)):
        unknown = [name for name in given if name not in known]
        if unknown:
            print(f"yellowfin bench: error: unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                  f"choose from {', '.join(known)} (see `yellowfin bench --list`)", file=sys.stderr)
            return EXIT_BAD_INPUT
    results_dir = Path(args.results or (results_io.QUICK_RESULTS_DIR if args.quick else results_io.DEFAULT_RESULTS_DIR))
    config = SuiteConfig(
        tasks=args.tasks or list(TASKS),
        optimizers=args.optimizers or list(DEFAULT_OPTIMIZERS),
        seeds=args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS),
        steps=args.steps,
        quick=args.quick,
        results_dir=results_dir,
        task_options=_task_options(args),
        progress=not args.no_progress,
        command=args.command_line,
        peers_on_every_seed=args.peers_on_every_seed,
    )
    outcome = _run_resumable(run_suite, config, results_dir)
    if outcome is None:
        return EXIT_INTERRUPTED
    for name, message in outcome.unavailable.items():
        print(f"not run: {name}: {message}")
    print(f"Next: yellowfin report --results {results_dir}")
    return EXIT_DATA_MISSING if outcome.missing_data else 0


def _run_resumable(run: Callable, config, results_dir) -> Any:
    """``run(config)`` (the suite or an ablation) and its summary; None, after saying how to resume, on Ctrl-C."""
    try:
        outcome = run(config)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Finished runs are kept in {results_dir}; run the same command again to resume.",
              file=sys.stderr)
        return None
    print(f"{len(outcome.ran)} runs done, {len(outcome.skipped)} already there; results in {results_dir}")
    for task, message in outcome.missing_data.items():
        print(f"not run: {task}: {message}", file=sys.stderr)
    return outcome


def _ablate(args: argparse.Namespace) -> int:
    from yellowfin.bench import ablation
    from yellowfin.bench import results as results_io
    from yellowfin.bench.optimizers import OPTIMIZERS
    from yellowfin.bench.runner import DEFAULT_SEEDS
    from yellowfin.bench.tasks import TASKS
    from yellowfin.bench.variants import VARIANTS

    if args.list:
        print("variants (yellowfin/bench/variants.py):")
        for variant in VARIANTS.values():
            print(f"  {variant.name:18s} {variant.description}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for kind, given, known in (("task", args.tasks, TASKS), ("variant", args.variants or (), VARIANTS),
                               ("optimizer", args.baselines or (), OPTIMIZERS)):
        unknown = [name for name in given if name not in known]
        if unknown:
            print(f"yellowfin ablate: error: unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                  f"choose from {', '.join(known)} (see `yellowfin ablate --list`)", file=sys.stderr)
            return EXIT_BAD_INPUT
    default_dir = ablation.QUICK_ABLATION_DIR if args.quick else ablation.DEFAULT_ABLATION_DIR
    results_dir = Path(args.results or default_dir)
    suite_dir = results_io.QUICK_RESULTS_DIR if args.quick else results_io.DEFAULT_RESULTS_DIR
    baseline_dirs = [Path(d) for d in args.baseline_results] if args.baseline_results is not None else [suite_dir]
    config = ablation.AblationConfig(
        tasks=args.tasks or list(TASKS),
        variants=args.variants or list(ablation.DEFAULT_VARIANTS),
        seeds=args.seeds or (ablation.QUICK_ABLATION_SEEDS if args.quick else DEFAULT_SEEDS),
        steps=args.steps,
        quick=args.quick,
        results_dir=results_dir,
        baselines=args.baselines or (),
        task_options=_task_options(args),
        progress=not args.no_progress,
        command=args.command_line,
    )
    outcome = _run_resumable(ablation.run_ablation, config, results_dir)
    if outcome is None:
        return EXIT_INTERRUPTED
    table, path = ablation.write_table(results_dir, baseline_dirs)
    print()
    print(table)
    print(f"Table written to {path}")
    return EXIT_DATA_MISSING if outcome.missing_data else 0


def _report(args: argparse.Namespace) -> int:
    from yellowfin.bench import results as results_io
    from yellowfin.bench.report import write_report

    dirs = args.results or [d for d in (results_io.DEFAULT_RESULTS_DIR, results_io.QUICK_RESULTS_DIR) if d.is_dir()]
    if not dirs and args.no_robustness:
        print("no results directories found; run `yellowfin bench` first", file=sys.stderr)
        return 1
    written = write_report(dirs, markdown=args.out, figures_dir=args.figures, robustness=not args.no_robustness)
    for invalid in written["skipped"]:
        print(f"warning: skipped {invalid}", file=sys.stderr)
    print(f"wrote {written['markdown']} ({', '.join(written['sections']) or 'no results'})")
    for figure in written["figures"]:
        print(f"  {figure}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser, seeds: str, quick: str, results: str, listing: str) -> None:
    """The options that bench and ablate share: both run tasks x optimizers x seeds through the same runner."""
    parser.add_argument("--seeds", nargs="+", type=_seed, help=seeds)
    parser.add_argument("--steps", type=_positive_int, help="steps per run (default: each task's budget)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--results", help=results)
    parser.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--text-path", help="plain-text file to use instead of the King James Bible")
    parser.add_argument("--cache-dir", help="where to cache the Bible text (default: no cache)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help=listing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yellowfin", description="YellowFin: momentum and learning rate for SGD, "
                                     "tuned while training runs. Demo, benchmarks and reports.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="YellowFin vs Adam on Fashion-MNIST for a few minutes, with a figure")
    demo.add_argument("--minutes", type=_positive_minutes, default=3.0, help="wall-clock budget (default 3)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="stop after this many steps per optimizer")
    demo.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (default: the Debian package's)")
    demo.add_argument("--out", default="yellowfin-demo", help="where the figure and numbers go")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)

    bench = sub.add_parser("bench", help="run benchmark tasks (resumes: finished runs are skipped)")
    bench.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to run (default: all; see --list)")
    bench.add_argument("--optimizers", nargs="+", metavar="NAME", help="optimizers to compare (default: all)")
    _add_run_options(bench, seeds="seeds (default 0 1 2; with --quick: 0)",
                     quick="small budgets, one seed: the whole suite in minutes",
                     results="results directory (default benchmarks/results, or benchmarks/results-quick)",
                     listing="list tasks and optimizers, then exit")
    bench.add_argument("--peers-on-every-seed", action="store_true",
                       help="run the tuning-free peers on every seed (default: the first seed only, to save time)")
    bench.set_defaults(handler=_bench)

    ablate = sub.add_parser("ablate", help="YellowFin variants x tasks x seeds, and their table (resumes)")
    ablate.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to run (default: all; see bench --list)")
    ablate.add_argument("--variants", nargs="+", metavar="NAME",
                        help="variants to compare (default: reference paper control; see --list)")
    ablate.add_argument("--baselines", nargs="+", metavar="NAME",
                        help="suite optimizers to run beside them, e.g. sgd_momentum (its learning-rate grid)")
    ablate.add_argument("--baseline-results", nargs="*", metavar="DIR",
                        help="where else to find tuned momentum SGD runs for the speedup column "
                             "(default: benchmarks/results, or benchmarks/results-quick with --quick)")
    _add_run_options(ablate, seeds="seeds (default 0 1 2; with --quick: 0 1)",
                     quick="screening: each task's quick budget, two seeds",
                     results="results directory (default benchmarks/results-ablation[-quick])",
                     listing="list the registered variants, then exit")
    ablate.set_defaults(handler=_ablate)

    report = sub.add_parser("report", help="tables and figures from results, into docs/benchmarks.md")
    report.add_argument("--results", nargs="+", type=Path,
                        help="results directories (default: benchmarks/results and benchmarks/results-quick)")
    report.add_argument("--out", type=Path, default=Path("docs") / "benchmarks.md", help="markdown file to update")
    report.add_argument("--figures", type=Path, default=Path("docs") / "figures", help="figure directory")
    report.add_argument("--no-robustness", action="store_true", help="skip the momentum-robustness figure")
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["yellowfin", *argv])
    try:
        return args.handler(args)
    except BadInputError as exc:  # the user's data or directories, not a bug: one line, no traceback
        print(f"yellowfin {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
