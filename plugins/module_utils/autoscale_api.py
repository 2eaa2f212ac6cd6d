"""One autoscaling run for pools that the module scales through an API: kubernetes, aws_asg or aws_ecs.

Unlike the systemd backend, these backends are reached by the module itself, so one task does the whole run:

1. Take the fleet's lock (skipped in check mode). When another run has it, return at once and change nothing.
2. Read Sidekiq's state once, and the state kept from the previous run.
3. Per pool: read the process count the backend is set to, build the signals, call the policy's `decide`, keep
   a scale-in at the busy floor, and scale the backend (check mode: plan only). A backend error of one pool is
   recorded for that pool, and the other pools go on.
4. Store each pool's policy state, with the action when the backend made it, and the fleet's throughput reading,
   then release the lock, in one write that runs only while this run holds the lock (skipped in check mode).

The lock is extended before each pool, so that a run over many pools keeps it while it works.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_backends import (
    BACKEND_ERRORS,
    BackendOptionsError,
    BackendOutcome,
    PoolBackend,
    open_backends,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_plan import (
    ACT,
    BLOCKED,
    LOCK_MARGIN,
    UNCHANGED,
    AutoscaleError,
    PoolOutcome,
    count_diff,
    fleet_record,
    load_policy_state,
    lock_held_result,
    log_line,
    releasing_on_error,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_signals import (
    OTHER_PROCESSES,
    backend_signals,
    pool_throughputs,
    processes_by_pool,
    validate_request,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import (
    FLEET_FIELD,
    FleetKeys,
    FleetRecord,
    acquire_lock,
    extend_lock,
    load_state,
    new_lock_value,
    pool_field,
    write_state,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import busy_floor
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import (
    HOLD,
    SCALE_IN,
    SCALE_OUT,
    PolicySettings,
    PolicyState,
    PoolSignals,
    decide,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import RedisAccessError, RedisSettings
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws import (
    AwsConfigurationError,
    AwsCredentialsError,
    AwsError,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_kubernetes import (
    KubernetesAuthError,
    KubernetesError,
    KubernetesUnreachableError,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState, SidekiqState

# Seconds the lock allows for one pool's backend calls, on top of LOCK_MARGIN. A Kubernetes scale makes up to
# 5 attempts of a few calls, each within request_timeout (default 10 s). An AWS call retries up to
# aws_max_attempts (default 5) times with botocore's backoff.
# NOTE: this is an estimate, not a bound: a backend slower than this loses the lock, and the run then fails
# without storing its decisions.
POOL_LOCK_SECONDS = 120

# Pool status of a pool whose backend failed this run.
FAILED = "failed"
# Errors of reading one pool's backend that every other pool of the run would meet too: the API cannot be reached,
# or the credentials or the configuration are wrong. After one, the run does not call the API for the other pools.
SHARED_FAILURES = (KubernetesUnreachableError, KubernetesAuthError, AwsCredentialsError, AwsConfigurationError)


@dataclass(frozen=True)
class ApiRequest:
    """The input of one run, validated by the caller.

    Attributes:
        backend: the backend name (kubernetes, aws_asg or aws_ecs).
        pools: every pool of the fleet, as in group_vars.
        settings: the policy settings of every pool, by name.
        selected: names of the pools to decide this run (all, or those of pools_filter).
        fleet: the fleet name of the lock and state keys.
        backends: the opened backend of every selected pool, by name.
        check_mode: decide and plan without changing a backend or Redis.
        never_scaled: selected pools that are never scaled (fixed size or a singleton queue), with the reason;
            they have no backend and are not read.
    """

    backend: str
    pools: Sequence[Mapping[str, Any]]
    settings: Mapping[str, PolicySettings]
    selected: Sequence[str]
    fleet: str
    backends: Mapping[str, PoolBackend]
    check_mode: bool = False
    never_scaled: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ApiPoolOutcome(PoolOutcome):
    """The decision of one pool and what its backend did.

    Attributes:
        error: the backend's error message when status is FAILED.
        backend_actions: one sentence per change the backend made, in order; empty in check mode.
        backend: the backend's reading and its result or plan.
    """

    error: str | None = None
    backend_actions: list[str] = field(default_factory=list)
    backend: dict[str, Any] = field(default_factory=dict)
    shared_failure: bool = False

    @property
    def problem(self) -> str | None:
        if self.status == FAILED:
            return f"{self.name}: {self.error}"
        if self.status == BLOCKED:
            return f"{self.name}: {self.reason}"
        return None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["start"], data["stop"]
        data.update(error=self.error, backend_actions=list(self.backend_actions), backend=dict(self.backend))
        return data


def scaling_target(current: int, desired: int, busy: int, concurrency: int) -> tuple[int, list[str]]:
    """Return the count to scale to: `desired`, but a scale-in keeps processes for every busy thread.

    Returns the target and the notes that explain a target above `desired`.
    """
    if desired >= current:
        return desired, []
    floor = busy_floor(busy, concurrency)
    target = min(max(desired, floor), current)
    if target > desired:
        return target, [
            f"Keeping {target} processes instead of {desired}: {busy} threads are busy and each process has "
            f"{concurrency}."
        ]
    return target, []


def action_of(current: int, reached: int) -> str:
    if reached > current:
        return SCALE_OUT
    if reached < current:
        return SCALE_IN
    return HOLD


def state_to_store(decided: PolicyState, stored: PolicyState, action: str, acted: bool, now: float) -> PolicyState:
    """Return the policy state to store: the decision's state, with the action only when the backend made it."""
    if acted and action != HOLD:
        return replace(
            decided,
            last_action=action,
            last_action_at=now,
            last_scale_out_at=now if action == SCALE_OUT else stored.last_scale_out_at,
        )
    return replace(
        decided,
        last_action=stored.last_action,
        last_action_at=stored.last_action_at,
        last_scale_out_at=stored.last_scale_out_at,
    )


