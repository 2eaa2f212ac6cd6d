"""Run the bursts trace with every burst moved by 0 to 25 s, to show how much the burst phase decides p95 wait.

A controller that runs every T seconds detects a burst between 0 and T seconds after it starts, depending on where
the burst falls between two runs. The bursts trace has only three bursts, so their phase against each controller's
runs weighs on its p95 wait. This script moves all three bursts together and prints, per shift, the worker time
and p95 wait of KEDA/HPA, of our policy and of the reactive bound with 2 and 4 processes between bursts.

Usage, from the repository root:

    .venv/bin/python benchmarks/autoscale/burst_phases.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for entry in (ROOT / ".collections", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from benchmarks.autoscale import traces
from benchmarks.autoscale.controllers import KedaHpa, OurPolicy, ReactiveBound
from benchmarks.autoscale.simulator import Controller, PoolConfig, simulate

CONFIG = PoolConfig()
SHIFTS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
CONTROLLERS: dict[str, Callable[[], Controller]] = {
    "KEDA/HPA": lambda: KedaHpa(CONFIG),
    "ours": lambda: OurPolicy(CONFIG),
    "bound, base 2": lambda: ReactiveBound(CONFIG, base=2),
    "bound, base 4": lambda: ReactiveBound(CONFIG, base=4),
}


def run_one(task: tuple[float, str]) -> tuple[float, str, float, float]:
    """Simulate one controller on the bursts trace moved by `shift`; return worker hours and p95 wait."""
    shift, name = task
    result = simulate(traces.bursts(shift=shift), CONTROLLERS[name](), CONFIG)
    return shift, name, result.worker_seconds / 3600.0, result.percentile_wait(0.95)


def main() -> int:
    tasks = [(shift, name) for shift in SHIFTS for name in CONTROLLERS]
    with ProcessPoolExecutor(max_workers=2) as executor:
        results = list(executor.map(run_one, tasks))
    header = " | ".join(f"{name}: worker h, p95 s" for name in CONTROLLERS)
    print(f"| shift s | {header} |")
    print("|---:|" + "---:|" * len(CONTROLLERS))
    for shift in SHIFTS:
        cells = [f"{worker:.1f}, {p95:.1f}" for moved, _, worker, p95 in results if moved == shift]
        print(f"| {shift:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
