"""One autoscaling decision run for systemd pools: lock, read, decide every pool, plan the unit changes, store.

The run behind ``sidekiq_ops.fleet.autoscale``:

1. Take the fleet's lock (skipped in check mode). When another run holds it, return at once and change nothing.
2. Read Sidekiq's state once with the shared reader, and the state this module kept from the previous run.
3. Per pool: build the signals, call the policy's `decide`, and plan which units to start or stop on which host.
4. Store each pool's new policy state and the fleet's throughput reading (skipped in check mode). The scaling
   action itself is recorded later by the commit step, and only when it succeeded. When nothing is to be done,
   the lock is released in the same write; otherwise it is extended to cover the planned stops and starts.

`decide_pool` and the result builders are pure; `run_plan` does the I/O.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_signals import (
    OTHER_PROCESSES,
    blocked_reason,
    pool_signals,
    pool_throughputs,
    processes_by_pool,
    unmatched_notes,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import (
    FLEET_FIELD,
    FleetKeys,
    FleetRecord,
    acquire_lock,
    extend_lock,
    load_state,
    lock_holder,
    new_lock_value,
    pool_field,
    release_lock,
    write_state,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import (
    HostReading,
    Instance,
    PoolPlan,
    match_instances,
    parse_host_readings,
    plan_pool,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import (
    HOLD,
    SCALE_IN,
    SCALE_OUT,
    PolicySettings,
    PolicyState,
    decide,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import RedisSettings
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    PoolState,
    ProcessState,
    SidekiqState,
)

# Seconds added to every lock expiry for the work around the planned actions: the module runs, Ansible's
# connections to the hosts, and the commit step.
LOCK_MARGIN = 60
# Seconds the lock allows for each planned start: systemd waits up to the unit's TimeoutStartSec for Sidekiq to
# report ready, which the sidekiq role sets from sidekiq_start_timeout (default 90).
DEFAULT_START_TIMEOUT = 90

# Pool statuses in the result.
ACT = "act"
UNCHANGED = "hold"
BLOCKED = "blocked"


class AutoscaleError(Exception):
    """The run cannot go on; the message gives the reason and the next step."""


@dataclass(frozen=True)
class PlanRequest:
    """The input of one run, validated by the caller.

    Attributes:
        pools: every pool of the fleet, as in group_vars.
        settings: the policy settings of every pool, by name.
        selected: names of the pools to decide this run (all, or those of pools_filter).
        instances: the playbook's registered unit readings, keyed by inventory host, in inventory order.
        margin: the shutdown margin that the stop budget adds to a pool's timeout.
        start_timeout: seconds the lock allows for each planned start.
    """

    pools: Sequence[Mapping[str, Any]]
    settings: Mapping[str, PolicySettings]
    selected: Sequence[str]
    fleet: str
    instances: Mapping[str, Any]
    margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN
    start_timeout: int = DEFAULT_START_TIMEOUT
    check_mode: bool = False


@dataclass
class PoolOutcome:
    """The decision and plan of one pool in one run.

    Attributes:
        status: ACT (units to start or stop), UNCHANGED, or BLOCKED (not decided, see reason).
        action: scale_out, scale_in or hold, after the plan's floors.
        state: the policy state to store, without this run's action, which the commit step records on success.
    """

    name: str
    status: str
    action: str
    reason: str
    current: int | None = None
    desired: int | None = None
    target: int | None = None
    recommendation: int | None = None
    signals: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    plan: PoolPlan | None = None
    notes: list[str] = field(default_factory=list)
    state: PolicyState | None = None

    @property
    def problem(self) -> str | None:
        """Return the sentence to report when the pool could not be brought to its desired count."""
        if self.status == BLOCKED:
            return f"{self.name}: {self.reason}"
        if self.desired is not None and self.target is not None and self.target < self.desired:
            return f"{self.name}: {' '.join(self.notes)}"
        return None

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "status": self.status,
            "action": self.action,
            "current": self.current,
            "desired": self.desired,
            "target": self.target,
            "recommendation": self.recommendation,
            "reason": self.reason,
            "signals": self.signals,
            "details": self.details,
            "start": [action.to_dict() for action in plan.starts] if plan else [],
            "stop": [action.to_dict() for action in plan.stops] if plan else [],
            "notes": list(self.notes),
        }


def initial_lock_ttl(pools: Sequence[Mapping[str, Any]], margin: int) -> int:
    """Return the lock expiry taken at the start: the longest stop of one process plus LOCK_MARGIN.

    One stop waits up to the pool's timeout for the quieted process to become idle, then systemd allows the
    stop budget (timeout plus margin) before KILL.
    """
    longest = max((_stop_seconds(pool, margin) for pool in pools), default=0)
    return longest + LOCK_MARGIN


def _stop_seconds(pool: Mapping[str, Any], margin: int) -> int:
    return int(pool.get("timeout", pool_model.DEFAULT_TIMEOUT)) + pool_model.stop_budget(pool, margin)


def planned_lock_ttl(
    outcomes: Sequence[PoolOutcome], pools: Mapping[str, Mapping[str, Any]], margin: int, start_timeout: int
) -> int:
    """Return the lock expiry that covers the plan: each host stops and starts its units one after another."""
    per_host: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.plan is None:
            continue
        for stop in outcome.plan.stops:
            per_host[stop.host] = per_host.get(stop.host, 0) + _stop_seconds(pools[outcome.name], margin)
        for start in outcome.plan.starts:
            per_host[start.host] = per_host.get(start.host, 0) + start_timeout
    return max(per_host.values(), default=0) + LOCK_MARGIN


def load_policy_state(data: Mapping[str, Any] | None, pool: str, warnings: list[str]) -> PolicyState:
    """Load a pool's stored state; a state that cannot be read is replaced by a fresh one, with a warning."""
    try:
        return PolicyState.from_dict(data)
    except ValueError as error:
        warnings.append(f"Pool {pool}: the stored autoscale state was discarded ({error}).")
        return PolicyState()


