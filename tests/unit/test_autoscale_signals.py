"""Unit tests of the autoscale input checks, the per-pool signals, the throughput split and the blocked pools."""

from __future__ import annotations

from typing import Any

import pytest

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_signals as signals
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import FleetRecord
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import HostReading, Instance
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    JobSetState,
    PoolState,
    ProcessState,
    SidekiqState,
)


def pool(name: str = "bulk", **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "queues": [name],
        "concurrency": 5,
        "processes": {"min": 1, "max": 4},
        "autoscale": {"target_latency": 10},
        **overrides,
    }


def process(tag: str, busy: int = 0, quiet: bool = False, hostname: str = "w1", pid: int = 1) -> ProcessState:
    return ProcessState(
        identity=f"{hostname}:{pid}:n{pid}",
        hostname=hostname,
        pid=pid,
        tag=tag,
        labels=(),
        version=None,
        concurrency=5,
        queues=(tag,),
        busy=busy,
        busy_by_queue={tag: busy} if busy else {},
        quiet=quiet,
        beat=1.0,
        seconds_since_beat=1.0,
        rss_kb=0,
        live=True,
        stale_reason=None,
    )


def pool_state(backlog: int = 0, latency: float = 0.0, busy: int = 0) -> PoolState:
    return PoolState(
        name="bulk", queues=("bulk",), queued=backlog, scheduled_due=0, retry_due=0, backlog=backlog,
        latency=latency, busy=busy, capacity=0, processes=0, quiet_processes=0, due_estimated=False,
    )  # fmt: skip


def state_with(processes: list[ProcessState]) -> SidekiqState:
    empty = JobSetState(name="schedule", size=0, due=0, due_by_queue={}, due_scanned=0)
    return SidekiqState(
        now=100.0, processed=0, failed=0, queues={}, scheduled=empty, retries=empty, dead=0,
        processes=tuple(processes), malformed=(), sidekiq_data_found=True,
    )  # fmt: skip


# --- validate_request ---


def test_valid_request_returns_settings() -> None:
    settings, errors = signals.validate_request([pool(), pool("critical", processes={"min": 2, "max": 2})], [], [], 10)

    assert errors == []
    assert settings["bulk"].max_processes == 4
    assert settings["critical"].fixed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"processes": {"min": 5, "max": 2}}, "processes.min 5 is above processes.max 2; lower min or raise max"),
        ({"autoscale": {"scale_in_cooldown": -1}}, "autoscale.scale_in_cooldown -1 is invalid; set it to a number"),
        ({"autoscale": {"scale_out_cooldown": -5}}, "autoscale.scale_out_cooldown -5 is invalid"),
        ({"autoscale": {"target_latency": 0}}, "autoscale.target_latency 0 is invalid; set it to a number of seconds"),
        ({"autoscale": {"latency": 5}}, "unknown keys ['latency'] under autoscale"),
        ({"queues": []}, "'queues' must be a non-empty list"),
    ],
    ids=["min-above-max", "negative-scale-in-cooldown", "negative-scale-out-cooldown", "zero-latency",
         "unknown-key", "no-queues"],
)  # fmt: skip
def test_invalid_settings_named(overrides: dict[str, Any], message: str) -> None:
    _, errors = signals.validate_request([pool(**overrides)], [], [], 10)

    assert any(message in error for error in errors), errors
    assert all("pool 'bulk'" in error for error in errors)


def test_min_above_max_reported_once() -> None:
    _, errors = signals.validate_request([pool(processes={"min": 5, "max": 2})], [], [], 10)

    assert len(errors) == 1


def test_unknown_filter_name_rejected() -> None:
    _, errors = signals.validate_request([pool(), pool("critical")], [], ["bulk", "slow"], 10)

    assert errors == ["pools_filter names unknown pools ['slow']; use names from pools: ['bulk', 'critical']"]


def test_singleton_pool_with_several_processes_rejected() -> None:
    _, errors = signals.validate_request([pool("cron", processes={"min": 1, "max": 3})], ["cron"], [], 10)

    assert any("singleton queue 'cron'" in error for error in errors)


def test_small_shutdown_margin_rejected() -> None:
    _, errors = signals.validate_request([pool()], [], [], 2)

    assert any("shutdown margin 2 is too small" in error for error in errors)


# --- processes by pool tag ---


def test_processes_grouped_by_tag() -> None:
    state = state_with([process("bulk"), process("fast"), process("critical"), process("stranger")])
    pools = [pool(), pool("critical"), pool("express", tag="fast")]

    grouped = signals.processes_by_pool(state, pools)

    assert [item.tag for item in grouped["bulk"]] == ["bulk"]
    assert [item.tag for item in grouped["express"]] == ["fast"]
    assert [item.tag for item in grouped[signals.OTHER_PROCESSES]] == ["stranger"]


