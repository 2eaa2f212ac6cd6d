"""The benchmark's targets and how a run's rows are checked against them.

Every result row carries a `family`. Ours runs once per trace at the check interval that the targets use, and
once more at 60 s for information. KEDA/HPA runs with its default listLength. The Judoscale-style and HireFire-style
families each run as a sweep over their main setting, because a latency threshold or a jobs-per-process ratio
trades worker time for latency, and "fewer minutes above target at equal worker time" needs the baseline at our
worker time.

The three targets, per trace:

1. KEDA/HPA: our worker time is at most 0.75 times KEDA/HPA's, and our p95 wait is at most KEDA/HPA's.
2. Each Judoscale-style and HireFire-style family: our minutes above target are fewer than the family's frontier
   at our worker time. The frontier is the family's sweep points that no other point of the family beats or
   equals on both worker time and minutes above target, joined by straight lines, and flat to the right of its
   last point. It gives the fewest minutes above target that the baseline reaches, tuned, at a given worker time.
   If our worker time is above every sweep point's, the baseline cannot be compared at equal worker time and the
   check fails. If it is below every frontier point's, the cheapest frontier point is the reference.
3. Our policy interrupts no job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OURS = "ours"
OURS_SLOW = "ours (60 s runs)"
KEDA = "KEDA/HPA"
JUDOSCALE = "Judoscale-style"
HIREFIRE_QUEUE = "HireFire-style job queue"
HIREFIRE_LATENCY = "HireFire-style latency"
BOUND = "reactive bound"
# Families compared by target 2, in the order of the tables.
FAMILIES = (JUDOSCALE, HIREFIRE_QUEUE, HIREFIRE_LATENCY)
KEDA_WORKER_FACTOR = 0.75

TARGET_KEDA = "1. 0.75x KEDA/HPA worker time, p95 no higher"
TARGET_FRONTIER = "2. fewer minutes above target at equal worker time"
TARGET_INTERRUPTED = "3. no interrupted job"


@dataclass(frozen=True)
class Check:
    """One target checked on one trace.

    Attributes:
        target: which target (one of the TARGET_ names).
        against: the baseline row or family compared with, or "ours" for target 3.
        passed: whether the target holds.
        detail: the figures behind the verdict, in one line.
    """

    target: str
    against: str
    passed: bool
    detail: str


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Return the (worker hours, minutes above target) points that no other point beats or equals on both.

    The result is sorted by worker time, and its minutes fall strictly from one point to the next.
    """
    kept: list[tuple[float, float]] = []
    for worker, minutes in sorted(points):
        if kept and minutes >= kept[-1][1]:
            continue
        kept.append((worker, minutes))
    return kept


def minutes_at(points: Sequence[tuple[float, float]], worker: float) -> float | None:
    """Return the frontier's minutes above target at `worker` hours; None when every point costs less."""
    if not points or worker > max(point[0] for point in points):
        return None
    line = frontier(points)
    if worker <= line[0][0]:
        return line[0][1]
    for (left_worker, left_minutes), (right_worker, right_minutes) in zip(line, line[1:], strict=False):
        if left_worker <= worker <= right_worker:
            share = (worker - left_worker) / (right_worker - left_worker)
            return left_minutes + share * (right_minutes - left_minutes)
    return line[-1][1]


def check_keda(ours: Mapping[str, Any], keda: Mapping[str, Any]) -> Check:
    ratio = ours["worker_hours"] / keda["worker_hours"]
    passed = ratio <= KEDA_WORKER_FACTOR and ours["p95_wait"] <= keda["p95_wait"]
    detail = (
        f"worker time {ratio:.2f}x ({ours['worker_hours']:.1f} h vs {keda['worker_hours']:.1f} h), "
        f"p95 wait {ours['p95_wait']:.1f} s vs {keda['p95_wait']:.1f} s"
    )
    return Check(TARGET_KEDA, keda["controller"], passed, detail)


def check_family(ours: Mapping[str, Any], family: str, rows: Sequence[Mapping[str, Any]]) -> Check:
    points = [(row["worker_hours"], row["minutes_above_target"]) for row in rows]
    worker, minutes = ours["worker_hours"], ours["minutes_above_target"]
    reference = minutes_at(points, worker)
    if reference is None:
        most = max(point[0] for point in points)
        detail = f"ours uses {worker:.1f} h, more than every sweep point (at most {most:.1f} h)"
        return Check(TARGET_FRONTIER, family, False, detail)
    detail = (
        f"{minutes:.1f} min vs {reference:.1f} min on the frontier at {worker:.1f} h "
        f"(sweep {min(point[0] for point in points):.1f} to {max(point[0] for point in points):.1f} h)"
    )
    return Check(TARGET_FRONTIER, family, minutes < reference, detail)


def check_targets(rows: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Check the targets on one trace's rows; a family or baseline missing from the rows is skipped."""
    ours = next(row for row in rows if row["family"] == OURS)
    checks: list[Check] = []
    keda = next((row for row in rows if row["family"] == KEDA), None)
    if keda is not None:
        checks.append(check_keda(ours, keda))
    for family in FAMILIES:
        members = [row for row in rows if row["family"] == family]
        if members:
            checks.append(check_family(ours, family, members))
    checks.append(Check(TARGET_INTERRUPTED, OURS, ours["interrupted"] == 0, f"{ours['interrupted']} interrupted"))
    return checks
