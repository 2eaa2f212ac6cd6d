"""Typed snapshot of a Sidekiq fleet's state as read from Redis.

All times are epoch seconds and all durations are seconds, whatever unit Sidekiq stored: Sidekiq 8.0+
writes ``enqueued_at`` in milliseconds, earlier versions in seconds. ``to_dict()`` gives plain values for
Ansible module results.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

# A process hash expires 60 s after its last heartbeat (Sidekiq 6.4 launcher: EXPIRE <identity> 60), so a
# process that has not beaten for longer is gone even when its hash was written by hand or by a skewed clock.
STALE_AFTER_SECONDS = 60.0


@dataclass(frozen=True)
class QueueState:
    """One queue from Sidekiq's ``queues`` set."""

    name: str
    size: int
    # Seconds since the oldest job was enqueued, as Sidekiq::Queue#latency computes it; 0 for an empty queue
    # or when the oldest job has no readable enqueued_at (then it is also counted as malformed).
    latency: float
    oldest_enqueued_at: float | None
    # Threads of live processes running a job from this queue, from their work hashes.
    busy: int
    # Live processes that are not quiet and list this queue: 0 for a non-empty queue means nothing fetches it.
    live_processes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProcessState:
    """One member of Sidekiq's ``processes`` set with its heartbeat hash."""

    identity: str
    # hostname and pid come from the heartbeat info, or from the identity (host:pid:nonce) once the hash is gone.
    hostname: str | None
    pid: int | None
    tag: str | None
    labels: tuple[str, ...]
    # Sidekiq version, written in the heartbeat info from 7.0; None for 6.x.
    version: str | None
    # From the hash field "concurrency" (Sidekiq 8.1.2+), else from the info JSON; 0 when unknown.
    concurrency: int
    queues: tuple[str, ...]
    # The heartbeat's "busy" field, which Sidekiq::Stats#workers_size sums.
    busy: int
    # Busy threads per queue, from "<identity>:workers" (6.4) and "<identity>:work" (6.5+).
    busy_by_queue: dict[str, int]
    quiet: bool
    beat: float | None
    seconds_since_beat: float | None
    rss_kb: int
    live: bool
    stale_reason: str | None
    # Per queue, the earliest ``run_at`` (epoch seconds) of the jobs this process runs, from its work hashes.
    oldest_run_at_by_queue: dict[str, float] = field(default_factory=dict)
    # Per queue, work entries whose ``run_at`` could not be read, so the age of their job is unknown.
    unknown_run_at_by_queue: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["queues"] = list(self.queues)
        return data


@dataclass(frozen=True)
class JobSetState:
    """The ``schedule`` or ``retry`` sorted set: size, due entries and their queues."""

    name: str
    size: int
    # Entries whose score (run-at time) is not after the read time: ZCOUNT <set> -inf now, exact.
    due: int
    # Due entries per queue, from the first ``due_scanned`` due entries in score order.
    due_by_queue: dict[str, int]
    due_scanned: int
    # Entries that come due after the read time and within the upcoming window (ZCOUNT, exact), and per queue
    # from the first ``upcoming_scanned`` of them.
    upcoming: int = 0
    upcoming_by_queue: dict[str, int] = field(default_factory=dict)
    upcoming_scanned: int = 0

    @property
    def due_truncated(self) -> bool:
        """True when more entries were due than the scan limit let the reader decode."""
        return self.due_scanned < self.due

    def due_for_queues(self, queues: Iterable[str]) -> tuple[int, bool]:
        """Count due entries for the queues; return the count and whether it is an estimate.

        When the scan was truncated, the counts found are scaled by due / due_scanned and rounded, which
        assumes the unscanned due entries spread over queues as the scanned ones do.
        """
        found = sum(self.due_by_queue.get(queue, 0) for queue in queues)
        return _scaled(found, self.due, self.due_scanned)

    def upcoming_for_queues(self, queues: Iterable[str]) -> tuple[int, bool]:
        """Count upcoming entries for the queues, scaled like `due_for_queues` when the scan was truncated."""
        found = sum(self.upcoming_by_queue.get(queue, 0) for queue in queues)
        return _scaled(found, self.upcoming, self.upcoming_scanned)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["due_truncated"] = self.due_truncated
        return data


