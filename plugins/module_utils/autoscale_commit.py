"""The last step of an autoscaling run: judge what the hosts did, record what succeeded, release the lock.

The playbook's acting play registers one loop result per host for the starts and one for the stops. This module
matches every unit the plan named to its item in those results. A pool's action counts as done only when every
one of its units was started or stopped. Only then do the action and its decision time go into the pool's policy
state, so cooldowns follow what really happened. The write and the lock release are one Lua call that
runs only while the plan's lock is still held.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import (
    FleetKeys,
    load_state,
    pool_field,
    write_state,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import SCALE_IN, SCALE_OUT, PolicyState

SUCCEEDED = "succeeded"
FAILED = "failed"
BLOCKED = "blocked"


@dataclass(frozen=True)
class UnitOutcome:
    """Whether one planned start or stop happened, with the host's message."""

    host: str
    unit: str
    pool: str
    operation: str
    ok: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "unit": self.unit,
            "pool": self.pool,
            "operation": self.operation,
            "ok": self.ok,
            "message": self.message,
        }


def _item_unit(result: Mapping[str, Any]) -> str | None:
    item = result.get("item")
    if isinstance(item, Mapping):
        unit = item.get("unit")
        return str(unit) if unit is not None else None
    return None


def _short(text: Any) -> str:
    return " ".join(str(text or "").split())[:300]


def _judge(result: Mapping[str, Any] | None, registered: Any, operation: str) -> tuple[bool, str]:
    """Return whether a unit's operation succeeded, and a sentence about it that the caller prefixes with the host."""
    if result is None:
        if isinstance(registered, Mapping) and registered.get("unreachable"):
            return False, f"the host became unreachable: {_short(registered.get('msg'))}"
        if isinstance(registered, Mapping) and registered.get("failed"):
            return False, f"the task failed: {_short(registered.get('msg'))}"
        return False, (
            f"no result: the host left the play before this {operation} (unreachable, or a task failed on it earlier)"
        )
    if result.get("unreachable"):
        return False, f"the host became unreachable: {_short(result.get('msg'))}"
    if result.get("failed"):
        return False, f"failed: {_short(result.get('msg'))}"
    if result.get("skipped"):
        return False, f"the {operation} was skipped"
    if operation == "stop":
        return True, _stop_message(result)
    return True, "started" if result.get("changed") else "already running"


def _stop_message(result: Mapping[str, Any]) -> str:
    """Describe a finished stop from the sidekiq_instance result: how long the drain took and what was left."""
    waited = result.get("waited_seconds")
    busy = result.get("busy_at_stop")
    text = "stopped"
    if isinstance(waited, (int, float)) and waited > 0:
        text += f" after waiting {waited:g} s for running jobs"
    if isinstance(busy, int) and busy > 0:
        text += f"; {busy} jobs still running were pushed back to their queues"
    return text


def unit_outcomes(
    plan: Mapping[str, Any], start_results: Mapping[str, Any], stop_results: Mapping[str, Any]
) -> list[UnitOutcome]:
    """Match every planned start and stop to the item of the host's registered loop result."""
    outcomes: list[UnitOutcome] = []
    for operation, planned, registered_by_host in (
        ("start", plan.get("starts") or {}, start_results),
        ("stop", plan.get("stops") or {}, stop_results),
    ):
        for host, items in planned.items():
            registered = registered_by_host.get(host)
            results: dict[str, Mapping[str, Any]] = {}
            if isinstance(registered, Mapping):
                for result in registered.get("results") or []:
                    if isinstance(result, Mapping) and _item_unit(result) is not None:
                        results[str(_item_unit(result))] = result
            for item in items:
                unit = str(item["unit"])
                ok, message = _judge(results.get(unit), registered, operation)
                pool = str(item["pool"])
                outcomes.append(UnitOutcome(host, unit, pool, operation, ok, message))
    return outcomes


