"""Unit tests of the commit step: judging each planned unit from the hosts' results, and what gets recorded."""

from __future__ import annotations

import json
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_commit as commit
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import SCALE_IN, SCALE_OUT, PolicyState

NOW = 1_700_000_000.0


def plan(**pools: dict[str, Any]) -> dict[str, Any]:
    starts: dict[str, list[dict[str, Any]]] = {}
    stops: dict[str, list[dict[str, Any]]] = {}
    for name, pool in pools.items():
        for item in pool.get("start", []):
            starts.setdefault(item["host"], []).append({"unit": item["unit"], "pool": name})
        for item in pool.get("stop", []):
            stops.setdefault(item["host"], []).append({"unit": item["unit"], "pool": name, "timeout": 10})
    return {"fleet": "shop", "now": NOW, "pools": pools, "starts": starts, "stops": stops, "problems": []}


def loop_result(*items: dict[str, Any]) -> dict[str, Any]:
    return {"changed": True, "results": list(items)}


def item(unit: str, **result: Any) -> dict[str, Any]:
    return {"item": {"unit": unit, "pool": "bulk"}, "changed": True, **result}


SCALE_OUT_PLAN = plan(
    bulk={
        "status": "act",
        "action": SCALE_OUT,
        "current": 2,
        "target": 4,
        "start": [{"host": "w1", "unit": "sidekiq-bulk@2.service"}, {"host": "w2", "unit": "sidekiq-bulk@2.service"}],
    }
)


def test_all_units_started_succeeds() -> None:
    starts = {"w1": loop_result(item("sidekiq-bulk@2.service")), "w2": loop_result(item("sidekiq-bulk@2.service"))}

    results = commit.pool_results(SCALE_OUT_PLAN, commit.unit_outcomes(SCALE_OUT_PLAN, starts, {}))

    assert results["bulk"]["status"] == commit.SUCCEEDED
    assert results["bulk"]["message"] == (
        "scale_out from 2 to 4 done: start sidekiq-bulk@2.service on w1 (started), "
        "start sidekiq-bulk@2.service on w2 (started)"
    )


def test_one_failed_host_fails_the_pool_action() -> None:
    starts = {
        "w1": loop_result(item("sidekiq-bulk@2.service")),
        "w2": loop_result(item("sidekiq-bulk@2.service", failed=True, msg="Unit sidekiq-bulk@2.service failed")),
    }

    outcomes = commit.unit_outcomes(SCALE_OUT_PLAN, starts, {})
    results = commit.pool_results(SCALE_OUT_PLAN, outcomes)

    assert [outcome.ok for outcome in outcomes] == [True, False]
    assert results["bulk"]["status"] == commit.FAILED
    assert results["bulk"]["message"] == (
        "scale_out from 2 to 4 failed: start sidekiq-bulk@2.service on w2: failed: Unit sidekiq-bulk@2.service "
        "failed; done: sidekiq-bulk@2.service on w1"
    )


def test_unreachable_and_missing_hosts_fail_their_units() -> None:
    starts = {"w1": {"unreachable": True, "msg": "Failed to connect", "changed": False}}

    outcomes = commit.unit_outcomes(SCALE_OUT_PLAN, starts, {})

    assert [(outcome.host, outcome.ok) for outcome in outcomes] == [("w1", False), ("w2", False)]
    assert outcomes[0].message == "the host became unreachable: Failed to connect"
    assert outcomes[1].message.startswith("no result: the host left the play before this start")


def test_unreachable_item_fails_its_unit() -> None:
    starts = {
        "w1": loop_result(item("sidekiq-bulk@2.service", unreachable=True, msg="container paused")),
        "w2": loop_result(item("sidekiq-bulk@2.service")),
    }

    outcomes = commit.unit_outcomes(SCALE_OUT_PLAN, starts, {})

    assert outcomes[0].message == "the host became unreachable: container paused"
    assert outcomes[1].ok


def test_stop_message_tells_drain_and_pushed_back_jobs() -> None:
    scale_in = plan(
        bulk={"status": "act", "action": SCALE_IN, "current": 3, "target": 2,
              "stop": [{"host": "w1", "unit": "sidekiq-bulk@3.service"}]}
    )  # fmt: skip
    stops = {"w1": loop_result(item("sidekiq-bulk@3.service", waited_seconds=4.5, busy_at_stop=2))}

    (outcome,) = commit.unit_outcomes(scale_in, {}, stops)

    assert outcome.ok
    assert outcome.operation == "stop"
    assert outcome.message == (
        "stopped after waiting 4.5 s for running jobs; 2 jobs still running were pushed back to their queues"
    )


def test_blocked_pool_reported() -> None:
    blocked = plan(bulk={"status": "blocked", "action": "hold", "reason": "Not scaled this run: ..."})

    results = commit.pool_results(blocked, [])

    assert results == {
        "bulk": {"status": "blocked", "action": "hold", "message": "Not scaled this run: ...", "units": []}
    }


def test_pool_without_units_is_left_out() -> None:
    assert commit.pool_results(plan(bulk={"status": "hold", "action": "hold"}), []) == {}


def test_only_succeeded_actions_recorded() -> None:
    stored = {"bulk": PolicyState(last_action=SCALE_IN, last_action_at=NOW - 900).to_dict()}
    results = {
        "bulk": {"status": commit.SUCCEEDED, "action": SCALE_OUT},
        "slow": {"status": commit.FAILED, "action": SCALE_OUT},
        "cron": {"status": commit.BLOCKED, "action": "hold"},
    }

    fields, warnings = commit.record_actions(stored, results, NOW)

    assert list(fields) == ["pool:bulk"]
    assert warnings == []
    state = PolicyState.from_dict(json.loads(fields["pool:bulk"]))
    assert state.last_action == SCALE_OUT
    assert state.last_action_at == NOW
    assert state.last_scale_out_at == NOW


def test_recorded_scale_in_keeps_last_scale_out() -> None:
    stored = {"bulk": PolicyState(last_action=SCALE_OUT, last_action_at=NOW - 60, last_scale_out_at=NOW - 60).to_dict()}

    fields, _ = commit.record_actions(stored, {"bulk": {"status": commit.SUCCEEDED, "action": SCALE_IN}}, NOW)

    state = PolicyState.from_dict(json.loads(fields["pool:bulk"]))
    assert state.last_action == SCALE_IN
    assert state.last_action_at == NOW
    assert state.last_scale_out_at == NOW - 60


def test_unreadable_stored_state_replaced_with_warning() -> None:
    fields, warnings = commit.record_actions(
        {"bulk": {"version": 99}}, {"bulk": {"status": commit.SUCCEEDED, "action": SCALE_OUT}}, NOW
    )

    assert "pool:bulk" in fields
    assert warnings == [
        "Pool bulk: the stored autoscale state was discarded (policy state version 99 is not supported; expected 1)."
    ]


def test_check_mode_commit_reports_without_redis() -> None:
    starts = {"w1": loop_result(item("sidekiq-bulk@2.service")), "w2": loop_result(item("sidekiq-bulk@2.service"))}
    checked = {**SCALE_OUT_PLAN, "lock": {"value": None, "released": True}}

    result = commit.commit(None, checked, starts, {}, check_mode=True)

    assert result["recorded"] == []
    assert result["problems"] == []
    assert result["log_lines"] == [
        "autoscale shop/bulk succeeded: scale_out from 2 to 4 done: start sidekiq-bulk@2.service on w1 (started), "
        "start sidekiq-bulk@2.service on w2 (started)"
    ]