def decide_pool(
    pool: Mapping[str, Any],
    settings: PolicySettings,
    pool_state: PoolState,
    own: Sequence[ProcessState],
    instances: Sequence[Instance],
    readings: Sequence[HostReading],
    stored: PolicyState,
    throughput: float | None,
    now: float,
) -> PoolOutcome:
    """Decide one pool's count with the policy and plan its unit changes on the hosts that were read."""
    name = str(pool["name"])
    notes = unmatched_notes(instances, readings)
    blocked = blocked_reason(readings, own, instances)
    if blocked is not None:
        return PoolOutcome(name=name, status=BLOCKED, action=HOLD, reason=blocked, current=len(instances), notes=notes)

    signals = pool_signals(pool_state, own, instances, now, throughput)
    decision = decide(signals, settings, stored)
    plan = plan_pool(name, instances, readings, decision.desired, signals.busy, settings.concurrency)
    notes += plan.notes
    action = HOLD
    if plan.target > decision.current:
        action = SCALE_OUT
    elif plan.target < decision.current:
        action = SCALE_IN
    # The action goes into the state only once the commit step has seen it succeed.
    state = replace(
        decision.state,
        last_action=stored.last_action,
        last_action_at=stored.last_action_at,
        last_scale_out_at=stored.last_scale_out_at,
    )
    return PoolOutcome(
        name=name,
        status=ACT if plan.starts or plan.stops else UNCHANGED,
        action=action,
        reason=decision.reason,
        current=decision.current,
        desired=decision.desired,
        target=plan.target,
        recommendation=decision.recommendation,
        signals={
            "backlog": signals.backlog,
            "latency": signals.latency,
            "busy": signals.busy,
            "processes": signals.processes,
            "capacity": signals.capacity,
            "idle_processes": signals.idle_processes,
            "requested": signals.requested,
            "throughput": throughput,
            "upcoming": signals.upcoming,
            "longest_running": signals.longest_running,
        },
        details=dict(decision.details),
        plan=plan,
        notes=notes,
        state=state,
    )


def fleet_record(state: SidekiqState, grouped: Mapping[str, Sequence[ProcessState]]) -> FleetRecord:
    """Return this run's throughput reading: the processed counter and busy threads per pool by process tag."""
    busy = {name: sum(process.busy for process in processes) for name, processes in grouped.items()}
    return FleetRecord(processed=state.processed, at=state.now, busy=busy)


def decide_pools(
    request: PlanRequest,
    state: SidekiqState,
    readings: Sequence[HostReading],
    stored: Mapping[str, Any],
    warnings: list[str],
) -> tuple[list[PoolOutcome], FleetRecord]:
    """Decide every selected pool from one reading of Sidekiq's state and the stored state of the last run."""
    grouped = processes_by_pool(state, request.pools)
    record = fleet_record(state, grouped)
    names = [str(pool["name"]) for pool in request.pools]
    previous = FleetRecord.from_dict(stored.get("fleet"))
    # Processes with no pool's tag share the counter too, so they take part in the split when there are any.
    sharing = [*names, OTHER_PROCESSES] if grouped[OTHER_PROCESSES] else names
    throughputs = pool_throughputs(previous, record, sharing)
    instances = match_instances(readings, state.processes)
    stored_pools = stored.get("pools") or {}

    outcomes = []
    for pool in request.pools:
        name = str(pool["name"])
        if name not in request.selected:
            continue
        outcomes.append(
            decide_pool(
                pool,
                request.settings[name],
                state.pools[name],
                grouped[name],
                instances.get(name, []),
                readings,
                load_policy_state(stored_pools.get(name), name, warnings),
                throughputs.get(name),
                state.now,
            )
        )
    return outcomes, record