def signals_view(signals: PoolSignals) -> dict[str, Any]:
    return {
        "backlog": signals.backlog,
        "latency": signals.latency,
        "busy": signals.busy,
        "processes": signals.processes,
        "capacity": signals.capacity,
        "idle_processes": signals.idle_processes,
        "requested": signals.requested,
        "throughput": signals.throughput,
        "upcoming": signals.upcoming,
        "longest_running": signals.longest_running,
    }


@dataclass
class PoolContext:
    """The inputs of one pool's decision besides its backend: its processes, settings and stored state."""

    name: str
    settings: PolicySettings
    own: Sequence[ProcessState]
    stored: PolicyState
    throughput: float | None


def scale_pool(
    context: PoolContext,
    backend: PoolBackend,
    state: SidekiqState,
    client: Any,
    namespace_prefix: str,
    check_mode: bool,
) -> ApiPoolOutcome:
    """Decide one pool and scale its backend. An error of BACKEND_ERRORS becomes a FAILED outcome, not an exception."""
    name = context.name
    try:
        reading = backend.read(context.own, client, namespace_prefix, state.now)
    except BACKEND_ERRORS as error:
        return ApiPoolOutcome(
            name=name,
            status=FAILED,
            action=HOLD,
            reason=f"Reading {backend.resource} failed.",
            error=str(error),
            shared_failure=isinstance(error, SHARED_FAILURES),
        )

    if not state.sidekiq_data_found and reading.requested > 0:
        reason = (
            f"Not scaled this run: Redis holds no Sidekiq data, but {backend.resource} is set to {reading.requested} "
            "processes. Check redis_db and redis_namespace, because scaling on an empty reading would stop busy "
            "processes."
        )
        return ApiPoolOutcome(
            name=name,
            status=BLOCKED,
            action=HOLD,
            reason=reason,
            current=reading.requested,
            backend={"reading": reading.details},
        )

    signals = backend_signals(state.pools[name], context.own, state.now, context.throughput, reading.requested)
    decision = decide(signals, context.settings, context.stored)
    target, notes = scaling_target(decision.current, decision.desired, signals.busy, context.settings.concurrency)
    outcome = ApiPoolOutcome(
        name=name,
        status=UNCHANGED,
        action=HOLD,
        reason=decision.reason,
        current=decision.current,
        desired=decision.desired,
        target=decision.current,
        recommendation=decision.recommendation,
        signals=signals_view(signals),
        details=dict(decision.details),
        notes=notes,
        backend={"reading": reading.details},
    )
    try:
        result = backend.scale(reading, target, context.own, client, namespace_prefix, check_mode)
    except BACKEND_ERRORS as error:
        outcome.status = FAILED
        outcome.error = str(error)
        outcome.state = state_to_store(decision.state, context.stored, HOLD, False, state.now)
        return outcome
    return _with_result(outcome, result, decision.state, context.stored, check_mode, state.now)


