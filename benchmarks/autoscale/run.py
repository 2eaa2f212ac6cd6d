"""Run every autoscaler on every trace, check the targets and write the tables and the plots.

Usage, from the repository root:

    .venv/bin/python benchmarks/autoscale/run.py                  # all traces, 2 worker processes
    .venv/bin/python benchmarks/autoscale/run.py --traces bursts,ramp --no-plots
    .venv/bin/python benchmarks/autoscale/run.py --csv my_trace.csv  # add a trace of at,duration[,scheduled]

Results go to benchmarks/autoscale/results/: results.md (every row and every check), results.json and one PNG
per trace with processes and latency over time. The script prints one PASS or FAIL line per trace and target.
It exits with status 0 either way, because the targets are measurements, not a test. Plots need matplotlib, everything
else is standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for entry in (ROOT / ".collections", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from benchmarks.autoscale import traces
from benchmarks.autoscale.controllers import HireFire, InstantBound, Judoscale, KedaHpa, OurPolicy, ReactiveBound
from benchmarks.autoscale.simulator import Controller, PoolConfig, SimulationResult, simulate
from benchmarks.autoscale.targets import (
    BOUND,
    HIREFIRE_LATENCY,
    HIREFIRE_QUEUE,
    JUDOSCALE,
    KEDA,
    KEDA_SWEEP,
    OURS,
    OURS_INTERRUPTING,
    OURS_PARTIAL,
    OURS_SLOW,
    VARIANTS,
    check_targets,
)

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = PoolConfig()
# Sweep points of the tunable baselines. Judoscale-style and HireFire-style latency: the upscale threshold in
# seconds, with the downscale threshold at a fifth of it. HireFire-style job queue: jobs per process. A latency
# threshold alone cannot make those controllers spend much more worker time, because they scale in whenever latency
# is low, so they also run with a minimum of 2 to 8 processes at one or two thresholds (the floors).
JUDOSCALE_THRESHOLDS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
JUDOSCALE_FLOOR_THRESHOLDS = (1.0, 5.0)
HIREFIRE_RATIOS = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0)
HIREFIRE_LATENCIES = (0.5, 2.0, 10.0)
HIREFIRE_FLOOR_LATENCIES = (2.0,)
FLOORS = (2, 3, 4, 5, 6, 8)
# Process counts that the reactive bound keeps outside bursts; see ReactiveBound.
BOUND_BASES = (2, 3, 4, 5, 6, 8)
# listLength values of the KEDA/HPA rows that run for information on bursts, besides the default of 5.
KEDA_LIST_LENGTHS = (10.0, 20.0, 40.0)
# Process counts that the instant bound keeps outside bursts; see InstantBound.
INSTANT_BOUND_BASES = (2, 3, 4, 5)
# Rows drawn in the plots besides ours: the default settings of each baseline.
PLOTTED = (
    "KEDA/HPA (listLength 5)",
    "Judoscale-style (up >10 s, down <2 s)",
    "HireFire-style job queue (ratio 10)",
)


@dataclass(frozen=True)
class Entry:
    """One autoscaler of the benchmark: its family (see targets.py), a factory, its pool and the traces it runs on.

    The pool differs from CONFIG only in a baseline's floor: its minimum and its processes at the start.
    """

    family: str
    build: Callable[[PoolConfig], Controller]
    config: PoolConfig = CONFIG
    only: tuple[str, ...] = ()


def floor_config(floor: int) -> PoolConfig:
    return replace(CONFIG, min_processes=floor, initial_processes=max(floor, CONFIG.initial_processes))


def judoscale(threshold: float) -> Callable[[PoolConfig], Controller]:
    return lambda config: Judoscale(config, upscale_threshold=threshold, downscale_threshold=threshold / 5)


def hirefire_queue(ratio: float) -> Callable[[PoolConfig], Controller]:
    return lambda config: HireFire(config, strategy="job_queue", ratio=ratio)


def reactive_bound(base: int) -> Callable[[PoolConfig], Controller]:
    return lambda config: ReactiveBound(config, base=base)


def keda(list_length: float) -> Callable[[PoolConfig], Controller]:
    return lambda config: KedaHpa(config, list_length=list_length)


def instant_bound(base: int) -> Callable[[PoolConfig], Controller]:
    return lambda config: InstantBound(config, base=base)


def hirefire_latency(threshold: float) -> Callable[[PoolConfig], Controller]:
    return lambda config: HireFire(config, strategy="latency", maximum_latency=threshold, minimum_latency=threshold / 5)


def entries() -> list[Entry]:
    """Return every autoscaler, so that each simulation starts from a fresh controller."""
    rows = [
        Entry(OURS, lambda config: OurPolicy(config)),
        Entry(OURS_SLOW, lambda config: OurPolicy(config, interval=60.0)),
        Entry(OURS_PARTIAL, lambda config: OurPolicy(config, full_signals=False, name=OURS_PARTIAL)),
        Entry(
            OURS_INTERRUPTING,
            lambda config: OurPolicy(config, hide_job_ages=True, name=OURS_INTERRUPTING),
            only=("long_jobs",),
        ),
        Entry(KEDA, lambda config: KedaHpa(config)),
    ]
    rows += [Entry(JUDOSCALE, judoscale(threshold)) for threshold in JUDOSCALE_THRESHOLDS]
    rows += [
        Entry(JUDOSCALE, judoscale(threshold), floor_config(floor))
        for threshold in JUDOSCALE_FLOOR_THRESHOLDS
        for floor in FLOORS
    ]
    rows += [Entry(HIREFIRE_QUEUE, hirefire_queue(ratio)) for ratio in HIREFIRE_RATIOS]
    rows += [Entry(HIREFIRE_LATENCY, hirefire_latency(threshold)) for threshold in HIREFIRE_LATENCIES]
    rows += [
        Entry(HIREFIRE_LATENCY, hirefire_latency(threshold), floor_config(floor))
        for threshold in HIREFIRE_FLOOR_LATENCIES
        for floor in FLOORS
    ]
    rows += [Entry(KEDA_SWEEP, keda(length), only=("bursts",)) for length in KEDA_LIST_LENGTHS]
    rows += [Entry(BOUND, reactive_bound(base), only=("bursts",)) for base in BOUND_BASES]
    rows += [Entry(BOUND, instant_bound(base), only=("bursts",)) for base in INSTANT_BOUND_BASES]
    return rows


_TRACE_CACHE: dict[str, traces.Trace] = {}


def load_trace(source: str) -> traces.Trace:
    """Return a generated trace by name, or a CSV trace by path, built once per worker process."""
    if source not in _TRACE_CACHE:
        if source in traces.GENERATORS:
            _TRACE_CACHE[source] = traces.GENERATORS[source]()
        else:
            _TRACE_CACHE[source] = traces.load_csv(source)
    return _TRACE_CACHE[source]


def run_one(task: tuple[str, int]) -> tuple[str, dict[str, Any], dict[str, list[float]], float]:
    """Simulate one (trace, autoscaler) pair; return its summary, its plot series and the wall time."""
    source, index = task
    started = time.perf_counter()
    trace = load_trace(source)
    entry = entries()[index]
    result: SimulationResult = simulate(trace, entry.build(entry.config), entry.config)
    summary = {"family": entry.family, **result.summary()}
    series = {
        "time": list(result.series_time),
        "processes": [float(value) for value in result.series_processes],
        "latency": list(result.series_latency),
    }
    return trace.name, summary, series, time.perf_counter() - started


def rows_markdown(results: dict[str, list[dict[str, Any]]], families: Sequence[str] | None = None) -> str:
    """Render the result rows of the given families (all when None) as one Markdown table."""
    lines = [
        "| trace | autoscaler | worker h | p50 wait s | p95 wait s | p99 wait s | min above target | actions "
        "| reversals | interrupted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for trace, rows in results.items():
        for row in rows:
            if families is not None and row["family"] not in families:
                continue
            lines.append(
                f"| {trace} | {row['controller']} | {row['worker_hours']:.1f} | {row['p50_wait']:.1f} | "
                f"{row['p95_wait']:.1f} | {row['p99_wait']:.1f} | {row['minutes_above_target']:.1f} | "
                f"{row['actions']} | {row['reversals']} | {row['interrupted']} |"
            )
    return "\n".join(lines)


def markdown(results: dict[str, list[dict[str, Any]]], descriptions: dict[str, str]) -> str:
    """Render the target checks, the rows of ours, its variants, KEDA/HPA and the bound, then every row."""
    lines = ["## Target checks", "", checks_markdown(results)]
    lines += ["", "## Ours, its variants, KEDA/HPA and the bounds", ""]
    lines += [rows_markdown(results, (OURS, *VARIANTS, KEDA, KEDA_SWEEP, BOUND))]
    for variant in VARIANTS:
        lines += ["", f"## Checks of the variant {variant}, for information", "", checks_markdown(results, variant)]
    lines += ["", "## Traces", "", "| trace | description | jobs |", "|---|---|---:|"]
    for trace, rows in results.items():
        lines.append(f"| {trace} | {descriptions[trace]} | {rows[0]['arrived']} |")
    lines += ["", "## Every row", "", rows_markdown(results)]
    return "\n".join(lines) + "\n"


def checks_markdown(results: dict[str, list[dict[str, Any]]], subject: str = OURS) -> str:
    """Render the target checks of `subject` on every trace as one Markdown table."""
    lines = ["| trace | target | against | result | figures |", "|---|---|---|---|---|"]
    for trace, rows in results.items():
        if not any(row["family"] == subject for row in rows):
            continue
        for check in check_targets(rows, subject=subject):
            verdict = "PASS" if check.passed else "**FAIL**"
            lines.append(f"| {trace} | {check.target} | {check.against} | {verdict} | {check.detail} |")
    return "\n".join(lines)


def plot(trace: str, series: dict[str, dict[str, list[float]]], target: float, output: Path) -> None:
    """Draw processes and latency over time for ours and the plotted baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for name in (OURS, *PLOTTED):
        if name not in series:
            continue
        hours = [value / 3600.0 for value in series[name]["time"]]
        width = 1.6 if name == OURS else 0.9
        top.step(hours, series[name]["processes"], where="post", linewidth=width, label=name)
        bottom.plot(hours, series[name]["latency"], linewidth=width, label=name)
    bottom.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:g} s")
    top.set_ylabel("processes (paid for)")
    bottom.set_ylabel("oldest waiting job, s")
    bottom.set_yscale("symlog", linthresh=10.0)
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("hours")
    top.set_title(f"{trace}: processes and latency over time")
    top.legend(loc="upper left", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def print_verdicts(results: dict[str, list[dict[str, Any]]]) -> None:
    """Print one PASS or FAIL line per trace and target, the count per target, then the variants' checks."""
    counts: dict[str, list[int]] = {}
    for trace, rows in results.items():
        for check in check_targets(rows):
            verdict = "PASS" if check.passed else "FAIL"
            print(f"{verdict} {trace}: {check.target} against {check.against}: {check.detail}")
            tally = counts.setdefault(check.target, [0, 0])
            tally[0] += check.passed
            tally[1] += 1
    for target, (passed, total) in counts.items():
        print(f"{target}: {passed} of {total} checks pass")
    for trace, rows in results.items():
        for variant in VARIANTS:
            if any(row["family"] == variant for row in rows):
                verdicts = [
                    f"{check.target.split('.')[0]} {check.against}: {'pass' if check.passed else 'fail'}"
                    for check in check_targets(rows, subject=variant)
                ]
                print(f"info {trace}, {variant}: " + "; ".join(verdicts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", default=",".join(traces.GENERATORS), help="comma-separated generated traces")
    parser.add_argument("--csv", action="append", default=[], help="CSV trace to add (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: results/ here)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    arguments = parser.parse_args(argv)

    sources = [name for name in arguments.traces.split(",") if name] + list(arguments.csv)
    unknown = [name for name in sources if name not in traces.GENERATORS and not Path(name).is_file()]
    if unknown:
        parser.error(f"unknown traces {unknown}; choose from {sorted(traces.GENERATORS)} or give a CSV file")
    all_entries = entries()
    tasks = [
        (source, index)
        for source in sources
        for index, entry in enumerate(all_entries)
        if not entry.only or source in entry.only
    ]

    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    series: dict[str, dict[str, dict[str, list[float]]]] = {}
    cpu_seconds = 0.0
    with ProcessPoolExecutor(max_workers=arguments.workers) as executor:
        for trace, summary, samples, seconds in executor.map(run_one, tasks):
            results.setdefault(trace, []).append(summary)
            series.setdefault(trace, {})[summary["controller"]] = samples
            cpu_seconds += seconds
    descriptions = {name: load_trace(source).description for name, source in zip(results, sources, strict=True)}

    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (arguments.out / "results.md").write_text(markdown(results, descriptions), encoding="utf-8")
    if not arguments.no_plots:
        for trace in results:
            plot(trace, series[trace], CONFIG.target_latency, arguments.out / f"{trace}.png")
    print_verdicts(results)
    wall = time.perf_counter() - started
    print(f"{len(tasks)} simulations, {cpu_seconds:.0f} s of simulation, {wall:.0f} s wall time")
    print(f"Tables: {arguments.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
