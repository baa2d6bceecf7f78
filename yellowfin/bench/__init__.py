"""Benchmarks and the command line: tasks on real data, the runner, reports and figures.

The only part of the package that knows about data sets, plots and progress bars."""
