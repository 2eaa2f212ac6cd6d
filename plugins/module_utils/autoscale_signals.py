"""Input checks and per-pool signals of an autoscaling run: from the pools, Sidekiq's state and the unit readings.

Pure functions: the module reads Redis and the hosts, and these turn what it read into `PoolSignals` for the
policy and into the reasons a pool is not scaled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import FleetRecord
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import HostReading, Instance
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import (
    PolicySettings,
    PoolSignals,
    settings_from_pool,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    PoolState,
    ProcessState,
    SidekiqState,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_pools import longest_running

# Weight key for busy threads of live processes whose tag matches no pool (started by hand, another app).
OTHER_PROCESSES = "(other)"


def validate_request(
    pools: Any,
    singleton_queues: Sequence[str],
    pools_filter: Sequence[str],
    margin: int,
) -> tuple[dict[str, PolicySettings], list[str]]:
    """Check the pools, their autoscale settings and the filter; return the settings per pool and every error.

    The pool model's own checks (names, queues, sizes, singleton queues) run first, then the policy's checks of
    the autoscale keys (cooldowns, steps, target latency). Errors name the pool, the value and the fix.
    """
    errors = list(pool_model.validate_pools(pools, singleton_queues=singleton_queues, margin=margin))
    settings: dict[str, PolicySettings] = {}
    if isinstance(pools, list):
        for pool in pools:
            if not isinstance(pool, Mapping) or not isinstance(pool.get("name"), str):
                continue
            try:
                settings[pool["name"]] = settings_from_pool(pool, singleton_queues)
            except ValueError as error:
                if str(error) not in errors:
                    errors.append(str(error))
    known = [pool.get("name") for pool in pools if isinstance(pool, Mapping)] if isinstance(pools, list) else []
    unknown = [name for name in pools_filter if name not in known]
    if unknown:
        errors.append(f"pools_filter names unknown pools {unknown}; use names from pools: {sorted(map(str, known))}")
    return settings, errors


def pool_tag(pool: Mapping[str, Any]) -> str:
    """Return the tag the sidekiq role gives the pool's processes: the pool's `tag`, else its name."""
    return str(pool.get("tag", pool["name"]))


def processes_by_pool(state: SidekiqState, pools: Sequence[Mapping[str, Any]]) -> dict[str, list[ProcessState]]:
    """Group the live processes by pool through their tag; processes with another tag go under OTHER_PROCESSES."""
    tags = {pool_tag(pool): str(pool["name"]) for pool in pools}
    grouped: dict[str, list[ProcessState]] = {str(pool["name"]): [] for pool in pools}
    grouped[OTHER_PROCESSES] = []
    for process in state.live_processes:
        grouped[tags.get(process.tag or "", OTHER_PROCESSES)].append(process)
    return grouped


def pool_throughputs(
    previous: FleetRecord | None, current: FleetRecord, pools: Sequence[str]
) -> dict[str, float | None]:
    """Split the fleet's throughput since the previous run over the pools; None where it cannot be known.

    Sidekiq keeps one ``stat:processed`` counter for the whole app, so with several pools the jobs finished are
    shared out by each pool's busy threads at both readings (Little's law with equal job durations). With a single
    pool the rate is exact.
    """
    unknown: dict[str, float | None] = dict.fromkeys(pools)
    if previous is None:
        return unknown
    elapsed = current.at - previous.at
    finished = current.processed - previous.processed
    if elapsed <= 0 or finished < 0:
        # A clock that went back or a counter that was reset (a flushed Redis) gives no rate this run.
        return unknown
    rate = finished / elapsed
    if len(pools) == 1:
        return {pools[0]: rate}
    if finished == 0:
        return dict.fromkeys(pools, 0.0)
    weights = {name: current.busy.get(name, 0) + previous.busy.get(name, 0) for name in current.busy}
    total = sum(weights.values())
    if total == 0:
        return unknown
    return {name: rate * weights.get(name, 0) / total for name in pools}


def pool_signals(
    pool_state: PoolState,
    own: Sequence[ProcessState],
    instances: Sequence[Instance],
    now: float,
    throughput: float | None,
) -> PoolSignals:
    """Build the policy's signals of one systemd pool.

    The count the backend is set to is the number of running and booting units on the hosts that were read.
    See `backend_signals` for the other signals.
    """
    return backend_signals(pool_state, own, now, throughput, requested=len(instances))


def backend_signals(
    pool_state: PoolState,
    own: Sequence[ProcessState],
    now: float,
    throughput: float | None,
    requested: int | None,
) -> PoolSignals:
    """Build the policy's signals of one pool, given the process count its backend is set to.

    Backlog, latency and upcoming jobs come from the pool's queues. Processes, capacity and idle processes come
    from the live processes with the pool's tag. Busy threads and the age of the longest running job are the
    larger of the two readings. A queue that two pools share shows up in both pools' queue counts, and the safe
    error is to see too much work running.
    """
    active = [process for process in own if not process.quiet]
    return PoolSignals(
        backlog=pool_state.backlog,
        latency=pool_state.latency,
        busy=max(pool_state.busy, sum(process.busy for process in own)),
        processes=len(active),
        capacity=sum(process.concurrency for process in active),
        now=now,
        throughput=throughput,
        requested=requested,
        idle_processes=sum(1 for process in active if process.busy == 0),
        quiet_busy=sum(process.busy for process in own if process.quiet),
        longest_running=_longest_running(pool_state, own, now),
        upcoming=pool_state.upcoming,
    )


def _longest_running(pool_state: PoolState, own: Sequence[ProcessState], now: float) -> float | None:
    """Return the age of the oldest job that runs in the pool's queues or in its own processes; None if unknown."""
    queues: set[str] = set()
    for process in own:
        queues |= set(process.oldest_run_at_by_queue) | set(process.unknown_run_at_by_queue)
    in_own = longest_running(own, queues, now)
    if pool_state.longest_running is None or in_own is None:
        return None
    return max(pool_state.longest_running, in_own)