# --- throughput ---


def record(processed: int, at: float, **busy: int) -> FleetRecord:
    return FleetRecord(processed=processed, at=at, busy=dict(busy))


def test_throughput_unknown_on_first_run() -> None:
    assert signals.pool_throughputs(None, record(500, 100.0, bulk=3), ["bulk"]) == {"bulk": None}


def test_throughput_exact_for_one_pool() -> None:
    result = signals.pool_throughputs(record(100, 70.0, bulk=0), record(400, 100.0, bulk=0), ["bulk"])

    assert result == {"bulk": pytest.approx(10.0)}


def test_throughput_split_by_busy_threads() -> None:
    previous = record(100, 70.0, bulk=3, critical=1)
    current = record(400, 100.0, bulk=5, critical=1)

    result = signals.pool_throughputs(previous, current, ["bulk", "critical"])

    assert result["bulk"] == pytest.approx(10.0 * 8 / 10)
    assert result["critical"] == pytest.approx(10.0 * 2 / 10)


def test_throughput_zero_without_finished_jobs() -> None:
    result = signals.pool_throughputs(record(100, 70.0, bulk=0), record(100, 100.0, bulk=0), ["bulk", "critical"])

    assert result == {"bulk": 0.0, "critical": 0.0}


def test_throughput_unknown_when_no_thread_was_busy() -> None:
    result = signals.pool_throughputs(record(100, 70.0, a=0, b=0), record(200, 100.0, a=0, b=0), ["a", "b"])

    assert result == {"a": None, "b": None}


@pytest.mark.parametrize(
    ("previous", "current"),
    [(record(500, 70.0), record(10, 100.0)), (record(1, 100.0), record(9, 90.0))],
    ids=["counter-reset", "clock-back"],
)
def test_throughput_unknown_after_reset_or_clock_jump(previous: FleetRecord, current: FleetRecord) -> None:
    assert signals.pool_throughputs(previous, current, ["bulk", "critical"]) == {"bulk": None, "critical": None}


# --- signals ---


def test_signals_from_pool_processes_and_units() -> None:
    own = [process("bulk", busy=2, pid=1), process("bulk", busy=0, pid=2), process("bulk", busy=1, quiet=True, pid=3)]
    units = [Instance("w1", "bulk", number, "active", number) for number in (1, 2, 3, 4)]

    result = signals.pool_signals(pool_state(backlog=7, latency=3.5, busy=1), own, units, 100.0, 2.5)

    assert result.backlog == 7
    assert result.latency == 3.5
    assert result.busy == 3
    assert result.processes == 2
    assert result.capacity == 10
    assert result.idle_processes == 1
    assert result.requested == 4
    assert result.throughput == 2.5
    assert result.quiet_busy == 1


def test_signals_busy_takes_the_queue_count_when_larger() -> None:
    result = signals.pool_signals(pool_state(busy=6), [process("bulk", busy=1)], [], 100.0, None)

    assert result.busy == 6


# --- pools that are not scaled ---


def reading(host: str, error: str | None = None) -> HostReading:
    return HostReading(host=host, hostname=None if error else host, error=error)


def test_pool_blocked_by_unread_host_with_its_processes() -> None:
    readings = [reading("w1"), reading("w2", error="unreachable: timed out")]
    own = [process("bulk", hostname="w1", pid=1), process("bulk", hostname="w2", pid=7)]
    units = [Instance("w1", "bulk", 1, "active", 1, identity="w1:1:n1", busy=0)]

    reason = signals.blocked_reason(readings, own, units)

    assert reason is not None
    assert reason.startswith("Not scaled this run: 1 live process of the pool run on w2, which could not be read")
    assert "w2: unreachable: timed out" in reason


def test_pool_on_read_hosts_only_not_blocked() -> None:
    readings = [reading("w1"), reading("w2", error="unreachable")]
    own = [process("bulk", hostname="w1", pid=1)]
    units = [Instance("w1", "bulk", 1, "active", 1, identity="w1:1:n1", busy=0)]

    assert signals.blocked_reason(readings, own, units) is None


def test_pool_not_blocked_when_every_host_was_read() -> None:
    own = [process("bulk", hostname="elsewhere", pid=1)]

    assert signals.blocked_reason([reading("w1")], own, []) is None


def test_unmatched_running_unit_noted() -> None:
    notes = signals.unmatched_notes([Instance("w1", "bulk", 2, "active", 4242)], [reading("w1")])

    assert notes == [
        "sidekiq-bulk@2.service on w1 runs as PID 4242, but Redis has no live Sidekiq process with hostname 'w1' "
        "and that PID; it counts as busy when units to stop are chosen."
    ]


def test_booting_unit_not_noted() -> None:
    assert signals.unmatched_notes([Instance("w1", "bulk", 2, "activating", 4242)], [reading("w1")]) == []