def _scaled(found: int, total: int, scanned: int) -> tuple[int, bool]:
    """Scale a count from the scanned entries up to all of them; return it and whether it is an estimate."""
    truncated = scanned < total
    if not truncated or scanned == 0:
        return found, truncated
    return round(found * total / scanned), True


@dataclass(frozen=True)
class PoolState:
    """Signals for one worker pool, summed over the pool's queues."""

    name: str
    queues: tuple[str, ...]
    queued: int
    scheduled_due: int
    retry_due: int
    # queued + scheduled_due + retry_due: jobs that should be running now.
    backlog: int
    # Maximum latency over the pool's queues.
    latency: float
    # Threads of live processes running jobs from the pool's queues.
    busy: int
    # Sum of concurrency over live, not quiet processes that list any of the pool's queues.
    capacity: int
    processes: int
    quiet_processes: int
    # True when a due count was scaled up from a truncated scan (see JobSetState.due_for_queues).
    due_estimated: bool
    # Scheduled and retry jobs of the pool's queues that come due within the upcoming window of the read.
    upcoming: int = 0
    # Seconds since the oldest running job of the pool's queues started (work hash ``run_at``); 0.0 when none
    # runs, None when a running job's ``run_at`` could not be read.
    longest_running: float | None = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["queues"] = list(self.queues)
        return data


@dataclass(frozen=True)
class MalformedEntries:
    """Entries of one kind skipped for one reason, with a few keys or identities where they were found."""

    kind: str
    reason: str
    count: int
    examples: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "count": self.count, "examples": list(self.examples)}


@dataclass(frozen=True)
class SidekiqState:
    """Everything the reader gathered in one call, at Redis server time ``now``."""

    now: float
    processed: int
    failed: int
    queues: dict[str, QueueState]
    scheduled: JobSetState
    retries: JobSetState
    dead: int
    processes: tuple[ProcessState, ...]
    malformed: tuple[MalformedEntries, ...]
    # False when the database holds no Sidekiq key at all: usually a wrong redis_db or redis_namespace.
    sidekiq_data_found: bool
    pools: dict[str, PoolState] = field(default_factory=dict)
    round_trips: int = 0

    @property
    def enqueued(self) -> int:
        """Jobs waiting in all queues, as Sidekiq::Stats#enqueued counts them."""
        return sum(queue.size for queue in self.queues.values())

    @property
    def live_processes(self) -> tuple[ProcessState, ...]:
        return tuple(process for process in self.processes if process.live)

    @property
    def stale_processes(self) -> tuple[ProcessState, ...]:
        return tuple(process for process in self.processes if not process.live)

    @property
    def busy(self) -> int:
        """Busy threads of live processes, counted from their work hashes."""
        return sum(sum(process.busy_by_queue.values()) for process in self.live_processes)

    @property
    def malformed_total(self) -> int:
        return sum(entry.count for entry in self.malformed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "sidekiq_data_found": self.sidekiq_data_found,
            "processed": self.processed,
            "failed": self.failed,
            "enqueued": self.enqueued,
            "busy": self.busy,
            "queues": {name: queue.to_dict() for name, queue in self.queues.items()},
            "scheduled": self.scheduled.to_dict(),
            "retries": self.retries.to_dict(),
            "dead": self.dead,
            "processes": [process.to_dict() for process in self.processes],
            "live_processes": len(self.live_processes),
            "stale_processes": len(self.stale_processes),
            "pools": {name: pool.to_dict() for name, pool in self.pools.items()},
            "malformed": [entry.to_dict() for entry in self.malformed],
            "malformed_total": self.malformed_total,
            "round_trips": self.round_trips,
        }
