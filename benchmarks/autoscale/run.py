"""Run every autoscaler on every trace and write the results table, the target checks and the plots.

Usage, from the repository root:

    .venv/bin/python benchmarks/autoscale/run.py                  # all traces, 2 worker processes
    .venv/bin/python benchmarks/autoscale/run.py --traces bursts,ramp --no-plots
    .venv/bin/python benchmarks/autoscale/run.py --csv my_trace.csv  # add a trace of at,duration[,scheduled]

Results go to benchmarks/autoscale/results/: results.md (the tables of the README), results.json and one PNG
per trace with processes and latency over time. Plots need matplotlib; everything else is standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for entry in (ROOT / ".collections", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from benchmarks.autoscale import traces
from benchmarks.autoscale.controllers import HireFire, Judoscale, KedaHpa, OurPolicy
from benchmarks.autoscale.simulator import Controller, PoolConfig, SimulationResult, simulate

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = PoolConfig()
OURS = "ours"
KEDA = "KEDA/HPA (listLength 5)"
# Controllers drawn in the plots, besides ours.
PLOTTED = (KEDA, "Judoscale-style (up >10 s, down <2 s)", "HireFire-style job queue (ratio 10)")
KEDA_WORKER_FACTOR = 0.75


def controller_factories() -> list[Callable[[], Controller]]:
    """Return one factory per autoscaler, so each simulation starts from a fresh controller."""
    return [
        lambda: OurPolicy(CONFIG),
        lambda: KedaHpa(CONFIG),
        lambda: Judoscale(CONFIG, upscale_threshold=5.0, downscale_threshold=1.0),
        lambda: Judoscale(CONFIG, upscale_threshold=10.0, downscale_threshold=2.0),
        lambda: Judoscale(CONFIG, upscale_threshold=20.0, downscale_threshold=4.0),
        lambda: HireFire(CONFIG, strategy="job_queue", ratio=10.0),
        lambda: HireFire(CONFIG, strategy="latency", maximum_latency=10.0, minimum_latency=2.0),
    ]


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
    """Simulate one (trace, controller) pair; return its summary, its plot series and the wall time."""
    source, index = task
    started = time.perf_counter()
    trace = load_trace(source)
    result: SimulationResult = simulate(trace, controller_factories()[index](), CONFIG)
    series = {
        "time": list(result.series_time),
        "processes": [float(value) for value in result.series_processes],
        "latency": list(result.series_latency),
    }
    return trace.name, result.summary(), series, time.perf_counter() - started


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compare ours with each baseline on one trace, as the targets state them.

    Against KEDA/HPA: at most 0.75x its worker time at an equal or lower p95 wait. Against each Judoscale- and
    HireFire-style row: fewer minutes above target at equal or lower worker time. Every trace: no interrupted
    job.
    """
    by_name = {row["controller"]: row for row in rows}
    ours = by_name[OURS]
    checks: list[dict[str, Any]] = []
    keda = by_name.get(KEDA)
    if keda is not None:
        passed = (
            ours["worker_hours"] <= KEDA_WORKER_FACTOR * keda["worker_hours"] and ours["p95_wait"] <= keda["p95_wait"]
        )
        checks.append(
            {
                "against": KEDA,
                "passed": passed,
                "detail": f"worker time {ours['worker_hours'] / keda['worker_hours']:.2f}x, p95 wait "
                f"{ours['p95_wait']:.1f} s vs {keda['p95_wait']:.1f} s",
            }
        )
    for row in rows:
        if row["controller"] in (OURS, KEDA):
            continue
        passed = (
            ours["minutes_above_target"] < row["minutes_above_target"] and ours["worker_hours"] <= row["worker_hours"]
        )
        checks.append(
            {
                "against": row["controller"],
                "passed": passed,
                "detail": f"minutes above target {ours['minutes_above_target']:.1f} vs "
                f"{row['minutes_above_target']:.1f}, worker time {ours['worker_hours']:.1f} h vs "
                f"{row['worker_hours']:.1f} h",
            }
        )
    checks.append(
        {"against": "no interrupted job", "passed": ours["interrupted"] == 0, "detail": f"{ours['interrupted']}"}
    )
    return checks


def markdown(results: dict[str, list[dict[str, Any]]], descriptions: dict[str, str]) -> str:
    """Render the results and the target checks as Markdown tables."""
    lines = [
        "| trace | autoscaler | worker h | p50 wait s | p95 wait s | p99 wait s | min above target | actions "
        "| reversals | interrupted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for trace, rows in results.items():
        for row in rows:
            lines.append(
                f"| {trace} | {row['controller']} | {row['worker_hours']:.1f} | {row['p50_wait']:.1f} | "
                f"{row['p95_wait']:.1f} | {row['p99_wait']:.1f} | {row['minutes_above_target']:.1f} | "
                f"{row['actions']} | {row['reversals']} | {row['interrupted']} |"
            )
    lines += ["", "| trace | target | met | figures |", "|---|---|---|---|"]
    for trace, rows in results.items():
        for check in check_targets(rows):
            met = "yes" if check["passed"] else "**no**"
            lines.append(f"| {trace} | {check['against']} | {met} | {check['detail']} |")
    lines += ["", "| trace | description | jobs |", "|---|---|---:|"]
    for trace, rows in results.items():
        lines.append(f"| {trace} | {descriptions[trace]} | {rows[0]['arrived']} |")
    return "\n".join(lines) + "\n"


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
    tasks = [(source, index) for source in sources for index in range(len(controller_factories()))]

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
    table = markdown(results, descriptions)
    (arguments.out / "results.md").write_text(table, encoding="utf-8")
    if not arguments.no_plots:
        for trace in results:
            plot(trace, series[trace], CONFIG.target_latency, arguments.out / f"{trace}.png")
    print(table)
    wall = time.perf_counter() - started
    print(f"{len(tasks)} simulations, {cpu_seconds:.0f} s of simulation, {wall:.0f} s wall time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
