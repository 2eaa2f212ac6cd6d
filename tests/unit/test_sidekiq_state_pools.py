"""Unit tests of pool validation and per-pool aggregation, on hand-built states."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    JobSetState,
    ProcessState,
    QueueState,
    SidekiqState,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_pools import (
    PoolSpec,
    PoolSpecError,
    aggregate_pools,
    parse_pool_specs,
)


def queue(name: str, size: int, latency: float) -> QueueState:
    return QueueState(name=name, size=size, latency=latency, oldest_enqueued_at=None, busy=0, live_processes=0)


def process(
    identity: str,
    queues: tuple[str, ...],
    concurrency: int,
    busy_by_queue: dict[str, int],
    *,
    quiet: bool = False,
    live: bool = True,
) -> ProcessState:
    return ProcessState(
        identity=identity,
        hostname="host",
        pid=1,
        tag="",
        labels=(),
        version=None,
        concurrency=concurrency,
        queues=queues,
        busy=sum(busy_by_queue.values()),
        busy_by_queue=busy_by_queue,
        quiet=quiet,
        beat=0.0,
        seconds_since_beat=1.0,
        rss_kb=0,
        live=live,
        stale_reason=None if live else "last heartbeat 90 s ago, more than 60 s",
    )


def state(
    queues: list[QueueState],
    processes: list[ProcessState],
    scheduled: JobSetState | None = None,
    retries: JobSetState | None = None,
) -> SidekiqState:
    return SidekiqState(
        now=0.0,
        processed=0,
        failed=0,
        queues={item.name: item for item in queues},
        scheduled=scheduled or JobSetState("schedule", 0, 0, {}, 0),
        retries=retries or JobSetState("retry", 0, 0, {}, 0),
        dead=0,
        processes=tuple(processes),
        malformed=(),
        sidekiq_data_found=True,
    )


def test_parse_pool_specs_names_and_weights() -> None:
    pools: list[dict[str, Any]] = [
        {"name": "critical", "queues": ["critical", "mailers"], "concurrency": 10, "processes": {"min": 2, "max": 2}},
        {"name": "default", "queues": [["default", 3], ["low", 1]], "autoscale": {"target_latency": 10}},
    ]

    assert parse_pool_specs(pools) == [
        PoolSpec(name="critical", queues=("critical", "mailers")),
        PoolSpec(name="default", queues=("default", "low")),
    ]


def test_parse_pool_specs_none_is_empty() -> None:
    assert parse_pool_specs(None) == []


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        (["default"], "pools[0] must be a mapping"),
        ([{"queues": ["default"]}], "pools[0] has no name"),
        ([{"name": "", "queues": ["default"]}], "pools[0] has no name"),
        ([{"name": "a", "queues": ["x"]}, {"name": "a", "queues": ["y"]}], "Pool 'a' is listed twice"),
        ([{"name": "a"}], "Pool 'a' needs 'queues'"),
        ([{"name": "a", "queues": []}], "Pool 'a' needs 'queues'"),
        ([{"name": "a", "queues": "default"}], "Pool 'a' needs 'queues'"),
        ([{"name": "a", "queues": [["default", "3"]]}], "invalid queue entry ['default', '3']"),
        ([{"name": "a", "queues": [["default", True]]}], "invalid queue entry ['default', True]"),
        ([{"name": "a", "queues": [["default"]]}], "invalid queue entry ['default']"),
        ([{"name": "a", "queues": [""]}], "invalid queue entry ''"),
        ([{"name": "a", "queues": ["x", ["x", 2]]}], "lists the queues ['x'] more than once"),
    ],
)
def test_parse_pool_specs_rejects(pools: list[Any], message: str) -> None:
    with pytest.raises(PoolSpecError) as raised:
        parse_pool_specs(pools)

    assert message in str(raised.value)


def test_aggregate_backlog_latency_busy_capacity() -> None:
    fleet = state(
        queues=[queue("default", 40, 12.5), queue("low", 7, 30.0), queue("critical", 3, 1.0)],
        processes=[
            process("a", ("default", "low"), 10, {"default": 6, "low": 2}),
            process("b", ("default", "low"), 10, {"default": 1}, quiet=True),
            process("c", ("default", "low"), 10, {"default": 9}, live=False),
            process("d", ("critical",), 5, {"critical": 5}),
        ],
        scheduled=JobSetState("schedule", 20, 5, {"default": 4, "critical": 1}, 5),
        retries=JobSetState("retry", 3, 2, {"low": 2}, 2),
    )

    pools = aggregate_pools(fleet, [PoolSpec("default", ("default", "low")), PoolSpec("critical", ("critical",))])

    default = pools["default"]
    assert default.queued == 47
    assert default.scheduled_due == 4
    assert default.retry_due == 2
    assert default.backlog == 53
    assert default.latency == 30.0
    # The quiet process still runs jobs; the stale one does not count.
    assert default.busy == 9
    assert default.capacity == 10
    assert default.processes == 1
    assert default.quiet_processes == 1
    assert default.due_estimated is False

    critical = pools["critical"]
    assert critical.backlog == 4
    assert critical.latency == 1.0
    assert critical.busy == 5
    assert critical.capacity == 5
    assert critical.processes == 1
    assert critical.quiet_processes == 0


def test_aggregate_pool_with_unknown_queues() -> None:
    pools = aggregate_pools(state(queues=[], processes=[]), [PoolSpec("new", ("not-yet-pushed",))])

    new = pools["new"]
    assert new.queued == 0
    assert new.backlog == 0
    assert new.latency == 0.0
    assert new.capacity == 0
    assert new.busy == 0


def test_aggregate_process_spanning_two_pools() -> None:
    fleet = state(
        queues=[queue("a", 1, 1.0), queue("b", 1, 2.0)],
        processes=[process("both", ("a", "b"), 8, {"a": 1, "b": 2})],
    )

    pools = aggregate_pools(fleet, [PoolSpec("pa", ("a",)), PoolSpec("pb", ("b",))])

    assert pools["pa"].capacity == 8
    assert pools["pb"].capacity == 8
    assert pools["pa"].busy == 1
    assert pools["pb"].busy == 2


def test_aggregate_marks_estimated_due() -> None:
    fleet = state(
        queues=[queue("default", 0, 0.0)],
        processes=[],
        retries=JobSetState("retry", 50_000, 40_000, {"default": 5_000, "low": 5_000}, 10_000),
    )

    pools = aggregate_pools(fleet, [PoolSpec("default", ("default",))])

    assert pools["default"].retry_due == 20_000
    assert pools["default"].due_estimated is True
    assert pools["default"].backlog == 20_000


def test_pool_to_dict() -> None:
    pools = aggregate_pools(state(queues=[queue("q", 2, 3.0)], processes=[]), [PoolSpec("p", ("q",))])

    assert pools["p"].to_dict() == {
        "name": "p",
        "queues": ["q"],
        "queued": 2,
        "scheduled_due": 0,
        "retry_due": 0,
        "backlog": 2,
        "latency": 3.0,
        "busy": 0,
        "capacity": 0,
        "processes": 0,
        "quiet_processes": 0,
        "due_estimated": False,
        "upcoming": 0,
        "longest_running": 0.0,
    }