def _with_result(
    outcome: ApiPoolOutcome,
    result: BackendOutcome,
    decided: PolicyState,
    stored: PolicyState,
    check_mode: bool,
    now: float,
) -> ApiPoolOutcome:
    current = outcome.current or 0
    outcome.target = result.reached
    outcome.action = action_of(current, result.reached)
    outcome.status = ACT if result.changed else UNCHANGED
    outcome.notes += result.notes
    outcome.backend_actions = list(result.actions)
    outcome.backend = result.details
    outcome.state = state_to_store(decided, stored, outcome.action, result.changed and not check_mode, now)
    return outcome


def api_log_line(fleet: str, outcome: ApiPoolOutcome) -> str:
    """Return the one-line record of a pool's decision and what its backend did."""
    prefix = f"autoscale {fleet}/{outcome.name}"
    if outcome.status == FAILED:
        if outcome.current is None:
            return f"{prefix} failed: {outcome.error}"
        return f"{prefix} failed at {outcome.current} processes, {outcome.desired} decided: {outcome.error}"
    if outcome.status == BLOCKED:
        return f"{prefix} blocked at {outcome.current} processes: {outcome.reason}"
    if outcome.current is None:
        return f"{prefix} not scaled: {outcome.reason}"
    return " ".join([log_line(fleet, outcome), *outcome.backend_actions])


def summary(fleet: str, backend: str, outcomes: Sequence[ApiPoolOutcome], check_mode: bool) -> str:
    counts = {key: sum(1 for outcome in outcomes if outcome.action == key) for key in (SCALE_OUT, SCALE_IN, HOLD)}
    failed = sum(1 for outcome in outcomes if outcome.status == FAILED)
    blocked = sum(1 for outcome in outcomes if outcome.status == BLOCKED)
    pools = "pool" if len(outcomes) == 1 else "pools"
    verb = "Decided" if check_mode else "Scaled"
    text = (
        f"{verb} {len(outcomes)} {pools} of fleet {fleet} with {backend}: {counts[SCALE_OUT]} scale out, "
        f"{counts[SCALE_IN]} scale in, {counts[HOLD] - failed - blocked} hold"
    )
    if blocked:
        text += f", {blocked} not scaled"
    if failed:
        names = ", ".join(outcome.name for outcome in outcomes if outcome.status == FAILED)
        text += f", {failed} failed ({names})"
    return text + (" (check mode: nothing was changed)." if check_mode else ".")


def pool_lock_ttl() -> int:
    return POOL_LOCK_SECONDS + LOCK_MARGIN


