"""The scaling policy: the desired process count of one pool from its queue signals.

The autoscale module calls `decide` once per pool on every scheduled run (every 30 to 60 seconds), and the
benchmark simulator in benchmarks/autoscale calls the same function, so both run identical code. Everything here
is pure: no I/O, no clock, no Ansible. The caller reads the signals from Redis, stores the returned state as
JSON (through `PolicyState.to_dict`) and applies the desired count through a backend.

How a decision is made:

1. Arrival rate. Each run interval's arrivals are the jobs finished plus the growth of backlog and busy threads.
   Over the last ARRIVAL_WINDOW seconds the policy keeps the newest intervals that share one level. An interval
   whose rate differs from the newer ones by more than LEVEL_SHIFT_SPREADS yardsticks marks a level shift, and the
   intervals before it are dropped. The yardstick is the window's robust spread together with Poisson noise, and a
   burst that starts or ends or a scheduled batch is such a shift. A line fitted through
   the kept intervals gives the rate now when its trend is significant, and their mean otherwise. The rate to size for
   adds RATE_SPREADS standard deviations of the swings beyond Poisson noise, so a rate that swings from minute to
   minute holds a steady count instead of being chased.
2. Demand, in threads. The mean job duration comes from Little's law over the last SERVICE_TIME_WINDOW seconds.
   The pool needs the fewest threads that keep, in the M/M/c model, the probability of a wait longer than the
   target latency at most MAX_LATE_PROBABILITY (the Erlang C formula). When those threads would start the waiting
   jobs too late, the pool needs the arrival load plus the threads that start the waiting jobs within
   DRAIN_TIME. Jobs scheduled to come due within the next UPCOMING_WINDOW seconds count as waiting, so the pool
   grows before a scheduled batch. While jobs longer than the stop timeout run, a pool whose threads are all busy
   while jobs wait needs one more process whatever the model says (see `_saturated_by_long_jobs`).
3. Floors. The busy threads are a floor, so a scale-in never leaves fewer threads than jobs running. A pool with
   min 0 wakes up to one process when jobs wait for it, due scheduled and retry jobs included.
4. Scale-out happens when the demand exceeds the running threads by SCALE_OUT_MARGIN, or at once when latency
   passes SCALE_OUT_LATENCY times the target, limited by max_step_out and the scale-out cooldown. Scale-in goes
   down to the highest demand of the stabilization window plus SCALE_IN_MARGIN, limited by max_step_in and the
   scale-in cooldown. While jobs older than the stop timeout run in the pool, scale-in removes only idle
   processes, because the backend quiets processes and a quiet process pushes back what still runs at the stop
   timeout.
5. Pools with min == max and singleton pools are never scaled.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

SCALE_OUT = "scale_out"
SCALE_IN = "scale_in"
HOLD = "hold"

# Defaults for settings_from_pool. DEFAULT_CONCURRENCY and DEFAULT_TIMEOUT are Sidekiq 6.x's own defaults.
DEFAULT_MIN_PROCESSES = 1
DEFAULT_CONCURRENCY = 10
DEFAULT_TIMEOUT = 25
DEFAULT_TARGET_LATENCY = 10.0
DEFAULT_SCALE_OUT_COOLDOWN = 0.0
DEFAULT_SCALE_IN_COOLDOWN = 30.0
DEFAULT_MAX_STEP_OUT = 20
DEFAULT_MAX_STEP_IN = 10
DEFAULT_SCALE_IN_STABILIZATION = 120.0

# The stabilization window is kept as samples in the state, so its length is bounded to keep the state small
# (at one run every 10 s, one hour is 360 samples of about 120 bytes of JSON each).
MAX_STABILIZATION = 3600.0
MAX_SAMPLES = 360

# Sizing constants, chosen with the benchmark in benchmarks/autoscale (its README has the measurements).
# Largest accepted probability, in the M/M/c model, that a job waits longer than the target latency.
MAX_LATE_PROBABILITY = 0.05
# Demand above the running threads, as a fraction, that triggers a scale-out while latency stays at most
# SCALE_OUT_LATENCY times the target. Together with SCALE_IN_MARGIN this keeps a demand near a process boundary
# from flapping, and the latency condition still scales out at once when a queue builds.
SCALE_OUT_MARGIN = 0.05
SCALE_OUT_LATENCY = 0.5
# Extra demand, as a fraction, that the processes left after a scale-in must still cover, so that a demand that
# sits on a process boundary does not scale in and out on every run.
SCALE_IN_MARGIN = 0.02
# Seconds of run intervals over which the arrival rate is measured. A long window keeps a rate that swings from
# minute to minute from moving the count, while a level shift cuts the window short and a significant trend is
# followed by the fitted line.
ARRIVAL_WINDOW = 1800.0
# Yardsticks (see `_recent_level`) by which an interval's rate must differ from the mean of the newer intervals to
# mark a level shift. In the benchmark the start and the end of a 10x burst differ by 6 to 21, while a rate that
# swings by half its mean from minute to minute stays within 5 in 4 of 5 runs.
LEVEL_SHIFT_SPREADS = 5.0
# Standard deviations of the rate's swings beyond Poisson noise that the rate to size for adds to the measured rate.
RATE_SPREADS = 2.0
# Multiple of the Poisson variance that the variance of the interval rates must exceed before the rest counts as
# swings. A variance measured over a few dozen intervals is itself noisy, and below this it is mostly sampling
# noise, which would add threads to a steady rate.
POISSON_ALLOWANCE = 2.0
# Standard errors by which a fitted slope must differ from zero before the rate follows the trend instead of the
# mean. Lower values let a rate that swings at random tilt the estimate.
TREND_SIGNIFICANCE = 3.0
# Seconds in which the threads added for a backlog should start the waiting jobs, when longer than the target
# latency. New processes need time to boot and the next run corrects the count, so draining a burst's backlog
# within a target of a few seconds would start far more processes than the burst keeps busy.
DRAIN_TIME = 30.0
# Seconds of age that the oldest waiting job needs before the queue's growth counts as a measure of the arrival rate.
QUEUE_GROWTH_MIN_AGE = 1.0
# Seconds of samples used to estimate the mean job duration, because Little's law over one run is noisy.
SERVICE_TIME_WINDOW = 600.0
# Seconds ahead in which the reader counts scheduled and retry jobs that will come due (`PoolSignals.upcoming`).
UPCOMING_WINDOW = 60.0
# Seconds after a job older than the stop timeout was last seen during which scale-in removes only idle processes,
# and a saturated pool scales out (see `_saturated_by_long_jobs`).
LONG_JOB_MEMORY = 3600.0
# Fraction of the target latency that the oldest waiting job must reach before a pool whose threads are all busy
# counts as saturated. Below it, the queue is the normal wait of a busy thread pool for its next free thread.
SATURATION_LATENCY = 0.1
# Upper bound of the thread count search, so absurd signals cannot make a decision loop for long.
SIZING_LIMIT = 100_000

STATE_VERSION = 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format_number(value: float) -> str:
    """Format a rate or a duration for a reason: '12.5', '35', '0.04'."""
    if value >= 100 or value == int(value):
        return str(round(value))
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


@dataclass(frozen=True)
class PoolSignals:
    """Signals of one pool at one run, as the reader computes them from Redis.

    Attributes:
        backlog: jobs waiting for the pool: queued jobs plus due scheduled and due retry jobs of its queues.
        latency: max latency in seconds over the pool's queues (now minus `enqueued_at` of the oldest job)
            and over its due scheduled and retry jobs (now minus their score).
        busy: busy threads of the pool's live processes, quiet ones included, because their jobs still run.
        processes: live processes of the pool that are not quiet.
        capacity: sum of the concurrency of those processes.
        now: epoch seconds of the reading.
        throughput: jobs finished per second since the previous run. Leave it None to let the policy derive it
            from `processed` and the state. None in both means unknown (on the first run, for example).
        processed: a counter of jobs the pool finished, used when `throughput` is None. NOTE: Sidekiq's
            `stat:processed` counts every process of the app, so it measures one pool only when one pool runs.
        requested: process count the backend is set to, booting processes included. When None, the policy
            takes `processes` as the current count.
        idle_processes: live, non-quiet processes with no busy thread; None when the reader cannot tell.
        longest_running: age in seconds of the oldest running job of the pool; None when unknown. While it is
            unknown, scale-in removes only idle processes, which the benchmark measured at 4 to 19 % more worker
            time on short jobs.
        upcoming: scheduled and retry jobs of the pool that come due within the next UPCOMING_WINDOW seconds
            (a ZCOUNT on the sorted sets); None when unknown, and then the pool cannot grow before a batch of
            scheduled jobs comes due.
        quiet_busy: the part of `busy` that runs in quiet processes, which `capacity` leaves out.
    """

    backlog: int
    latency: float
    busy: int
    processes: int
    capacity: int
    now: float
    throughput: float | None = None
    processed: int | None = None
    requested: int | None = None
    idle_processes: int | None = None
    longest_running: float | None = None
    upcoming: int | None = None
    quiet_busy: int = 0

    def __post_init__(self) -> None:
        for name in ("backlog", "busy", "processes", "capacity", "quiet_busy"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"signal {name} {value!r} is invalid; it must be an integer >= 0")
        for name in ("processed", "requested", "idle_processes", "upcoming"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"signal {name} {value!r} is invalid; it must be an integer >= 0 or None")
        if not _is_number(self.latency) or self.latency < 0:
            raise ValueError(f"signal latency {self.latency!r} is invalid; it must be seconds >= 0 (0 when idle)")
        for name in ("throughput", "longest_running"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"signal {name} {value!r} is invalid; it must be a finite number >= 0 or None")
        if not _is_number(self.now):
            raise ValueError(f"signal now {self.now!r} is invalid; it must be epoch seconds")


# Validation of PolicySettings: field, key as users write it, whether the value must be an integer, the lowest
# valid value, the highest valid value and the expected value that the error message names.
_SETTING_RULES: tuple[tuple[str, str, bool, float, float, str], ...] = (
    ("min_processes", "processes.min", True, 0, math.inf, "an integer >= 0"),
    ("max_processes", "processes.max", True, 1, math.inf, "an integer >= 1"),
    ("concurrency", "concurrency", True, 1, math.inf, "an integer >= 1 (threads per process)"),
    ("target_latency", "autoscale.target_latency", False, 1e-9, math.inf, "a number of seconds > 0"),
    ("scale_out_cooldown", "autoscale.scale_out_cooldown", False, 0, math.inf, "a number of seconds >= 0"),
    ("scale_in_cooldown", "autoscale.scale_in_cooldown", False, 0, math.inf, "a number of seconds >= 0"),
    ("max_step_out", "autoscale.max_step_out", True, 1, math.inf, "an integer >= 1 (processes per run)"),
    ("max_step_in", "autoscale.max_step_in", True, 1, math.inf, "an integer >= 1 (processes per run)"),
    (
        "scale_in_stabilization",
        "autoscale.scale_in_stabilization",
        False,
        0,
        MAX_STABILIZATION,
        f"a number of seconds from 0 to {MAX_STABILIZATION:.0f}",
    ),
    ("stop_timeout", "timeout", False, 1e-9, math.inf, "a number of seconds > 0"),
)


@dataclass(frozen=True)
class PolicySettings:
    """Scaling settings of one pool; construction validates every field.

    Attributes:
        min_processes, max_processes: bounds of the process count (processes.min and processes.max).
        concurrency: threads per process.
        target_latency: queue latency in seconds that the pool should stay under (autoscale.target_latency).
        scale_out_cooldown: seconds after a scale-out before the next scale-out.
        scale_in_cooldown: seconds after any scaling action before a scale-in.
        max_step_out, max_step_in: processes added or removed per run at most.
        scale_in_stabilization: seconds of demand whose maximum bounds a scale-in.
        stop_timeout: Sidekiq's `timeout`, the seconds a quieted process may finish its jobs before they are
            pushed back to the queue.
        singleton: the pool serves a singleton queue and is never scaled.
    """

    min_processes: int = DEFAULT_MIN_PROCESSES
    max_processes: int = DEFAULT_MIN_PROCESSES
    concurrency: int = DEFAULT_CONCURRENCY
    target_latency: float = DEFAULT_TARGET_LATENCY
    scale_out_cooldown: float = DEFAULT_SCALE_OUT_COOLDOWN
    scale_in_cooldown: float = DEFAULT_SCALE_IN_COOLDOWN
    max_step_out: int = DEFAULT_MAX_STEP_OUT
    max_step_in: int = DEFAULT_MAX_STEP_IN
    scale_in_stabilization: float = DEFAULT_SCALE_IN_STABILIZATION
    stop_timeout: float = DEFAULT_TIMEOUT
    singleton: bool = False

    def __post_init__(self) -> None:
        for name, key, integer, lowest, highest, expected in _SETTING_RULES:
            value = getattr(self, name)
            valid_type = _is_int(value) if integer else _is_number(value)
            if not valid_type or not lowest <= value <= highest:
                raise ValueError(f"{key} {value!r} is invalid; set it to {expected}")
        if self.min_processes > self.max_processes:
            raise ValueError(
                f"processes.min {self.min_processes} is above processes.max {self.max_processes}; "
                "lower min or raise max"
            )
        if not isinstance(self.singleton, bool):
            raise ValueError(f"singleton {self.singleton!r} is invalid; set it to true or false")
        if self.singleton and self.max_processes > 1:
            raise ValueError(
                f"processes.max {self.max_processes} is invalid for a pool that serves a singleton queue; "
                "set processes.max to 1 so the queue never runs in two processes"
            )

    @property
    def fixed(self) -> bool:
        """Whether the pool has one allowed size (min == max)."""
        return self.min_processes == self.max_processes


AUTOSCALE_KEYS = (
    "target_latency",
    "scale_out_cooldown",
    "scale_in_cooldown",
    "max_step_out",
    "max_step_in",
    "scale_in_stabilization",
)


def settings_from_pool(pool: Mapping[str, Any], singleton_queues: Sequence[str] = ()) -> PolicySettings:
    """Build the scaling settings of a pool as users write it in group_vars.

    Keys and their defaults:

    - ``processes: {min, max}``: min 1 and max = max(min, 1), so a pool without ``processes`` runs exactly
      one process and a pool without ``processes.max`` is not scaled out.
    - ``concurrency``: 10 threads per process (Sidekiq 6.x's default).
    - ``timeout``: 25 s (Sidekiq's default), the stop timeout of a quieted process.
    - ``autoscale.target_latency``: 10 s.
    - ``autoscale.scale_out_cooldown``: 0 s, because the desired count already includes booting processes.
    - ``autoscale.scale_in_cooldown``: 30 s.
    - ``autoscale.max_step_out``: 20 processes per run. ``autoscale.max_step_in``: 10 processes per run.
    - ``autoscale.scale_in_stabilization``: 120 s.

    A pool that serves one of ``singleton_queues`` is a singleton pool. Raises ValueError that names the pool,
    the key, the value and the fix, also for an unknown key under ``processes`` or ``autoscale``.
    """
    label = f"pool {pool.get('name', '?')!r}"
    processes = pool.get("processes") or {}
    autoscale = pool.get("autoscale") or {}
    if not isinstance(processes, Mapping):
        raise ValueError(f"{label}: processes {processes!r} is invalid; write a mapping such as {{min: 1, max: 4}}")
    if not isinstance(autoscale, Mapping):
        raise ValueError(f"{label}: autoscale {autoscale!r} is invalid; write a mapping such as {{target_latency: 10}}")
    unknown = sorted(set(processes) - {"min", "max"})
    if unknown:
        raise ValueError(f"{label}: unknown keys {unknown} under processes; the known keys are ['max', 'min']")
    unknown = sorted(set(autoscale) - set(AUTOSCALE_KEYS))
    if unknown:
        known = sorted(AUTOSCALE_KEYS)
        raise ValueError(f"{label}: unknown keys {unknown} under autoscale; the known keys are {known}")

    minimum = processes.get("min", DEFAULT_MIN_PROCESSES)
    maximum = processes.get("max", max(minimum, 1) if _is_int(minimum) else minimum)
    queues = [entry if isinstance(entry, str) else entry[0] for entry in pool.get("queues") or [] if entry]
    arguments: dict[str, Any] = {
        "min_processes": minimum,
        "max_processes": maximum,
        "concurrency": pool.get("concurrency", DEFAULT_CONCURRENCY),
        "stop_timeout": pool.get("timeout", DEFAULT_TIMEOUT),
        "singleton": any(queue in singleton_queues for queue in queues),
    }
    arguments.update({key: autoscale[key] for key in AUTOSCALE_KEYS if key in autoscale})
    try:
        return PolicySettings(**arguments)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None


@dataclass(frozen=True)
class Sample:
    """One run's reading kept in the state.

    Attributes:
        at: epoch seconds of the run.
        backlog, busy: the signals of that run.
        throughput: jobs finished per second before that run, None when unknown.
        threads: threads the demand needed, floors included, before the [min, max] bounds.
        recommendation: processes the demand needed, within [min, max].
    """

    at: float
    backlog: int
    busy: int
    throughput: float | None
    threads: float
    recommendation: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "backlog": self.backlog,
            "busy": self.busy,
            "throughput": self.throughput,
            "threads": self.threads,
            "recommendation": self.recommendation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sample:
        return cls(
            at=float(data["at"]),
            backlog=int(data["backlog"]),
            busy=int(data["busy"]),
            throughput=_optional_float(data.get("throughput")),
            threads=float(data["threads"]),
            recommendation=int(data["recommendation"]),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class PolicyState:
    """Policy memory between runs. The caller stores `to_dict()` as JSON (in Redis).

    Attributes:
        samples: recent readings, oldest first, bounded to the longest window in use and to MAX_SAMPLES.
        last_action: the last scaling action (scale_out or scale_in), None before the first.
        last_action_at: epoch seconds of the last scaling action.
        last_scale_out_at: epoch seconds of the last scale-out, for the scale-out cooldown.
        processed: the `processed` counter at the previous run, to derive throughput.
        processed_at: epoch seconds of that counter reading.
        service_time: the last estimate of the mean job duration in seconds, used while throughput is unknown.
        long_job_seen_at: epoch seconds when a job older than the stop timeout was last seen running.
    """

    samples: tuple[Sample, ...] = ()
    last_action: str | None = None
    last_action_at: float | None = None
    last_scale_out_at: float | None = None
    processed: int | None = None
    processed_at: float | None = None
    service_time: float | None = None
    long_job_seen_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the state as a JSON-serialisable dict."""
        return {
            "version": STATE_VERSION,
            "samples": [sample.to_dict() for sample in self.samples],
            "last_action": self.last_action,
            "last_action_at": self.last_action_at,
            "last_scale_out_at": self.last_scale_out_at,
            "processed": self.processed,
            "processed_at": self.processed_at,
            "service_time": self.service_time,
            "long_job_seen_at": self.long_job_seen_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PolicyState:
        """Load a state written by `to_dict`; None or an empty dict gives a fresh state.

        Raises ValueError when the data is not a state of this version, so that the caller can log it and
        start from a fresh state.
        """
        if not data:
            return cls()
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"policy state version {version!r} is not supported; expected {STATE_VERSION}")
        try:
            last_action = data.get("last_action")
            if last_action not in (None, SCALE_OUT, SCALE_IN):
                raise ValueError(f"unknown last_action {last_action!r}")
            return cls(
                samples=tuple(Sample.from_dict(item) for item in data.get("samples") or []),
                last_action=last_action,
                last_action_at=_optional_float(data.get("last_action_at")),
                last_scale_out_at=_optional_float(data.get("last_scale_out_at")),
                processed=None if data.get("processed") is None else int(data["processed"]),
                processed_at=_optional_float(data.get("processed_at")),
                service_time=_optional_float(data.get("service_time")),
                long_job_seen_at=_optional_float(data.get("long_job_seen_at")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"policy state is malformed ({error}); discard it and start from a fresh state") from None


@dataclass(frozen=True)
class Demand:
    """The demand estimate behind a recommendation. Rates are per second, durations in seconds.

    Attributes:
        throughput, arrival, service_time: measured rates and mean job duration, None when unknown.
        arrival_threads: threads that serve the arrival rate within the utilization and latency limits.
        backlog_threads: threads that start the waiting and upcoming jobs within the target latency.
        threads: the larger of their sum and the floors (busy threads, one thread to wake an empty pool).
        saturated: whether every thread is busy while jobs wait and long jobs run (`_saturated_by_long_jobs`),
            which adds one process to the threads.
    """

    throughput: float | None
    arrival: float | None
    service_time: float | None
    arrival_threads: float
    backlog_threads: float
    threads: float
    saturated: bool = False


@dataclass(frozen=True)
class Decision:
    """The outcome of one run for one pool.

    Attributes:
        desired: process count the backend should run.
        current: process count the decision started from (`requested`, else the live processes).
        action: scale_out, scale_in or hold.
        reason: plain sentences that state what was measured and why the count was chosen.
        recommendation: processes the demand alone needs, within [min, max], before steps and cooldowns.
        state: the state to store for the next run.
        details: the figures behind the reason, for module results and logs.
    """

    desired: int
    current: int
    action: str
    reason: str
    recommendation: int
    state: PolicyState
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the decision without its state, for module results and logs."""
        return {
            "desired": self.desired,
            "current": self.current,
            "action": self.action,
            "reason": self.reason,
            "recommendation": self.recommendation,
            "details": dict(self.details),
        }


def erlang_c(servers: int, load: float) -> float:
    """Return the probability that a job waits in an M/M/c queue with `servers` threads and `load` Erlangs.

    `load` is the arrival rate times the mean job duration. The result is 1.0 when the load reaches the thread
    count, because the queue then grows without bound.
    """
    if load <= 0:
        return 0.0
    if servers <= load:
        return 1.0
    blocking = 1.0
    for count in range(1, servers + 1):
        blocking = load * blocking / (count + load * blocking)
    return servers * blocking / (servers - load * (1.0 - blocking))


def threads_for_arrival(load: float, service_time: float, target_latency: float) -> int:
    """Return the fewest threads that serve `load` Erlangs within the latency limit.

    The thread count exceeds the load, so the queue stays finite, and keeps the probability of a wait longer than
    `target_latency` at most MAX_LATE_PROBABILITY in the M/M/c model. Loads of SIZING_LIMIT or more return
    SIZING_LIMIT.
    """
    if load <= 0:
        return 0
    if load >= SIZING_LIMIT:
        return SIZING_LIMIT
    threads = max(1, math.ceil(load))
    # Erlang B by its recursion, one thread at a time, gives Erlang C for every candidate thread count.
    blocking = 1.0
    for count in range(1, threads):
        blocking = load * blocking / (count + load * blocking)
    while threads < SIZING_LIMIT:
        blocking = load * blocking / (threads + load * blocking)
        if threads > load:
            waits = threads * blocking / (threads - load * (1.0 - blocking))
            late = waits * math.exp(-(threads - load) * target_latency / service_time)
            if late <= MAX_LATE_PROBABILITY:
                return threads
        threads += 1
    return SIZING_LIMIT


def _measure_throughput(signals: PoolSignals, state: PolicyState) -> float | None:
    if signals.throughput is not None:
        return signals.throughput
    if signals.processed is None or state.processed is None or state.processed_at is None:
        return None
    elapsed = signals.now - state.processed_at
    finished = signals.processed - state.processed
    if elapsed <= 0 or finished < 0:
        # A clock that went back or a counter that was reset gives no rate this run.
        return None
    return finished / elapsed


def _interval_arrivals(signals: PoolSignals, state: PolicyState, throughput: float | None) -> list[tuple[float, float]]:
    """Return (jobs arrived, seconds) of each run interval over about ARRIVAL_WINDOW seconds, newest first.

    Every job that arrived in a run's interval has finished, is still waiting or is running, so the arrivals are
    the jobs finished plus the growth of backlog and busy threads. The list ends early at a run whose throughput
    is unknown, and it is empty without a throughput.
    """
    if throughput is None:
        return []
    intervals: list[tuple[float, float]] = []
    later = (signals.now, signals.backlog, signals.busy, throughput)
    for sample in reversed(state.samples):
        later_at, later_backlog, later_busy, later_throughput = later
        if sample.at >= later_at:
            continue
        elapsed = later_at - sample.at
        arrived = later_throughput * elapsed + later_backlog - sample.backlog + later_busy - sample.busy
        intervals.append((max(0.0, arrived), elapsed))
        if signals.now - sample.at >= ARRIVAL_WINDOW or sample.throughput is None:
            break
        later = (sample.at, sample.backlog, sample.busy, sample.throughput)
    return intervals


def _rate_spread(rates: Sequence[float]) -> float:
    """Return a robust standard deviation of the rates from the differences between nearby intervals.

    For independent rates with standard deviation s, the median absolute difference of two of them is
    0.6745 * sqrt(2) * s. The differences at a lag of one and of two intervals are both used, and the larger
    estimate is returned, so that a rate that holds for two runs before it changes still shows its spread. A
    level shift (a burst that starts or ends) spoils only the few differences across it, which moves the median
    little, so it does not make an ordinary spread look large. Fewer than three rates give 0.
    """
    estimates = [0.0]
    for lag in (1, 2):
        differences = [abs(rates[index] - rates[index + lag]) for index in range(len(rates) - lag)]
        if len(differences) >= 2:
            estimates.append(1.4826 * statistics.median(differences) / math.sqrt(2.0))
    return max(estimates)


def _recent_level(intervals: Sequence[tuple[float, float]], spread: float) -> list[tuple[float, float]]:
    """Return the newest intervals that share one level of arrival rate, newest first.

    Walking back from the newest interval, an older one joins while its rate differs from the mean of those joined
    so far by at most LEVEL_SHIFT_SPREADS times a yardstick. The yardstick is the window's spread together with the
    Poisson noise of the two rates compared, so that intervals with few jobs do not look like a shift.
    """
    joined = [intervals[0]]
    arrived_sum, elapsed_sum = intervals[0]
    for arrived, elapsed in intervals[1:]:
        mean = arrived_sum / elapsed_sum
        rate = arrived / elapsed
        poisson = max(mean, rate) * (1.0 / elapsed + 1.0 / elapsed_sum)
        if abs(rate - mean) > LEVEL_SHIFT_SPREADS * math.sqrt(spread * spread + poisson):
            break
        joined.append((arrived, elapsed))
        arrived_sum += arrived
        elapsed_sum += elapsed
    return joined


def _fit_rate(joined: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Return the rate now and the variance of the interval rates around it, weighted by interval length.

    A line through the intervals' rates, weighted least squares against the middle of each interval, gives the
    rate at the end of the newest interval when its slope is TREND_SIGNIFICANCE standard errors from zero or more.
    Otherwise the mean rate is returned. Three intervals or fewer always give the mean.
    """
    elapsed_sum = sum(elapsed for _arrived, elapsed in joined)
    mean = sum(arrived for arrived, _elapsed in joined) / elapsed_sum
    points: list[tuple[float, float, float]] = []
    end = 0.0
    for arrived, elapsed in joined:
        points.append((-(end + elapsed / 2.0), arrived / elapsed, elapsed))
        end += elapsed
    variance_around_mean = sum(weight * (rate - mean) ** 2 for _at, rate, weight in points) / elapsed_sum
    if len(points) <= 3:
        return mean, variance_around_mean
    center = sum(at * weight for at, _rate, weight in points) / elapsed_sum
    sxx = sum(weight * (at - center) ** 2 for at, _rate, weight in points)
    slope = sum(weight * (at - center) * (rate - mean) for at, rate, weight in points) / sxx
    residual = sum(weight * (rate - mean - slope * (at - center)) ** 2 for at, rate, weight in points) / elapsed_sum
    # Standard error of a weighted slope, with the weights scaled so that they sum to the number of intervals.
    slope_error = math.sqrt(residual * elapsed_sum / (len(points) - 2) / sxx)
    if abs(slope) <= TREND_SIGNIFICANCE * slope_error:
        return mean, variance_around_mean
    return max(0.0, mean - slope * center), residual


def _measure_arrival(signals: PoolSignals, state: PolicyState, throughput: float | None) -> tuple[float | None, bool]:
    """Measure the arrival rate to size for, and whether the newest interval starts a higher level.

    The rate is the rate now of the newest intervals that share one level (`_recent_level`, `_fit_rate`), plus
    RATE_SPREADS standard deviations of their swings beyond POISSON_ALLOWANCE times the Poisson variance. The
    Erlang C sizing covers Poisson noise, but not a rate that swings from run to run. Without a throughput the
    rate is None.
    """
    intervals = _interval_arrivals(signals, state, throughput)
    if not intervals:
        return None, False
    joined = _recent_level(intervals, _rate_spread([arrived / elapsed for arrived, elapsed in intervals]))
    rising = False
    if len(joined) == 1 and len(intervals) > 1:
        (newest_arrived, newest_elapsed), (older_arrived, older_elapsed) = intervals[0], intervals[1]
        rising = newest_arrived / newest_elapsed > older_arrived / older_elapsed
    level, variance = _fit_rate(joined)
    if len(joined) < 3:
        return level, rising
    elapsed_sum = sum(elapsed for _arrived, elapsed in joined)
    mean = sum(arrived for arrived, _elapsed in joined) / elapsed_sum
    poisson_variance = mean * len(joined) / elapsed_sum
    swings = max(0.0, variance - POISSON_ALLOWANCE * poisson_variance)
    return level + RATE_SPREADS * math.sqrt(swings), rising


def _estimate_service_time(signals: PoolSignals, state: PolicyState, throughput: float | None) -> float | None:
    """Estimate the mean job duration by Little's law over about SERVICE_TIME_WINDOW seconds.

    In each run interval the mean number of busy threads equals the throughput times the mean job duration. The
    mean is taken as the average of the busy threads at the interval's two ends, because the busy threads at one
    end alone jump when a scale-out lets new processes take a backlog. Without any interval of known throughput,
    the previous estimate is kept.
    """
    busy_seconds = 0.0
    finished = 0.0
    later = (signals.now, signals.busy, throughput)
    for sample in reversed(state.samples):
        later_at, later_busy, later_throughput = later
        if sample.at >= later_at:
            continue
        if signals.now - sample.at > SERVICE_TIME_WINDOW:
            break
        elapsed = later_at - sample.at
        if later_throughput is not None:
            busy_seconds += (sample.busy + later_busy) / 2.0 * elapsed
            finished += later_throughput * elapsed
        later = (sample.at, sample.busy, sample.throughput)
    if finished > 0 and busy_seconds > 0:
        return busy_seconds / finished
    return state.service_time


def _queue_growth_rate(signals: PoolSignals, service_time: float) -> float:
    """Return the arrival rate implied by a queue that builds while every thread is busy, else 0.

    The queue began to build when its oldest job arrived, and with every thread busy since, jobs have arrived
    faster than the threads start them by backlog / latency per second. When a run saw only the first seconds of a
    burst, this measures the new level far better than the mean rate of its interval. A queue younger than
    QUEUE_GROWTH_MIN_AGE seconds contains too few jobs to measure a rate.
    """
    if signals.latency < QUEUE_GROWTH_MIN_AGE or not 0 < signals.capacity <= signals.busy:
        return 0.0
    return signals.capacity / service_time + signals.backlog / signals.latency


def drain_time(settings: PolicySettings) -> float:
    """Return the seconds in which the threads added for a backlog should start the waiting jobs."""
    return max(settings.target_latency, DRAIN_TIME)


def estimate_demand(signals: PoolSignals, settings: PolicySettings, state: PolicyState) -> Demand:
    """Estimate the arrival rate, the mean job duration and the threads they need."""
    throughput = _measure_throughput(signals, state)
    arrival, rising = _measure_arrival(signals, state, throughput)
    service_time = _estimate_service_time(signals, state, throughput)
    if arrival is not None and service_time and rising:
        arrival = max(arrival, _queue_growth_rate(signals, service_time))
    waiting = signals.backlog + (signals.upcoming or 0)

    if arrival is not None and service_time is not None:
        load = arrival * service_time
        arrival_threads = float(threads_for_arrival(load, service_time, settings.target_latency))
        # The threads that arrivals leave free start the waiting jobs. The waiting jobs need more threads only
        # when those free threads would start them too late, and the queue is either old already or longer than
        # every running thread can start within the target. A young, short queue is the normal queueing of a busy
        # pool, which the Erlang C sizing already allows for.
        spare = signals.capacity - load
        target = settings.target_latency
        late = spare <= 0 or signals.latency + waiting * service_time / spare > target
        urgent = signals.latency > SCALE_OUT_LATENCY * target or waiting * service_time > target * max(
            signals.capacity, settings.concurrency
        )
        backlog_threads = 0.0
        if waiting and late and urgent:
            # The pool then needs the arrival load plus the threads that start the waiting jobs within the drain
            # time, one thread per job when jobs run longer than that. The headroom that the Erlang C sizing adds
            # above the load drains the backlog too, so only the rest is added.
            drain_threads = waiting * min(1.0, service_time / drain_time(settings))
            backlog_threads = max(0.0, load + drain_threads - arrival_threads)
    else:
        # Without a rate, keep the busy threads with headroom and give each waiting job a thread. This errs on
        # the large side, and the step limit bounds it until the next run measures a rate.
        arrival_threads = signals.busy * (1.0 + SCALE_OUT_MARGIN)
        backlog_threads = float(waiting)

    threads = max(arrival_threads + backlog_threads, 1.0 if waiting else 0.0)
    saturated = _saturated_by_long_jobs(signals, settings, state)
    if saturated:
        threads = max(threads, float(signals.capacity + settings.concurrency))
    return Demand(
        throughput=throughput,
        arrival=arrival,
        service_time=service_time,
        arrival_threads=arrival_threads,
        backlog_threads=backlog_threads,
        threads=threads,
        saturated=saturated,
    )


def _saturated_by_long_jobs(signals: PoolSignals, settings: PolicySettings, state: PolicyState) -> bool:
    """Return whether every thread is busy while jobs wait, at a time when jobs longer than the stop timeout run.

    The Erlang C sizing assumes job durations that spread like an exponential distribution. Jobs of minutes mixed
    with jobs of seconds spread far wider: the mean duration looks short, yet each long job occupies its thread for
    minutes. A pool whose threads are all busy then does not free a thread within seconds the way the model expects,
    and its queue only grows. So while such jobs run (or ran within LONG_JOB_MEMORY seconds, or their age is
    unknown), a saturated pool whose oldest waiting job has waited SATURATION_LATENCY of the target gets one more
    process, even when the model says the threads suffice. With short jobs only, a full pool catches up by itself
    and this rule stays out of the way.
    """
    # Threads of quiet processes finish their jobs and fetch no more, so only the others can be saturated.
    if signals.capacity <= 0 or signals.busy - signals.quiet_busy < signals.capacity or not signals.backlog:
        return False
    if signals.latency < SATURATION_LATENCY * settings.target_latency:
        return False
    long_now = signals.longest_running is not None and signals.longest_running >= settings.stop_timeout
    return long_now or _long_jobs_recent(signals, state)


def processes_for(threads: float, settings: PolicySettings) -> int:
    """Return the processes that give `threads` threads, within [min, max]."""
    needed = math.ceil(threads / settings.concurrency - 1e-9)
    return min(max(needed, settings.min_processes), settings.max_processes)


def _explain_demand(signals: PoolSignals, settings: PolicySettings, demand: Demand) -> list[str]:
    """Return the sentences that explain the demand and where it comes from."""
    concurrency = settings.concurrency
    sentences: list[str] = []
    if signals.backlog or signals.latency:
        comparison = "exceeds" if signals.latency > settings.target_latency else "is within"
        sentences.append(
            f"Backlog {signals.backlog} jobs with latency {_format_number(signals.latency)} s {comparison} "
            f"target {_format_number(settings.target_latency)} s."
        )
    if signals.upcoming:
        sentences.append(f"{signals.upcoming} scheduled jobs come due within {UPCOMING_WINDOW:.0f} s.")
    if demand.arrival is not None and demand.service_time is not None:
        arrival_processes = math.ceil(demand.arrival_threads / concurrency - 1e-9)
        total = math.ceil((demand.arrival_threads + demand.backlog_threads) / concurrency - 1e-9)
        text = (
            f"Arrival {_format_number(demand.arrival)} jobs/s at {_format_number(demand.service_time)} s per job "
            f"needs {_processes(arrival_processes)}"
        )
        if total > arrival_processes:
            drain = _format_number(drain_time(settings))
            text += f", and starting the waiting jobs within {drain} s needs {total - arrival_processes} more"
        sentences.append(text + ".")
    else:
        total = math.ceil((demand.arrival_threads + demand.backlog_threads) / concurrency - 1e-9)
        sentences.append(
            f"Throughput is not known yet, so {signals.busy} busy threads and {signals.backlog} waiting jobs "
            f"ask for {_processes(total)}."
        )
    needed = math.ceil(demand.threads / concurrency - 1e-9)
    if demand.saturated and needed > total:
        sentences.append(
            f"Every thread is busy and jobs wait while jobs longer than the stop timeout of "
            f"{_format_number(settings.stop_timeout)} s run, so the pool needs one process more than it has."
        )
    elif needed > total:
        sentences.append("Waking the pool because jobs wait for it.")
    recommendation = processes_for(demand.threads, settings)
    if recommendation != needed:
        bound = "minimum" if recommendation > needed else "maximum"
        sentences.append(f"The {bound} is {_processes(recommendation)}.")
    return sentences


def _keep_samples(samples: Sequence[Sample], now: float, settings: PolicySettings) -> tuple[Sample, ...]:
    horizon = max(settings.scale_in_stabilization, SERVICE_TIME_WINDOW, ARRIVAL_WINDOW)
    kept = [sample for sample in samples if now - horizon <= sample.at < now]
    return tuple(kept[-(MAX_SAMPLES - 1) :])


def decide(signals: PoolSignals, settings: PolicySettings, state: PolicyState | None = None) -> Decision:
    """Decide the desired process count of one pool and return it with its reason and the next state."""
    state = state or PolicyState()
    current = signals.requested if signals.requested is not None else signals.processes
    demand = estimate_demand(signals, settings, state)
    recommendation = processes_for(demand.threads, settings)

    long_job_seen_at = state.long_job_seen_at
    if signals.longest_running is not None and signals.longest_running >= settings.stop_timeout:
        long_job_seen_at = signals.now
    sample = Sample(
        at=signals.now,
        backlog=signals.backlog,
        busy=signals.busy,
        throughput=demand.throughput,
        threads=demand.threads,
        recommendation=recommendation,
    )
    next_state = replace(
        state,
        samples=(*_keep_samples(state.samples, signals.now, settings), sample),
        processed=signals.processed,
        processed_at=signals.now if signals.processed is not None else None,
        service_time=demand.service_time,
        long_job_seen_at=long_job_seen_at,
    )

    desired, action_sentence = _choose(signals, settings, next_state, current, demand)
    action = HOLD
    if desired > current:
        action = SCALE_OUT
    elif desired < current:
        action = SCALE_IN
    if action != HOLD:
        next_state = replace(
            next_state,
            last_action=action,
            last_action_at=signals.now,
            last_scale_out_at=signals.now if action == SCALE_OUT else next_state.last_scale_out_at,
        )
    sentences = [] if settings.singleton or settings.fixed else _explain_demand(signals, settings, demand)
    details: dict[str, Any] = {
        "backlog": signals.backlog,
        "latency": signals.latency,
        "busy": signals.busy,
        "upcoming": signals.upcoming,
        "throughput": demand.throughput,
        "arrival": demand.arrival,
        "service_time": demand.service_time,
        "threads_needed": demand.threads,
    }
    return Decision(
        desired=desired,
        current=current,
        action=action,
        reason=" ".join([*sentences, action_sentence]),
        recommendation=recommendation,
        state=next_state,
        details=details,
    )


def _choose(
    signals: PoolSignals, settings: PolicySettings, state: PolicyState, current: int, demand: Demand
) -> tuple[int, str]:
    """Apply the fixed-size rules, the bounds, the steps, the cooldowns and the stabilization window."""
    if settings.singleton:
        return current, f"Holding at {current}: the pool serves a singleton queue and is never scaled."
    if settings.fixed:
        return current, (
            f"Holding at {current}: the pool has a fixed size of {settings.min_processes} (processes min == max), "
            "which deploys keep, so the autoscaler never changes it."
        )
    if current < settings.min_processes:
        return settings.min_processes, f"Scaling out from {current} to the minimum of {settings.min_processes}."
    if current > settings.max_processes:
        return settings.max_processes, f"Scaling in from {current} to the maximum of {settings.max_processes}."
    if processes_for(demand.threads, settings) > current:
        return _scale_out(signals, settings, state, current, demand.threads, demand.saturated)
    return _scale_in(signals, settings, state, current)


def _scale_out(
    signals: PoolSignals, settings: PolicySettings, state: PolicyState, current: int, threads: float, saturated: bool
) -> tuple[int, str]:
    now = signals.now
    capacity = current * settings.concurrency
    latency_low = signals.latency <= SCALE_OUT_LATENCY * settings.target_latency
    if threads <= capacity * (1.0 + SCALE_OUT_MARGIN) and latency_low and not saturated:
        return current, (
            f"Holding at {_processes(current)}: the demand of {_format_number(threads)} threads is within "
            f"{round(SCALE_OUT_MARGIN * 100)} % of the {capacity} threads running and latency is low."
        )
    recommendation = processes_for(threads, settings)
    if state.last_scale_out_at is not None and now - state.last_scale_out_at < settings.scale_out_cooldown:
        waited = _format_number(now - state.last_scale_out_at)
        return current, (
            f"Holding at {current} for now: the last scale-out was {waited} s ago and the scale-out cooldown is "
            f"{_format_number(settings.scale_out_cooldown)} s."
        )
    desired = min(recommendation, current + settings.max_step_out)
    limit = f" (max step {settings.max_step_out})" if desired < recommendation else ""
    return desired, f"Scaling out from {current} to {desired}{limit}."


def _scale_in(signals: PoolSignals, settings: PolicySettings, state: PolicyState, current: int) -> tuple[int, str]:
    now = signals.now
    window_start = now - settings.scale_in_stabilization
    in_window = [sample for sample in state.samples if sample.at >= window_start]
    peak = max(sample.threads for sample in in_window)
    # A demand that still grows is projected one window ahead, because a scale-in now would be undone by the
    # next scale-out.
    oldest, newest = in_window[0], in_window[-1]
    if newest.at > oldest.at and newest.threads > oldest.threads:
        slope = (newest.threads - oldest.threads) / (newest.at - oldest.at)
        peak = max(peak, newest.threads + slope * settings.scale_in_stabilization)
    target = processes_for(peak * (1.0 + SCALE_IN_MARGIN), settings)
    window = _format_number(settings.scale_in_stabilization)
    if target >= current:
        return current, f"Holding at {_processes(current)}, enough for the demand of the last {window} s."

    # The busy threads of the window are demand that was served, so they bound a scale-in too. Without them a
    # rate that swings within the arrival window would scale in between its peaks and out again at each peak.
    busy_peak = max(sample.busy for sample in in_window)
    busy_floor = processes_for(busy_peak, settings)
    if busy_floor >= current:
        return current, (
            f"Holding at {_processes(current)}: demand fits {_processes(target)}, but up to {busy_peak} threads "
            f"were busy in the last {window} s."
        )
    target = max(target, busy_floor)

    if state.last_action_at is not None and now - state.last_action_at < settings.scale_in_cooldown:
        waited = _format_number(now - state.last_action_at)
        return current, (
            f"Holding at {current} for now: the last scaling action was {waited} s ago and the scale-in cooldown "
            f"is {_format_number(settings.scale_in_cooldown)} s."
        )

    desired = max(target, current - settings.max_step_in)
    limit = f" (max step {settings.max_step_in})" if desired > target else ""
    if _long_jobs_recent(signals, state) and signals.idle_processes is not None:
        # NOTE: a process that was idle at the reading can fetch a long job before the backend quiets it, and that
        # job is then interrupted at the stop timeout. The backend narrows the gap by quieting the least busy.
        idle = signals.idle_processes
        if signals.longest_running is None:
            why = "the age of running jobs is unknown"
        else:
            stop_timeout = _format_number(settings.stop_timeout)
            why = f"jobs ran longer than the stop timeout of {stop_timeout} s in the last {LONG_JOB_MEMORY:.0f} s"
        if current - desired > idle:
            desired = current - idle
            if desired == current:
                return current, (
                    f"Holding at {current}: demand fits {_processes(target)}, but {why} and no process is idle, "
                    "so a scale-in would interrupt jobs."
                )
            limit = f" (only {idle} idle, because {why})"
    peak_text = _format_number(peak)
    margin = round(SCALE_IN_MARGIN * 100)
    return desired, (
        f"The peak demand of the last {window} s is {peak_text} threads, which fits {_processes(target)} with a "
        f"{margin} % margin, so scaling in from {current} to {desired}{limit}."
    )


def _long_jobs_recent(signals: PoolSignals, state: PolicyState) -> bool:
    """Return whether scale-in must spare busy processes: long jobs ran recently, or their age is unknown."""
    if signals.longest_running is None:
        return True
    return state.long_job_seen_at is not None and signals.now - state.long_job_seen_at <= LONG_JOB_MEMORY
