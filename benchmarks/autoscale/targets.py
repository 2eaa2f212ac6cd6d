"""The benchmark's targets and how a run's rows are checked against them.

Every result row carries a `family`. Ours runs once per trace at the check interval that the targets use, and its
variants (VARIANTS) run for information. KEDA/HPA runs with its default listLength. The Judoscale-style and
HireFire-style families each run as a sweep of settings (see run.py), because a latency threshold, a jobs-per-process
ratio or a minimum process count trades worker time for latency, and "fewer minutes above target at equal worker
time" needs the baseline at our worker time.

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

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OURS = "ours"
OURS_SLOW = "ours (60 s runs)"
OURS_PARTIAL = "ours (no upcoming, no job ages)"
OURS_INTERRUPTING = "ours (job ages hidden, so it may interrupt)"
# Variants of ours that run for information: their checks are printed but are not the targets' verdict.
VARIANTS = (OURS_SLOW, OURS_PARTIAL, OURS_INTERRUPTING)
KEDA = "KEDA/HPA"
JUDOSCALE = "Judoscale-style"
HIREFIRE_QUEUE = "HireFire-style job queue"
HIREFIRE_LATENCY = "HireFire-style latency"
BOUND = "reactive bound"
# KEDA/HPA with other listLength values, on bursts only and for information: target 1 compares with listLength 5.
KEDA_SWEEP = "KEDA/HPA listLength sweep"
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


@dataclass(frozen=True)
class Point:
    """One sweep point of a baseline family: worker hours, minutes above target and the row's name."""

    worker: float
    minutes: float
    name: str


def frontier(points: Sequence[Point]) -> list[Point]:
    """Return the points that no other point beats or equals on both worker time and minutes above target.

    The result is sorted by worker time, and its minutes fall strictly from one point to the next.
    """
    kept: list[Point] = []
    for point in sorted(points, key=lambda item: (item.worker, item.minutes)):
        if kept and point.minutes >= kept[-1].minutes:
            continue
        kept.append(point)
    return kept


def minutes_at(points: Sequence[Point], worker: float) -> tuple[float, list[Point]] | None:
    """Return the frontier's minutes above target at `worker` hours and the frontier points it comes from.

    Returns None when every point costs less than `worker`, because the family then has no setting at that
    worker time.
    """
    if not points or worker > max(point.worker for point in points):
        return None
    line = frontier(points)
    if worker <= line[0].worker:
        return line[0].minutes, [line[0]]
    for left, right in itertools.pairwise(line):
        if left.worker <= worker <= right.worker:
            share = (worker - left.worker) / (right.worker - left.worker)
            return left.minutes + share * (right.minutes - left.minutes), [left, right]
    return line[-1].minutes, [line[-1]]


def check_keda(ours: Mapping[str, Any], keda: Mapping[str, Any]) -> Check:
    ratio = ours["worker_hours"] / keda["worker_hours"]
    passed = ratio <= KEDA_WORKER_FACTOR and ours["p95_wait"] <= keda["p95_wait"]
    detail = (
        f"worker time {ratio:.2f}x ({ours['worker_hours']:.1f} h vs {keda['worker_hours']:.1f} h), "
        f"p95 wait {ours['p95_wait']:.1f} s vs {keda['p95_wait']:.1f} s"
    )
    return Check(TARGET_KEDA, keda["controller"], passed, detail)


def check_family(ours: Mapping[str, Any], family: str, rows: Sequence[Mapping[str, Any]]) -> Check:
    points = [Point(row["worker_hours"], row["minutes_above_target"], row["controller"]) for row in rows]
    worker, minutes = ours["worker_hours"], ours["minutes_above_target"]
    reference = minutes_at(points, worker)
    if reference is None:
        most = max(point.worker for point in points)
        detail = f"ours uses {worker:.1f} h, more than every sweep point (at most {most:.1f} h)"
        return Check(TARGET_FRONTIER, family, False, detail)
    value, sources = reference
    between = " and ".join(f"{point.name}: {point.worker:.1f} h, {point.minutes:.1f} min" for point in sources)
    detail = f"{minutes:.1f} min vs {value:.1f} min at {worker:.1f} h (frontier from {between})"
    return Check(TARGET_FRONTIER, family, minutes < value, detail)


def check_targets(rows: Sequence[Mapping[str, Any]], subject: str = OURS) -> list[Check]:
    """Check the targets on one trace's rows for the row of family `subject` (ours unless given).

    A baseline or family missing from the rows is skipped. Checks of a variant of ours are for information only;
    the targets are about OURS.
    """
    ours = next(row for row in rows if row["family"] == subject)
    checks: list[Check] = []
    keda = next((row for row in rows if row["family"] == KEDA), None)
    if keda is not None:
        checks.append(check_keda(ours, keda))
    for family in FAMILIES:
        members = [row for row in rows if row["family"] == family]
        if members:
            checks.append(check_family(ours, family, members))
    checks.append(Check(TARGET_INTERRUPTED, subject, ours["interrupted"] == 0, f"{ours['interrupted']} interrupted"))
    return checks
