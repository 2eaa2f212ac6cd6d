"""Per-pool signals from a SidekiqState: backlog, maximum latency, busy threads, live capacity, upcoming jobs
and the age of the oldest running job.

A pool is one entry of ``sidekiq_pools``: a ``name`` and its ``queues``, given as plain names or as
``[name, weight]`` pairs. Other keys of the entry (concurrency, processes, autoscale, ...) are ignored
here, so the same list from group_vars can be passed as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    PoolState,
    ProcessState,
    SidekiqState,
)


class PoolSpecError(ValueError):
    """A pool entry lacks a name or has an invalid queue list."""


@dataclass(frozen=True)
class PoolSpec:
    name: str
    queues: tuple[str, ...]


def parse_pool_specs(pools: Iterable[Mapping[str, Any]] | None) -> list[PoolSpec]:
    """Validate pool entries and return their names and queue names; raise PoolSpecError on the first error."""
    specs: list[PoolSpec] = []
    seen: set[str] = set()
    for index, pool in enumerate(pools or []):
        if not isinstance(pool, Mapping):
            raise PoolSpecError(
                f"pools[{index}] must be a mapping with 'name' and 'queues', got {type(pool).__name__}."
            )
        name = pool.get("name")
        if not isinstance(name, str) or not name:
            raise PoolSpecError(f"pools[{index}] has no name: every pool needs a non-empty 'name'.")
        if name in seen:
            raise PoolSpecError(f"Pool '{name}' is listed twice: pool names must be unique.")
        seen.add(name)
        specs.append(PoolSpec(name=name, queues=_parse_queue_list(name, pool.get("queues"))))
    return specs


def aggregate_pools(state: SidekiqState, specs: Iterable[PoolSpec]) -> dict[str, PoolState]:
    """Sum the state over each pool's queues.

    A queue listed by two pools counts in both, and a process that lists queues of two pools adds its
    whole concurrency to both, because Sidekiq does not record how a process splits its threads.
    """
    live = state.live_processes
    pools: dict[str, PoolState] = {}
    for spec in specs:
        names = set(spec.queues)
        queued = sum(state.queues[queue].size for queue in spec.queues if queue in state.queues)
        scheduled_due, scheduled_estimated = state.scheduled.due_for_queues(spec.queues)
        retry_due, retry_estimated = state.retries.due_for_queues(spec.queues)
        scheduled_upcoming, _estimated = state.scheduled.upcoming_for_queues(spec.queues)
        retry_upcoming, _estimated = state.retries.upcoming_for_queues(spec.queues)
        latencies = [state.queues[queue].latency for queue in spec.queues if queue in state.queues]
        serving = [process for process in live if names & set(process.queues)]
        active = [process for process in serving if not process.quiet]

        pools[spec.name] = PoolState(
            name=spec.name,
            queues=spec.queues,
            queued=queued,
            scheduled_due=scheduled_due,
            retry_due=retry_due,
            backlog=queued + scheduled_due + retry_due,
            latency=max(latencies, default=0.0),
            busy=sum(process.busy_by_queue.get(queue, 0) for process in live for queue in names),
            capacity=sum(process.concurrency for process in active),
            processes=len(active),
            quiet_processes=len(serving) - len(active),
            due_estimated=scheduled_estimated or retry_estimated,
            upcoming=scheduled_upcoming + retry_upcoming,
            longest_running=longest_running(live, names, state.now),
        )
    return pools


def longest_running(processes: Iterable[ProcessState], queues: set[str], now: float) -> float | None:
    """Return the seconds since the oldest job of the queues started running in the processes.

    Returns 0.0 when no job of the queues runs, and None when a running job's ``run_at`` is unknown, because
    that job may be the oldest. A ``run_at`` ahead of the Redis clock (a skewed worker clock) counts as 0 s.
    """
    oldest: float | None = None
    for process in processes:
        if any(process.unknown_run_at_by_queue.get(queue, 0) for queue in queues):
            return None
        for queue in queues:
            started = process.oldest_run_at_by_queue.get(queue)
            if started is not None and (oldest is None or started < oldest):
                oldest = started
    return 0.0 if oldest is None else max(now - oldest, 0.0)


def _parse_queue_list(pool: str, queues: Any) -> tuple[str, ...]:
    if not isinstance(queues, list) or not queues:
        raise PoolSpecError(f"Pool '{pool}' needs 'queues': a non-empty list of names or [name, weight] pairs.")
    names: list[str] = []
    for entry in queues:
        if isinstance(entry, str) and entry:
            names.append(entry)
        elif (
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and isinstance(entry[0], str)
            and entry[0]
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
        ):
            names.append(entry[0])
        else:
            raise PoolSpecError(
                f"Pool '{pool}' has an invalid queue entry {entry!r}: use a queue name or a [name, weight] pair "
                "with an integer weight."
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PoolSpecError(f"Pool '{pool}' lists the queues {duplicates} more than once.")
    return tuple(names)