def run_api(
    client: Any, request: ApiRequest, namespace_prefix: str = "", settings: RedisSettings | None = None
) -> dict[str, Any]:
    """Run one decision and scaling for every selected pool. Return the module result without `changed`.

    Raises the reader's RedisAccessError subclasses, and AutoscaleError when the lock is lost or Redis fails once
    a backend may have changed (the message names the backends already changed). Backend errors do not raise:
    they are in the pool's outcome and in `problems`. The lock is released whenever this function
    raises after taking it.
    """
    keys = FleetKeys.for_fleet(request.fleet, namespace_prefix)
    lock: dict[str, Any] = {"key": keys.lock, "value": None, "ttl": None, "released": True, "holder": None}
    if not request.check_mode:
        value = new_lock_value()
        ttl = pool_lock_ttl()
        if not acquire_lock(client, keys, value, ttl):
            return lock_held_result(client, keys, lock, request.fleet, backend=request.backend, changed=False)
        lock.update(value=value, ttl=ttl, released=False)

    with releasing_on_error(client, keys, lock):
        return _scale_and_store(client, request, keys, lock, namespace_prefix, settings)


def _pool_contexts(
    request: ApiRequest, state: SidekiqState, stored: Mapping[str, Any], warnings: list[str]
) -> tuple[list[PoolContext], FleetRecord]:
    grouped = processes_by_pool(state, request.pools)
    record = fleet_record(state, grouped)
    names = [str(pool["name"]) for pool in request.pools]
    # Processes with no pool's tag share the counter too, so they take part in the split when there are any.
    sharing = [*names, OTHER_PROCESSES] if grouped[OTHER_PROCESSES] else names
    throughputs = pool_throughputs(FleetRecord.from_dict(stored.get("fleet")), record, sharing)
    stored_pools = stored.get("pools") or {}
    contexts = [
        PoolContext(
            name=name,
            settings=request.settings[name],
            own=grouped[name],
            stored=load_policy_state(stored_pools.get(name), name, warnings),
            throughput=throughputs.get(name),
        )
        for name in names
        if name in request.selected and name not in request.never_scaled
    ]
    return contexts, record


def _scale_and_store(
    client: Any,
    request: ApiRequest,
    keys: FleetKeys,
    lock: dict[str, Any],
    namespace_prefix: str,
    settings: RedisSettings | None,
) -> dict[str, Any]:
    warnings: list[str] = []
    state = read_state(client, namespace_prefix=namespace_prefix, pools=request.pools, settings=settings)
    stored = load_state(client, keys)
    for name in stored["invalid"]:
        warnings.append(f"The stored autoscale field {name!r} of {keys.state} is not valid JSON and was ignored.")
    contexts, record = _pool_contexts(request, state, stored, warnings)

    outcomes: list[ApiPoolOutcome] = []
    try:
        for context in contexts:
            if lock["value"] and not extend_lock(client, keys, lock["value"], pool_lock_ttl()):
                raise AutoscaleError(
                    f"The lock {keys.lock} expired before pool {context.name} was scaled; another run may have "
                    f"taken over, so this run stops here. A backend took longer than {pool_lock_ttl()} s: check "
                    "the API's response times."
                )
            backend = request.backends[context.name]
            shared = next((outcome for outcome in outcomes if outcome.shared_failure), None)
            if shared is not None:
                outcomes.append(_not_tried(context.name, backend, shared))
                continue
            outcome = scale_pool(context, backend, state, client, namespace_prefix, request.check_mode)
            outcomes.append(outcome)
            if lock["value"] and outcome.status == ACT and outcome.state:
                # Stored at once, so that the cooldowns of a pool that changed hold even if a later pool fails.
                _store(client, keys, lock, {pool_field(outcome.name): json.dumps(outcome.state.to_dict())})

        if not request.check_mode:
            fields = {
                pool_field(outcome.name): json.dumps(outcome.state.to_dict()) for outcome in outcomes if outcome.state
            }
            fields[FLEET_FIELD] = record.to_json()
            _store(client, keys, lock, fields, release=True)
            lock["released"] = True
    except (AutoscaleError, RedisAccessError) as error:
        raise AutoscaleError(f"{error} {_changed_so_far(outcomes)}") from error

    diff = count_diff(outcomes)
    outcomes += [
        ApiPoolOutcome(name=name, status=UNCHANGED, action=HOLD, reason=reason[0].upper() + reason[1:])
        for name, reason in request.never_scaled.items()
    ]
    problems = [problem for problem in (outcome.problem for outcome in outcomes) if problem]
    return {
        "lock_held": False,
        "lock": lock,
        "fleet": request.fleet,
        "backend": request.backend,
        "now": state.now,
        "msg": summary(request.fleet, request.backend, outcomes, request.check_mode),
        "pools": {outcome.name: outcome.to_dict() for outcome in outcomes},
        "actions_planned": False,
        "problems": problems,
        "log_lines": [api_log_line(request.fleet, outcome) for outcome in outcomes],
        "warnings": warnings,
        "diff": diff,
        "changed": any(outcome.status == ACT for outcome in outcomes),
    }


