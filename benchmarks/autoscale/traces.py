"""Job traces for the simulator: generated from fixed seeds, or loaded from a CSV file.

A trace lists jobs in order of the time they become due. An immediate job is pushed to the queue at that time.
A scheduled job (scheduled or retry, `scheduled` = 1) enters the pool's sorted set before that time and reaches
the queue only when a running process polls after it is due.

Generated traces (every one from its own fixed seed, so runs are repeatable):

- ``daily``: 24 h of Poisson arrivals whose rate follows a raised cosine from 1 job/s at midnight to 18 jobs/s
  at 14:00.
- ``bursts``: 3 h at 4 jobs/s with three bursts of 10x the base rate (40 jobs/s) for 5 minutes each, starting
  at 0:31:10, 1:34:40 and 2:37:25.
- ``long_jobs``: 4 h at 1 to 5 jobs/s (a two-hour cosine cycle), where 4 % of the jobs run 2 to 6 minutes.
- ``scheduled_hourly``: 6 h at 3 jobs/s plus 2000 scheduled jobs due at the top of every hour, 5 to 6 h included.
- ``ramp``: 4 h, the rate rising linearly from 1 to 20 jobs/s over 3 h and falling back to 1 job/s in 1 h.
- ``noisy``: 4 h at a mean of 8 jobs/s, the rate redrawn every minute as 8 times a lognormal factor (sigma 0.5,
  mean 1).

Unless stated otherwise a job runs for a lognormal time with a median of 3 s and sigma 0.4 (mean 3.25 s), so no
such job comes near Sidekiq's default stop timeout of 25 s. The long jobs of ``long_jobs`` are uniform between 120
and 360 s.
"""

from __future__ import annotations

import csv
import math
import random
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SHORT_MEDIAN = 3.0
SHORT_SIGMA = 0.4
HOUR = 3600.0
# Burst start times of the ``bursts`` trace in seconds (0:31:10, 1:34:40, 2:37:25). They are irregular on purpose:
# bursts aligned to whole minutes would always fall right after, or right before, a controller's polling tick.
BURST_STARTS = (1870.0, 5680.0, 9445.0)


@dataclass(frozen=True)
class Trace:
    """Jobs in order of due time, as parallel arrays, and the simulated horizon in seconds."""

    name: str
    horizon: float
    times: array[float]
    durations: array[float]
    scheduled: bytes
    description: str = ""

    def __post_init__(self) -> None:
        if not len(self.times) == len(self.durations) == len(self.scheduled):
            raise ValueError(f"trace {self.name!r}: times, durations and scheduled differ in length")

    def __len__(self) -> int:
        return len(self.times)


def short_duration(generator: random.Random) -> float:
    """Draw the run time of an ordinary job: lognormal, median 3 s, sigma 0.4."""
    return generator.lognormvariate(math.log(SHORT_MEDIAN), SHORT_SIGMA)


def poisson_times(
    rate: Callable[[float], float], peak: float, start: float, end: float, generator: random.Random
) -> Iterable[float]:
    """Yield arrival times of a Poisson process whose rate varies in time, by thinning at rate `peak`."""
    at = start
    while True:
        at += generator.expovariate(peak)
        if at >= end:
            return
        if generator.random() * peak <= rate(at):
            yield at


def _constant(rate: float) -> Callable[[float], float]:
    return lambda _: rate


def _build(
    name: str,
    horizon: float,
    jobs: Iterable[tuple[float, float, bool]],
    description: str,
) -> Trace:
    ordered = sorted(jobs, key=lambda job: job[0])
    return Trace(
        name=name,
        horizon=horizon,
        times=array("d", (job[0] for job in ordered)),
        durations=array("d", (job[1] for job in ordered)),
        scheduled=bytes(1 if job[2] else 0 for job in ordered),
        description=description,
    )


def _immediate(
    rate: Callable[[float], float], peak: float, horizon: float, generator: random.Random
) -> list[tuple[float, float, bool]]:
    return [(at, short_duration(generator), False) for at in poisson_times(rate, peak, 0.0, horizon, generator)]


def daily(seed: int = 101) -> Trace:
    """24 h, rate 1 job/s at midnight rising along a raised cosine to 18 jobs/s at 14:00."""
    generator = random.Random(seed)
    horizon = 24 * HOUR

    def rate(at: float) -> float:
        phase = 2 * math.pi * (at - 14 * HOUR) / horizon
        return 1.0 + 17.0 * (1 + math.cos(phase)) / 2

    return _build("daily", horizon, _immediate(rate, 18.0, horizon, generator), "daily cycle, 1 to 18 jobs/s")


