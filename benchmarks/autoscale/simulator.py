"""A discrete-event simulation of one Sidekiq pool under an autoscaler.

The model follows Sidekiq 6.x:

- Each process runs `concurrency` threads. A free thread takes the job at the head of the queue at once, and
  when several threads are free, a job goes to one of them at random (Sidekiq threads block on BRPOP).
- A process counts as worker time from the moment it is started, so its boot delay costs time too.
- Scheduled (and retry) jobs wait in a sorted set until they are due. A running, non-quiet process moves the due
  ones to the queue on its poll, modelled as one poll of the whole pool every `poll_interval` seconds. With no
  running process, due jobs are never moved.
- Scale-in picks the least busy running processes (the newest first among equals) and quiets them. A quiet
  process takes no new job and stops as soon as it is idle. Jobs still running `stop_timeout` seconds after the
  quiet are pushed back to the head of the queue with their original `enqueued_at` and count as interrupted.
  Processes still booting are stopped first.

Controllers see an `Observation` built the way the Redis reader builds its signals: backlog, latency, busy
threads, live processes and a processed counter. Latency comes from `enqueued_at` of the head of the queue and
from the score of the oldest due scheduled job. The reported job wait is measured from the time a job became due (its
arrival, or its scheduled time) to the start of the run that finished it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .traces import Trace

BOOTING = 0
RUNNING = 1
QUIET = 2
STOPPED = 3

_COMPLETE = 0
_BOOTED = 1
_STOP_DEADLINE = 2
_CONTROL = 3
_POLL = 4
_SAMPLE = 5


@dataclass(frozen=True)
class PoolConfig:
    """The simulated pool and platform.

    Attributes:
        concurrency: threads per process.
        min_processes, max_processes: bounds that every controller must respect.
        initial_processes: processes running (already booted) at time 0.
        boot_delay: seconds from starting a process until it takes jobs.
        stop_timeout: Sidekiq's `timeout`, seconds a quieted process may finish its jobs.
        poll_interval: seconds between moves of due scheduled jobs to the queue.
        sample_interval: seconds between metric samples (latency above target, plots).
        target_latency: the latency target in seconds that "minutes above target" is measured against.
    """

    concurrency: int = 10
    min_processes: int = 1
    max_processes: int = 20
    initial_processes: int = 1
    boot_delay: float = 30.0
    stop_timeout: float = 25.0
    poll_interval: float = 5.0
    sample_interval: float = 5.0
    target_latency: float = 10.0
    upcoming_window: float = 60.0

    def pool_dict(self, autoscale: dict[str, float] | None = None) -> dict[str, object]:
        """Return the pool as group_vars would define it, for `settings_from_pool`."""
        pool: dict[str, object] = {
            "name": "simulated",
            "queues": ["default"],
            "concurrency": self.concurrency,
            "timeout": int(self.stop_timeout),
            "processes": {"min": self.min_processes, "max": self.max_processes},
            "autoscale": {"target_latency": self.target_latency, **(autoscale or {})},
        }
        return pool


@dataclass(frozen=True)
class Observation:
    """Pool state that an autoscaler reads at one run.

    Attributes:
        now: simulated seconds since the start.
        queued: length of the queue list.
        due_scheduled: scheduled jobs that are due but not yet moved to the queue.
        latency: seconds since `enqueued_at` of the queue head, or since the oldest due scheduled job was due,
            whichever is larger.
        queue_latency: seconds since `enqueued_at` of the queue head only, 0 for an empty queue (Sidekiq's
            `Sidekiq::Queue#latency`).
        busy: busy threads of all live processes, quiet ones included.
        processes: running processes that are not quiet.
        capacity: threads of those processes.
        requested: processes the platform runs or boots, quiet ones excluded (the replica count).
        idle_processes: running, non-quiet processes with no busy thread.
        longest_running: age in seconds of the oldest running job.
        processed: jobs finished since the start.
        upcoming: scheduled jobs that come due within the next `upcoming_window` seconds.
        quiet_busy: the part of `busy` that runs in quiet processes.
    """

    now: float
    queued: int
    due_scheduled: int
    latency: float
    busy: int
    processes: int
    capacity: int
    requested: int
    idle_processes: int
    longest_running: float
    processed: int
    upcoming: int = 0
    queue_latency: float = 0.0
    quiet_busy: int = 0

    @property
    def backlog(self) -> int:
        """Jobs waiting for the pool: queued plus due scheduled."""
        return self.queued + self.due_scheduled


class Controller(Protocol):
    """An autoscaler: it is called every `interval` seconds and returns the desired process count."""

    name: str
    interval: float

    def desired(self, observation: Observation) -> int: ...


class _Job:
    __slots__ = ("attempt", "due", "duration", "enqueued_at", "number", "process", "started")

    def __init__(self, number: int, due: float, duration: float) -> None:
        self.number = number
        self.due = due
        self.duration = duration
        self.enqueued_at = due
        self.started = -1.0
        self.attempt = 0
        self.process: _Process | None = None


class _Process:
    __slots__ = ("busy", "jobs", "number", "started_at", "state")

    def __init__(self, number: int, started_at: float, state: int) -> None:
        self.number = number
        self.started_at = started_at
        self.state = state
        self.busy = 0
        self.jobs: set[_Job] = set()


@dataclass
class SimulationResult:
    """Measurements of one simulation run.

    Attributes:
        controller, trace: names.
        horizon: simulated seconds.
        worker_seconds: process-seconds paid for, booting and draining included.
        waits: wait of every finished job, seconds (array of doubles).
        arrived, finished, queued_at_end, due_at_end, running_at_end: job accounting.
        interrupted: jobs pushed back by a scale-in that hit the stop timeout.
        actions: (time, old count, new count) of every change of the requested count.
        seconds_above_target: sampled time with the oldest waiting job older than the target latency.
        series_time, series_processes, series_latency: samples for plots (processes paid for, latency in s).
    """

    controller: str
    trace: str
    horizon: float
    worker_seconds: float = 0.0
    waits: array[float] = field(default_factory=lambda: array("d"))
    arrived: int = 0
    finished: int = 0
    queued_at_end: int = 0
    due_at_end: int = 0
    running_at_end: int = 0
    interrupted: int = 0
    actions: list[tuple[float, int, int]] = field(default_factory=list)
    seconds_above_target: float = 0.0
    series_time: array[float] = field(default_factory=lambda: array("d"))
    series_processes: array[int] = field(default_factory=lambda: array("i"))
    series_latency: array[float] = field(default_factory=lambda: array("d"))

    def percentile_wait(self, fraction: float) -> float:
        """Return the wait below which `fraction` of the finished jobs fall (nearest rank)."""
        if not self.waits:
            return 0.0
        ordered = sorted(self.waits)
        rank = max(0, math.ceil(fraction * len(ordered)) - 1)
        return ordered[rank]

    @property
    def reversals(self) -> int:
        """Count consecutive scaling actions that go in opposite directions."""
        return count_reversals([new - old for _, old, new in self.actions])

    def summary(self) -> dict[str, float | int | str]:
        """Return the reported figures of this run."""
        ordered = sorted(self.waits)

        def rank(fraction: float) -> float:
            if not ordered:
                return 0.0
            return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

        return {
            "controller": self.controller,
            "trace": self.trace,
            "worker_hours": self.worker_seconds / 3600.0,
            "p50_wait": rank(0.50),
            "p95_wait": rank(0.95),
            "p99_wait": rank(0.99),
            "minutes_above_target": self.seconds_above_target / 60.0,
            "actions": len(self.actions),
            "reversals": self.reversals,
            "interrupted": self.interrupted,
            "arrived": self.arrived,
            "finished": self.finished,
            "left_waiting": self.queued_at_end + self.due_at_end,
        }


def count_reversals(steps: list[int]) -> int:
    """Count sign changes between consecutive non-zero steps: +,+,-,+ has two reversals."""
    reversals = 0
    previous = 0
    for step in steps:
        if step == 0:
            continue
        if previous and (step > 0) != (previous > 0):
            reversals += 1
        previous = step
    return reversals


class Simulation:
    """One pool, one trace and one controller; `run` simulates until the trace's horizon."""

    def __init__(
        self,
        trace: Trace,
        controller: Controller,
        config: PoolConfig,
        seed: int = 1,
        on_observation: Callable[[Observation, int], None] | None = None,
    ) -> None:
        self.trace = trace
        self.controller = controller
        self.config = config
        self.random = random.Random(seed)
        self.on_observation = on_observation
        self.now = 0.0
        self.queue: deque[_Job] = deque()
        self.scheduled_due: deque[_Job] = deque()
        self.free_threads: list[_Process] = []
        self.processes: list[_Process] = []
        self.events: list[tuple[float, int, int, Any, int]] = []
        self.sequence = 0
        self.process_numbers = 0
        self.processed = 0
        self.result = SimulationResult(controller=controller.name, trace=trace.name, horizon=trace.horizon)
        # scheduled_before[i] is the number of scheduled jobs among the first i jobs of the trace.
        self.scheduled_before = array("l", itertools.accumulate(trace.scheduled, initial=0))

    # Event plumbing.

    def _push(self, at: float, kind: int, subject: Any = None, token: int = 0) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, self.sequence, kind, subject, token))

    # Jobs.

    def _start_job(self, job: _Job, process: _Process) -> None:
        process.busy += 1
        process.jobs.add(job)
        job.process = process
        job.started = self.now
        self._push(self.now + job.duration, _COMPLETE, job, job.attempt)

    def _take_free_thread(self) -> _Process:
        index = int(self.random.random() * len(self.free_threads))
        process = self.free_threads[index]
        self.free_threads[index] = self.free_threads[-1]
        self.free_threads.pop()
        return process

    def _dispatch(self) -> None:
        while self.queue and self.free_threads:
            self._start_job(self.queue.popleft(), self._take_free_thread())

    def _arrive(self, due: float, duration: float, scheduled: bool) -> None:
        self.result.arrived += 1
        job = _Job(self.result.arrived, due, duration)
        if scheduled:
            self.scheduled_due.append(job)
        elif self.free_threads and not self.queue:
            self._start_job(job, self._take_free_thread())
        else:
            self.queue.append(job)

    def _complete(self, job: _Job, attempt: int) -> None:
        process = job.process
        if process is None or job.attempt != attempt:
            return  # the run was interrupted and the job pushed back
        process.jobs.discard(job)
        process.busy -= 1
        job.process = None
        self.processed += 1
        self.result.finished += 1
        self.result.waits.append(job.started - job.due)
        if process.state == RUNNING:
            if self.queue:
                self._start_job(self.queue.popleft(), process)
            else:
                self.free_threads.append(process)
        elif process.state == QUIET and process.busy == 0:
            self._stop(process)

    def _poll_scheduled(self) -> None:
        if not any(process.state == RUNNING for process in self.processes):
            return
        while self.scheduled_due:
            job = self.scheduled_due.popleft()
            job.enqueued_at = self.now
            self.queue.append(job)
        self._dispatch()

    # Processes.

    def _launch(self, booted: bool) -> None:
        self.process_numbers += 1
        process = _Process(self.process_numbers, self.now, RUNNING if booted else BOOTING)
        self.processes.append(process)
        if booted:
            self.free_threads.extend([process] * self.config.concurrency)
        else:
            self._push(self.now + self.config.boot_delay, _BOOTED, process)

    def _booted(self, process: _Process) -> None:
        if process.state != BOOTING:
            return
        process.state = RUNNING
        self.free_threads.extend([process] * self.config.concurrency)
        self._dispatch()

    def _quiet(self, process: _Process) -> None:
        process.state = QUIET
        self.free_threads = [thread for thread in self.free_threads if thread is not process]
        if process.busy == 0:
            self._stop(process)
        else:
            self._push(self.now + self.config.stop_timeout, _STOP_DEADLINE, process)

    def _stop_deadline(self, process: _Process) -> None:
        if process.state != QUIET:
            return
        # Sorted by start and arrival number, so that runs repeat exactly (a set iterates in address order).
        for job in sorted(process.jobs, key=lambda running: (running.started, running.number)):
            job.attempt += 1
            job.process = None
            self.result.interrupted += 1
            self.queue.appendleft(job)
        process.jobs.clear()
        process.busy = 0
        self._stop(process)
        self._dispatch()

    def _stop(self, process: _Process) -> None:
        process.state = STOPPED
        self.result.worker_seconds += self.now - process.started_at
        self.processes.remove(process)

    def requested(self) -> int:
        """Processes booting or running, quiet ones excluded."""
        return sum(1 for process in self.processes if process.state in (BOOTING, RUNNING))

    def apply(self, desired: int) -> None:
        """Start or quiet processes until `desired` processes boot or run."""
        current = self.requested()
        if desired == current:
            return
        self.result.actions.append((self.now, current, desired))
        for _ in range(desired - current):
            self._launch(booted=False)
        surplus = current - desired
        if surplus <= 0:
            return
        booting = [process for process in self.processes if process.state == BOOTING]
        for process in sorted(booting, key=lambda item: -item.started_at)[:surplus]:
            self._stop(process)
            surplus -= 1
        running = [process for process in self.processes if process.state == RUNNING]
        running.sort(key=lambda item: (item.busy, -item.started_at))
        for process in running[:surplus]:
            self._quiet(process)

    # Observation and metrics.

    def observe(self) -> Observation:
        """Read the pool the way the Redis reader does."""
        now = self.now
        queue_latency = 0.0
        if self.queue:
            queue_latency = now - self.queue[0].enqueued_at
        latency = queue_latency
        if self.scheduled_due:
            latency = max(latency, now - self.scheduled_due[0].due)
        busy = running = idle = quiet_busy = 0
        oldest_start = now
        for process in self.processes:
            busy += process.busy
            if process.state == RUNNING:
                running += 1
                if process.busy == 0:
                    idle += 1
            elif process.state == QUIET:
                quiet_busy += process.busy
            for job in process.jobs:
                oldest_start = min(oldest_start, job.started)
        return Observation(
            now=now,
            queued=len(self.queue),
            due_scheduled=len(self.scheduled_due),
            latency=latency,
            busy=busy,
            processes=running,
            capacity=running * self.config.concurrency,
            requested=self.requested(),
            idle_processes=idle,
            longest_running=now - oldest_start,
            processed=self.processed,
            upcoming=self.upcoming(now),
            queue_latency=queue_latency,
            quiet_busy=quiet_busy,
        )

    def upcoming(self, now: float) -> int:
        """Count scheduled jobs due after `now` and at most `upcoming_window` seconds later."""
        first = bisect.bisect_right(self.trace.times, now)
        last = bisect.bisect_right(self.trace.times, now + self.config.upcoming_window)
        return self.scheduled_before[last] - self.scheduled_before[first]

    def _control(self) -> None:
        observation = self.observe()
        desired = self.controller.desired(observation)
        if not self.config.min_processes <= desired <= self.config.max_processes:
            raise ValueError(
                f"controller {self.controller.name} asked for {desired} processes, outside "
                f"[{self.config.min_processes}, {self.config.max_processes}]"
            )
        if self.on_observation is not None:
            self.on_observation(observation, desired)
        self.apply(desired)

    def _sample(self) -> None:
        now = self.now
        oldest_due = now
        if self.queue:
            oldest_due = self.queue[0].due
        if self.scheduled_due:
            oldest_due = min(oldest_due, self.scheduled_due[0].due)
        latency = now - oldest_due
        if latency > self.config.target_latency:
            self.result.seconds_above_target += self.config.sample_interval
        self.result.series_time.append(now)
        self.result.series_processes.append(len(self.processes))
        self.result.series_latency.append(latency)

    # Main loop.

    def run(self) -> SimulationResult:
        """Simulate from 0 to the trace's horizon and return the measurements."""
        config = self.config
        for _ in range(config.initial_processes):
            self._launch(booted=True)
        self._push(0.0, _POLL)
        self._push(config.sample_interval, _SAMPLE)
        self._push(self.controller.interval, _CONTROL)

        times, durations, scheduled = self.trace.times, self.trace.durations, self.trace.scheduled
        count = len(times)
        index = 0
        horizon = self.trace.horizon
        events = self.events
        while True:
            next_arrival = times[index] if index < count else math.inf
            next_event = events[0][0] if events else math.inf
            if min(next_arrival, next_event) > horizon:
                break
            if next_arrival <= next_event:
                self.now = next_arrival
                self._arrive(next_arrival, durations[index], bool(scheduled[index]))
                index += 1
                continue
            at, _, kind, subject, token = heapq.heappop(events)
            self.now = at
            if kind == _COMPLETE:
                self._complete(subject, token)
            elif kind == _CONTROL:
                self._control()
                self._push(at + self.controller.interval, _CONTROL)
            elif kind == _POLL:
                self._poll_scheduled()
                self._push(at + config.poll_interval, _POLL)
            elif kind == _SAMPLE:
                self._sample()
                self._push(at + config.sample_interval, _SAMPLE)
            elif kind == _BOOTED:
                self._booted(subject)
            else:
                self._stop_deadline(subject)
        return self._finish(horizon)

    def _finish(self, horizon: float) -> SimulationResult:
        result = self.result
        self.now = horizon
        for process in self.processes:
            result.worker_seconds += horizon - process.started_at
        result.queued_at_end = len(self.queue)
        result.due_at_end = len(self.scheduled_due)
        result.running_at_end = sum(process.busy for process in self.processes)
        return result


def simulate(trace: Trace, controller: Controller, config: PoolConfig, seed: int = 1) -> SimulationResult:
    """Run one simulation and return its measurements."""
    return Simulation(trace, controller, config, seed=seed).run()
