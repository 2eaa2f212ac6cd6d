"""Unit tests of one pool's decision and plan, the log lines, the diff and the lock expiry of a run."""

from __future__ import annotations

from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_plan as run
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import (
    HostReading,
    Instance,
    UnitReading,
    match_instances,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import (
    HOLD,
    SCALE_IN,
    SCALE_OUT,
    PolicyState,
    settings_from_pool,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import PoolState, ProcessState

NOW = 1_700_000_000.0
BULK: dict[str, Any] = {
    "name": "bulk",
    "queues": ["default"],
    "concurrency": 5,
    "timeout": 15,
    "processes": {"min": 2, "max": 6},
    "autoscale": {"target_latency": 10, "scale_in_cooldown": 60, "scale_in_stabilization": 10},
}


def readings(per_host: dict[str, int]) -> list[HostReading]:
    return [
        HostReading(
            host=host,
            hostname=host,
            error=None,
            units=tuple(
                UnitReading(host, "bulk", number, "active", "running", 100 + number) for number in range(1, count + 1)
            ),
        )
        for host, count in per_host.items()
    ]


def processes(per_host: dict[str, int], busy: int = 0) -> list[ProcessState]:
    result = []
    for host, count in per_host.items():
        for number in range(1, count + 1):
            state = ProcessState(
                identity=f"{host}:{100 + number}:n", hostname=host, pid=100 + number, tag="bulk", labels=(),
                version=None, concurrency=5, queues=("default",), busy=busy, busy_by_queue={"default": busy},
                quiet=False, beat=NOW, seconds_since_beat=1.0, rss_kb=0, live=True, stale_reason=None,
            )  # fmt: skip
            result.append(state)
    return result


def pool_state(backlog: int, latency: float, busy: int) -> PoolState:
    return PoolState(
        name="bulk", queues=("default",), queued=backlog, scheduled_due=0, retry_due=0, backlog=backlog,
        latency=latency, busy=busy, capacity=0, processes=0, quiet_processes=0, due_estimated=False,
    )  # fmt: skip


def decide(
    pool: dict[str, Any], hosts: dict[str, int], backlog: int, latency: float, busy: int, stored: PolicyState
) -> run.PoolOutcome:
    host_readings = readings(hosts)
    own = processes(hosts, busy=busy // max(1, sum(hosts.values())))
    instances = match_instances(host_readings, own).get("bulk", [])
    return run.decide_pool(
        pool, settings_from_pool(pool), pool_state(backlog, latency, busy), own, instances, host_readings, stored,
        None, NOW,
    )  # fmt: skip


def test_burst_plans_balanced_scale_out() -> None:
    outcome = decide(BULK, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=PolicyState())

    assert outcome.status == run.ACT
    assert outcome.action == SCALE_OUT
    assert (outcome.current, outcome.desired, outcome.target) == (2, 6, 6)
    assert outcome.plan is not None
    assert [(start.host, start.number) for start in outcome.plan.starts] == [
        ("w1", 2), ("w2", 2), ("w1", 3), ("w2", 3)
    ]  # fmt: skip
    assert "Scaling out from 2 to 6" in outcome.reason


def test_planned_action_kept_out_of_stored_state() -> None:
    earlier = PolicyState(last_action=SCALE_IN, last_action_at=NOW - 500, last_scale_out_at=NOW - 900)

    outcome = decide(BULK, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=earlier)

    assert outcome.action == SCALE_OUT
    assert outcome.state is not None
    assert outcome.state.last_action == SCALE_IN
    assert outcome.state.last_action_at == NOW - 500
    assert outcome.state.last_scale_out_at == NOW - 900
    # The reading itself is kept, so the next run has its sample.
    assert outcome.state.samples[-1].at == NOW


def test_fixed_pool_holds() -> None:
    fixed = {**BULK, "processes": {"min": 2, "max": 2}}

    outcome = decide(fixed, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=PolicyState())

    assert outcome.status == run.UNCHANGED
    assert outcome.action == HOLD
    assert outcome.plan is not None
    assert outcome.plan.starts == ()
    assert "fixed size of 2" in outcome.reason


def test_idle_pool_scales_in() -> None:
    outcome = decide(BULK, {"w1": 3, "w2": 2}, backlog=0, latency=0.0, busy=0, stored=PolicyState())

    assert outcome.action == SCALE_IN
    assert outcome.target == 2
    assert outcome.plan is not None
    assert [(stop.host, stop.number) for stop in outcome.plan.stops] == [("w1", 3), ("w1", 2), ("w2", 2)]


def test_scale_in_waits_for_cooldown() -> None:
    recent = PolicyState(last_action=SCALE_OUT, last_action_at=NOW - 20, last_scale_out_at=NOW - 20)

    outcome = decide(BULK, {"w1": 3, "w2": 3}, backlog=0, latency=0.0, busy=0, stored=recent)

    assert outcome.action == HOLD
    assert outcome.status == run.UNCHANGED
    assert "scale-in cooldown is 60 s" in outcome.reason


def test_blocked_pool_is_not_decided() -> None:
    host_readings = [*readings({"w1": 1}), HostReading(host="w2", hostname=None, error="unreachable: timed out")]
    own = processes({"w1": 1, "w2": 1})
    instances = match_instances(host_readings, own)["bulk"]

    outcome = run.decide_pool(
        BULK, settings_from_pool(BULK), pool_state(400, 30.0, 0), own, instances, host_readings, PolicyState(), None,
        NOW,
    )  # fmt: skip

    assert outcome.status == run.BLOCKED
    assert outcome.action == HOLD
    assert outcome.state is None
    assert outcome.problem is not None
    assert outcome.problem.startswith("bulk: Not scaled this run: 1 live process of the pool run on w2")


def test_log_line_names_pool_counts_signals_and_units() -> None:
    outcome = decide(BULK, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=PolicyState())

    line = run.log_line("shop", outcome)

    assert line.startswith("autoscale shop/bulk scale_out 2 -> 6 (backlog 400, latency 30.0 s, busy 10/10 threads): ")
    assert line.endswith(
        "Starting sidekiq-bulk@2.service on w1, sidekiq-bulk@2.service on w2, sidekiq-bulk@3.service on w1, "
        "sidekiq-bulk@3.service on w2."
    )
    assert "\n" not in line


def test_hold_log_line() -> None:
    outcome = decide(BULK, {"w1": 1, "w2": 1}, backlog=0, latency=0.0, busy=0, stored=PolicyState())

    assert run.log_line("shop", outcome).startswith("autoscale shop/bulk hold at 2 (backlog 0, latency 0.0 s, ")


def test_diff_shows_counts_before_and_after() -> None:
    outcome = decide(BULK, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=PolicyState())

    assert run.count_diff([outcome]) == {"before": "bulk: 2 processes\n", "after": "bulk: 6 processes\n"}


def test_actions_grouped_by_host_with_timeout() -> None:
    scale_out = decide(BULK, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=PolicyState())

    starts, stops = run.actions_by_host([scale_out], {"bulk": BULK})

    assert starts == {
        "w1": [{"unit": "sidekiq-bulk@2.service", "pool": "bulk"}, {"unit": "sidekiq-bulk@3.service", "pool": "bulk"}],
        "w2": [{"unit": "sidekiq-bulk@2.service", "pool": "bulk"}, {"unit": "sidekiq-bulk@3.service", "pool": "bulk"}],
    }
    assert stops == {}


def test_lock_expiry_covers_the_longest_stop() -> None:
    pools = [BULK, {"name": "critical", "queues": ["critical"], "timeout": 25}]

    # critical: wait up to 25 s for idle, then a stop budget of 25 + 10 s.
    assert run.initial_lock_ttl(pools, margin=10) == 25 + 35 + run.LOCK_MARGIN


def test_lock_expiry_covers_busiest_host() -> None:
    scale_in = decide(BULK, {"w1": 3, "w2": 2}, backlog=0, latency=0.0, busy=0, stored=PolicyState())

    ttl = run.planned_lock_ttl([scale_in], {"bulk": BULK}, margin=10, start_timeout=90)

    # w1 stops two units one after the other: 2 x (15 s wait + 25 s stop budget).
    assert ttl == 2 * (15 + 25) + run.LOCK_MARGIN


def test_summary_counts_actions() -> None:
    scale_out = decide(BULK, {"w1": 1, "w2": 1}, backlog=400, latency=30.0, busy=10, stored=PolicyState())
    hold = decide({**BULK, "name": "bulk"}, {"w1": 1, "w2": 1}, backlog=0, latency=0.0, busy=0, stored=PolicyState())

    text = run.summary("shop", [scale_out, hold], starts=4, stops=0)

    assert text == (
        "Decided 2 pools of fleet shop: 1 to scale out, 0 to scale in, 1 to hold; 4 units to start and 0 to stop."
    )


def test_instance_dataclass_unit_name() -> None:
    assert Instance("w1", "bulk-low", 7, "active", 1).unit == "sidekiq-bulk-low@7.service"