def bursts(seed: int = 102, shift: float = 0.0) -> Trace:
    """3 h at 4 jobs/s with 5-minute bursts of 40 jobs/s starting at BURST_STARTS, each moved by `shift` seconds."""
    generator = random.Random(seed)
    horizon = 3 * HOUR
    starts = [start + shift for start in BURST_STARTS]

    def rate(at: float) -> float:
        return 40.0 if any(start <= at < start + 300 for start in starts) else 4.0

    return _build("bursts", horizon, _immediate(rate, 40.0, horizon, generator), "4 jobs/s, 10x bursts of 5 min")


def long_jobs(seed: int = 103) -> Trace:
    """4 h at 1 to 5 jobs/s; 4 % of the jobs run 2 to 6 minutes."""
    generator = random.Random(seed)
    horizon = 4 * HOUR

    def rate(at: float) -> float:
        return 3.0 - 2.0 * math.cos(2 * math.pi * at / (2 * HOUR))

    jobs: list[tuple[float, float, bool]] = []
    for at in poisson_times(rate, 5.0, 0.0, horizon, generator):
        if generator.random() < 0.04:
            jobs.append((at, generator.uniform(120.0, 360.0), False))
        else:
            jobs.append((at, short_duration(generator), False))
    return _build("long_jobs", horizon, jobs, "1 to 5 jobs/s, 4 % of jobs run 2 to 6 min")


def scheduled_hourly(seed: int = 104) -> Trace:
    """6 h at 3 jobs/s plus 2000 scheduled jobs due at the top of every hour."""
    generator = random.Random(seed)
    horizon = 6 * HOUR
    jobs = _immediate(_constant(3.0), 3.0, horizon, generator)
    for hour in range(1, 6):
        jobs.extend((hour * HOUR, short_duration(generator), True) for _ in range(2000))
    return _build("scheduled_hourly", horizon, jobs, "3 jobs/s, 2000 scheduled jobs due every hour")


def ramp(seed: int = 105) -> Trace:
    """4 h: from 1 to 20 jobs/s over 3 h, back to 1 job/s over the last hour."""
    generator = random.Random(seed)
    horizon = 4 * HOUR

    def rate(at: float) -> float:
        if at < 3 * HOUR:
            return 1.0 + 19.0 * at / (3 * HOUR)
        return 20.0 - 19.0 * (at - 3 * HOUR) / HOUR

    return _build("ramp", horizon, _immediate(rate, 20.0, horizon, generator), "ramp 1 to 20 jobs/s and back")


def noisy(seed: int = 106) -> Trace:
    """4 h at a mean of 8 jobs/s, the rate redrawn every minute with a lognormal factor (sigma 0.5, mean 1)."""
    generator = random.Random(seed)
    horizon = 4 * HOUR
    sigma = 0.5
    jobs: list[tuple[float, float, bool]] = []
    start = 0.0
    while start < horizon:
        # The factor's median is exp(-sigma^2 / 2) so that its mean is 1.
        factor = generator.lognormvariate(-sigma * sigma / 2, sigma)
        minute_rate = 8.0 * factor
        jobs.extend(
            (at, short_duration(generator), False)
            for at in poisson_times(_constant(minute_rate), minute_rate, start, min(start + 60, horizon), generator)
        )
        start += 60
    return _build("noisy", horizon, jobs, "8 jobs/s on average, rate redrawn every minute")


GENERATORS: dict[str, Callable[[], Trace]] = {
    "daily": daily,
    "bursts": bursts,
    "long_jobs": long_jobs,
    "scheduled_hourly": scheduled_hourly,
    "ramp": ramp,
    "noisy": noisy,
}


def load_csv(path: str | Path, horizon: float | None = None, tail: float = 600.0) -> Trace:
    """Load a trace from a CSV file with a header row and the columns `at`, `duration` and optional `scheduled`.

    `at` is the due time in seconds from the start of the trace, `duration` the run time in seconds, and
    `scheduled` is 1 for a scheduled or retry job (0 or empty otherwise). Rows may come in any order. The horizon
    defaults to the last due time plus `tail` seconds. Raises ValueError naming the line of a bad row.
    """
    source = Path(path)
    jobs: list[tuple[float, float, bool]] = []
    with source.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"at", "duration"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{source}: missing columns {sorted(missing)}; the header must name at and duration")
        for row in reader:
            line = reader.line_num
            try:
                at = float(row["at"])
                duration = float(row["duration"])
                scheduled = (row.get("scheduled") or "0").strip() not in ("", "0", "false", "False")
            except (TypeError, ValueError):
                raise ValueError(f"{source}:{line}: invalid row {row!r}; at and duration must be numbers") from None
            if not (math.isfinite(at) and math.isfinite(duration)) or at < 0 or duration <= 0:
                raise ValueError(f"{source}:{line}: at must be >= 0 and duration > 0 seconds, got {at}, {duration}")
            jobs.append((at, duration, scheduled))
    if not jobs:
        raise ValueError(f"{source}: no jobs; add rows of at,duration")
    last = max(job[0] for job in jobs)
    return _build(source.stem, horizon if horizon is not None else last + tail, jobs, f"loaded from {source.name}")