def pool_results(plan: Mapping[str, Any], outcomes: list[UnitOutcome]) -> dict[str, dict[str, Any]]:
    """Return, per pool that had units to change or could not be decided, its status and a plain message."""
    results: dict[str, dict[str, Any]] = {}
    for name, pool in (plan.get("pools") or {}).items():
        units = [outcome for outcome in outcomes if outcome.pool == name]
        if pool.get("status") == BLOCKED:
            results[name] = {"status": BLOCKED, "action": "hold", "message": pool.get("reason", ""), "units": []}
            continue
        if not units:
            continue
        failed = [outcome for outcome in units if not outcome.ok]
        done = [outcome for outcome in units if outcome.ok]
        action = str(pool.get("action"))
        if failed:
            failures = [f"{item.operation} {item.unit} on {item.host}: {item.message}" for item in failed]
            message = f"{action} from {pool.get('current')} to {pool.get('target')} failed: " + "; ".join(failures)
            if done:
                message += "; done: " + ", ".join(f"{outcome.unit} on {outcome.host}" for outcome in done)
        else:
            message = f"{action} from {pool.get('current')} to {pool.get('target')} done: " + ", ".join(
                f"{outcome.operation} {outcome.unit} on {outcome.host} ({outcome.message})" for outcome in units
            )
        results[name] = {
            "status": FAILED if failed else SUCCEEDED,
            "action": action,
            "message": message,
            "units": [outcome.to_dict() for outcome in units],
        }
    return results


def record_actions(
    stored: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]], decided_at: float
) -> tuple[dict[str, str], list[str]]:
    """Return the state fields that record each succeeded action at its decision time, and any warnings."""
    fields: dict[str, str] = {}
    warnings: list[str] = []
    for name, result in results.items():
        action = result.get("action")
        if result.get("status") != SUCCEEDED or action not in (SCALE_OUT, SCALE_IN):
            continue
        try:
            state = PolicyState.from_dict(stored.get(name))
        except ValueError as error:
            warnings.append(f"Pool {name}: the stored autoscale state was discarded ({error}).")
            state = PolicyState()
        state = replace(
            state,
            last_action=str(action),
            last_action_at=decided_at,
            last_scale_out_at=decided_at if action == SCALE_OUT else state.last_scale_out_at,
        )
        fields[pool_field(name)] = json.dumps(state.to_dict())
    return fields, warnings


def commit(
    client: Any | None,
    plan: Mapping[str, Any],
    start_results: Mapping[str, Any],
    stop_results: Mapping[str, Any],
    namespace_prefix: str = "",
    check_mode: bool = False,
) -> dict[str, Any]:
    """Judge the outcomes, record the succeeded actions and release the plan's lock.

    `client` may be None in check mode. Returns the module result without `changed` and `failed`; the key
    `problems` lists every pool whose action failed or that could not be decided.
    """
    fleet = str(plan.get("fleet") or "")
    outcomes = unit_outcomes(plan, start_results, stop_results)
    results = pool_results(plan, outcomes)
    lock = plan.get("lock") or {}
    keys = FleetKeys.for_fleet(fleet, namespace_prefix)
    warnings: list[str] = []
    recorded: list[str] = []
    released = bool(lock.get("released", True))

    if not check_mode and client is not None and lock.get("value") and not released:
        stored = load_state(client, keys)
        fields, warnings = record_actions(stored["pools"], results, float(plan.get("now") or 0.0))
        if write_state(client, keys, str(lock["value"]), fields, release=True):
            recorded = sorted(field[len("pool:") :] for field in fields)
            released = True
        else:
            warnings.append(
                f"The lock {keys.lock} expired or was taken by another run before this run finished, so the outcome "
                "below was not recorded in the state. The run took longer than the lock allows: look for a host "
                "whose stops or starts hung."
            )

    # The plan's problems name the pools it could not decide or place; the failed actions come on top.
    problems = [str(problem) for problem in plan.get("problems") or []]
    problems += [f"{name}: {result['message']}" for name, result in results.items() if result["status"] == FAILED]
    lines = [f"autoscale {fleet}/{name} {result['status']}: {result['message']}" for name, result in results.items()]
    done = sum(1 for result in results.values() if result["status"] == SUCCEEDED)
    msg = f"Fleet {fleet}: {done} pool actions done"
    if problems:
        msg += f", {len(problems)} with problems: " + " | ".join(problems)
    return {
        "fleet": fleet,
        "msg": msg + ".",
        "pools": results,
        "units": [outcome.to_dict() for outcome in outcomes],
        "recorded": recorded,
        "lock_released": released,
        "problems": problems,
        "log_lines": lines,
        "warnings": warnings,
    }