def blocked_reason(
    readings: Sequence[HostReading], own: Sequence[ProcessState], instances: Sequence[Instance]
) -> str | None:
    """Return why a pool must not be scaled this run, or None.

    A pool is not scaled when a worker host could not be read and some of the pool's live processes run on a
    host that was not read. Its running count is then unknown, and a unit there can be neither chosen nor stopped.
    A pool without processes on the unread hosts is scaled on the hosts that were read.
    """
    unread = [reading for reading in readings if not reading.reachable]
    if not unread:
        return None
    matched = {instance.identity for instance in instances if instance.identity}
    read_hostnames = {reading.hostname for reading in readings if reading.reachable}
    elsewhere = [
        process for process in own if process.identity not in matched and process.hostname not in read_hostnames
    ]
    if not elsewhere:
        return None
    hosts = "; ".join(f"{reading.host}: {reading.error}" for reading in unread)
    where = sorted({process.hostname or "unknown host" for process in elsewhere})
    count = len(elsewhere)
    processes = "process" if count == 1 else "processes"
    return (
        f"Not scaled this run: {count} live {processes} of the pool run on {', '.join(where)}, which could not "
        f"be read ({hosts}). Check that host, or remove it from the inventory group if it is gone."
    )


def unmatched_notes(instances: Sequence[Instance], readings: Sequence[HostReading]) -> list[str]:
    """Describe running units that no live Sidekiq process matched, by hostname and MainPID."""
    hostnames = {reading.host: reading.hostname for reading in readings}
    notes = []
    for instance in instances:
        if instance.identity is None and instance.active_state == "active":
            notes.append(
                f"{instance.unit} on {instance.host} runs as PID {instance.main_pid}, but Redis has no live Sidekiq "
                f"process with hostname {hostnames.get(instance.host)!r} and that PID; it counts as busy when "
                "units to stop are chosen."
            )
    return notes