def _not_tried(name: str, backend: PoolBackend, failed: ApiPoolOutcome) -> ApiPoolOutcome:
    """Return the outcome of a pool left alone because an earlier pool's API failure would repeat for it."""
    return ApiPoolOutcome(
        name=name,
        status=FAILED,
        action=HOLD,
        reason=f"Reading {backend.resource} was not tried.",
        error=f"not tried, because the API failed for pool {failed.name} in the same way (see there).",
    )


def _store(
    client: Any, keys: FleetKeys, lock: Mapping[str, Any], fields: Mapping[str, str], release: bool = False
) -> None:
    """Write state fields while this run holds the lock; raise AutoscaleError when the lock has expired."""
    if not write_state(client, keys, lock["value"], fields, release=release):
        raise AutoscaleError(
            f"The lock {keys.lock} expired before this run stored its decisions (after less than {lock['ttl']} s); "
            "another run may have taken over. Check for a slow Redis or API."
        )


def _changed_so_far(outcomes: Sequence[ApiPoolOutcome]) -> str:
    """Return a sentence naming the pools whose backend this run already changed, for an error message."""
    changed = [f"{outcome.name} (to {outcome.target})" for outcome in outcomes if outcome.status == ACT]
    if not changed:
        return "No backend was changed."
    return f"Backends already changed: {', '.join(changed)}; those changes stand, and the next run reads them."


def build_api_request(params: Mapping[str, Any], check_mode: bool) -> tuple[ApiRequest | None, list[str]]:
    """Validate the pools and the backend's options and open the backends, without calling any API.

    Returns the request, or None and every error, each naming the value and the fix.
    """
    pools = params["pools"]
    settings, errors = validate_request(
        pools, params["singleton_queues"], params["pools_filter"], params["shutdown_margin"]
    )
    if errors:
        return None, errors
    names = [str(pool["name"]) for pool in pools]
    selected = [name for name in names if name in (params["pools_filter"] or names)]
    never_scaled = {name: _never_scaled_reason(settings[name]) for name in selected}
    never_scaled = {name: reason for name, reason in never_scaled.items() if reason}
    scaled = [name for name in selected if name not in never_scaled]
    try:
        backends = open_backends(params["backend"], params, pools, scaled, margin=params["shutdown_margin"])
    except (BackendOptionsError, KubernetesError, AwsError) as error:
        return None, [str(error)]
    request = ApiRequest(
        backend=params["backend"],
        pools=pools,
        settings=settings,
        selected=selected,
        fleet=params["fleet"],
        backends=backends,
        check_mode=check_mode,
        never_scaled=never_scaled,
    )
    return request, []


def _never_scaled_reason(settings: PolicySettings) -> str:
    """Return why a pool is never scaled (its backend is then neither read nor needs options), or ""."""
    if settings.singleton:
        return "the pool serves a singleton queue and is never scaled, so its backend was not read."
    if settings.fixed:
        return (
            f"the pool has a fixed size of {settings.min_processes} (processes min == max) and is never scaled, "
            "so its backend was not read."
        )
    return ""