def _format_seconds(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def log_line(fleet: str, outcome: PoolOutcome) -> str:
    """Return the one-line record of a pool's decision, for the play output and the timer's journal."""
    prefix = f"autoscale {fleet}/{outcome.name}"
    if outcome.status == BLOCKED:
        return f"{prefix} blocked at {outcome.current} units: {outcome.reason}"
    signals = outcome.signals or {}
    figures = (
        f"backlog {signals.get('backlog')}, latency {_format_seconds(float(signals.get('latency') or 0))} s, "
        f"busy {signals.get('busy')}/{signals.get('capacity')} threads"
    )
    if outcome.action == HOLD:
        head = f"{prefix} hold at {outcome.current} ({figures})"
    else:
        head = f"{prefix} {outcome.action} {outcome.current} -> {outcome.target} ({figures})"
    parts = [head + ":", outcome.reason]
    parts += outcome.notes
    if outcome.plan and outcome.plan.starts:
        parts.append("Starting " + ", ".join(f"{start.unit} on {start.host}" for start in outcome.plan.starts) + ".")
    if outcome.plan and outcome.plan.stops:
        parts.append("Stopping " + ", ".join(f"{stop.unit} on {stop.host}" for stop in outcome.plan.stops) + ".")
    return " ".join(parts)


def actions_by_host(
    outcomes: Sequence[PoolOutcome], pools: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Group the planned starts and stops by host, as the playbook's acting play loops over them."""
    starts: dict[str, list[dict[str, Any]]] = {}
    stops: dict[str, list[dict[str, Any]]] = {}
    for outcome in outcomes:
        if outcome.plan is None:
            continue
        timeout = int(pools[outcome.name].get("timeout", pool_model.DEFAULT_TIMEOUT))
        for start in outcome.plan.starts:
            starts.setdefault(start.host, []).append({"unit": start.unit, "pool": outcome.name})
        for stop in outcome.plan.stops:
            stops.setdefault(stop.host, []).append(
                {"unit": stop.unit, "pool": outcome.name, "timeout": timeout, "busy": stop.busy}
            )
    return starts, stops


def count_diff(outcomes: Sequence[PoolOutcome]) -> dict[str, str]:
    """Return the --diff view: process counts per pool before and after the plan."""
    before = "".join(f"{outcome.name}: {_count_text(outcome.current)}\n" for outcome in outcomes)
    after = "".join(
        f"{outcome.name}: {_count_text(outcome.target if outcome.target is not None else outcome.current)}\n"
        for outcome in outcomes
    )
    return {"before": before, "after": after}


def _count_text(count: int | None) -> str:
    return "unknown (the backend could not be read)" if count is None else f"{count} processes"


def summary(fleet: str, outcomes: Sequence[PoolOutcome], starts: int, stops: int) -> str:
    counts = {key: sum(1 for outcome in outcomes if outcome.action == key) for key in (SCALE_OUT, SCALE_IN, HOLD)}
    blocked = sum(1 for outcome in outcomes if outcome.status == BLOCKED)
    pools = "pool" if len(outcomes) == 1 else "pools"
    text = (
        f"Decided {len(outcomes)} {pools} of fleet {fleet}: {counts[SCALE_OUT]} to scale out, "
        f"{counts[SCALE_IN]} to scale in, {counts[HOLD] - blocked} to hold"
    )
    if blocked:
        text += f", {blocked} not scaled because a host could not be read"
    return text + f"; {starts} units to start and {stops} to stop."


def run_plan(
    client: Any, request: PlanRequest, namespace_prefix: str = "", settings: RedisSettings | None = None
) -> dict[str, Any]:
    """Run one decision: lock, read, decide, plan, store. Return the module result without `changed`.

    Raises AutoscaleError, the reader's RedisAccessError subclasses, or ValueError for malformed instances.
    The lock is released again whenever this function raises after taking it.
    """
    readings = parse_host_readings(request.instances, [str(pool["name"]) for pool in request.pools])
    keys = FleetKeys.for_fleet(request.fleet, namespace_prefix)
    pools_by_name = {str(pool["name"]): pool for pool in request.pools}
    lock: dict[str, Any] = {"key": keys.lock, "value": None, "ttl": None, "released": True, "holder": None}

    if not request.check_mode:
        value = new_lock_value()
        ttl = initial_lock_ttl(request.pools, request.margin)
        if not acquire_lock(client, keys, value, ttl):
            return lock_held_result(client, keys, lock, request.fleet, starts={}, stops={}, unreadable_hosts={})
        lock.update(value=value, ttl=ttl, released=False)

    with releasing_on_error(client, keys, lock):
        return _decide_and_store(client, request, readings, keys, pools_by_name, lock, namespace_prefix, settings)


def lock_held_result(client: Any, keys: FleetKeys, lock: dict[str, Any], fleet: str, **extra: Any) -> dict[str, Any]:
    """Return the module result of a run that found the fleet's lock held by another run, plus `extra` keys."""
    holder = lock_holder(client, keys).describe()
    lock["holder"] = holder
    return {
        "lock_held": True,
        "lock": lock,
        "fleet": fleet,
        "msg": f"Another autoscaling run of fleet {fleet} holds the lock ({holder}); this run changed nothing.",
        "pools": {},
        "actions_planned": False,
        "problems": [],
        "log_lines": [f"autoscale {fleet}: lock {holder}; this run changed nothing."],
        "warnings": [],
        **extra,
    }


@contextlib.contextmanager
def releasing_on_error(client: Any, keys: FleetKeys, lock: dict[str, Any]) -> Iterator[None]:
    """Release the lock this run holds when the block raises, then let the error through."""
    try:
        yield
    except BaseException:
        if lock["value"] and not lock["released"]:
            # The original error is what the caller must see, so a failed release is left to the lock's expiry.
            with contextlib.suppress(Exception):
                release_lock(client, keys, lock["value"])
        raise


def _decide_and_store(
    client: Any,
    request: PlanRequest,
    readings: Sequence[HostReading],
    keys: FleetKeys,
    pools_by_name: Mapping[str, Mapping[str, Any]],
    lock: dict[str, Any],
    namespace_prefix: str,
    settings: RedisSettings | None,
) -> dict[str, Any]:
    warnings: list[str] = []
    state = read_state(client, namespace_prefix=namespace_prefix, pools=request.pools, settings=settings)
    counted_units = sum(1 for reading in readings for unit in reading.units if unit.counted)
    if not state.sidekiq_data_found and counted_units:
        where = settings.describe() if settings else "Redis"
        raise AutoscaleError(
            f"Redis at {where} holds no Sidekiq data, but {counted_units} Sidekiq units run on the worker hosts; "
            "check redis_db and redis_namespace, because scaling on an empty reading would stop busy processes."
        )
    stored = load_state(client, keys)
    for name in stored["invalid"]:
        warnings.append(f"The stored autoscale field {name!r} of {keys.state} is not valid JSON and was ignored.")

    outcomes, record = decide_pools(request, state, readings, stored, warnings)
    starts, stops = actions_by_host(outcomes, pools_by_name)
    planned = bool(starts or stops)

    if not request.check_mode:
        fields = {
            pool_field(outcome.name): json.dumps(outcome.state.to_dict()) for outcome in outcomes if outcome.state
        }
        fields[FLEET_FIELD] = record.to_json()
        if planned:
            ttl = planned_lock_ttl(outcomes, pools_by_name, request.margin, request.start_timeout)
            if ttl > lock["ttl"]:
                extend_lock(client, keys, lock["value"], ttl)
                lock["ttl"] = ttl
        if not write_state(client, keys, lock["value"], fields, release=not planned):
            raise AutoscaleError(
                f"The lock {keys.lock} expired before this run stored its decisions (after less than {lock['ttl']} "
                "s); another run may have taken over, so this run acts on nothing. Check for a slow Redis."
            )
        lock["released"] = not planned

    unreadable = {reading.host: reading.error for reading in readings if not reading.reachable}
    problems = [problem for problem in (outcome.problem for outcome in outcomes) if problem]
    starts_total = sum(len(items) for items in starts.values())
    stops_total = sum(len(items) for items in stops.values())
    return {
        "lock_held": False,
        "lock": lock,
        "fleet": request.fleet,
        "now": state.now,
        "msg": summary(request.fleet, outcomes, starts_total, stops_total),
        "pools": {outcome.name: outcome.to_dict() for outcome in outcomes},
        "starts": starts,
        "stops": stops,
        "actions_planned": planned,
        "problems": problems,
        "log_lines": [log_line(request.fleet, outcome) for outcome in outcomes],
        "unreadable_hosts": unreadable,
        "warnings": warnings,
        "diff": count_diff(outcomes),
    }
