"""Unit tests of the reader's upcoming scheduled and retry jobs and the age of the oldest running job."""

from __future__ import annotations

import json
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import JobSetState, ProcessState
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_parsing import parse_reply
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_pools import (
    PoolSpec,
    aggregate_pools,
    longest_running,
)

NOW = 1_700_000_000.0


def reply(schedule_scan: list[Any], processes: list[Any]) -> list[Any]:
    """Build a reply of the read script, passed through JSON as the real one is."""
    raw = [
        ["1700000000", "0"],
        [False, False],
        [5, 0, 0, 0, 0, 0],
        {},
        schedule_scan,
        [0, {}, {}, 0, 0, {}],
        processes,
        {},
    ]
    return list(json.loads(json.dumps(raw)))


def process_entry(oldest: list[Any], unknown: list[Any]) -> list[Any]:
    info = {"hostname": "web-1", "pid": 7, "tag": "default", "concurrency": 10, "queues": ["default", "low"]}
    return [
        "web-1:7:abc", 1, "", json.dumps(info), "2", str(NOW - 1), "false", "100", False,
        ["default", 2], {}, oldest, unknown,
    ]  # fmt: skip


def running(oldest: dict[str, float], unknown: dict[str, int] | None = None) -> ProcessState:
    return ProcessState(
        identity="web-1:7:abc",
        hostname="web-1",
        pid=7,
        tag="default",
        labels=(),
        version=None,
        concurrency=10,
        queues=tuple(oldest) or ("default",),
        busy=len(oldest),
        busy_by_queue=dict.fromkeys(oldest, 1),
        quiet=False,
        beat=NOW,
        seconds_since_beat=0.0,
        rss_kb=0,
        live=True,
        stale_reason=None,
        oldest_run_at_by_queue=oldest,
        unknown_run_at_by_queue=unknown or {},
    )


def test_parse_upcoming_counts() -> None:
    state = parse_reply(reply([0, {}, {}, 7, 7, ["default", 4, "low", 3]], []))

    assert state.scheduled.upcoming == 7
    assert state.scheduled.upcoming_by_queue == {"default": 4, "low": 3}
    assert state.retries.upcoming == 0


def test_parse_older_reply_has_no_upcoming() -> None:
    state = parse_reply(reply([0, {}, {}], [process_entry([], [])[:11]]))

    assert state.scheduled.upcoming == 0
    assert state.processes[0].oldest_run_at_by_queue == {}


def test_parse_run_at_seconds_and_milliseconds() -> None:
    entry = process_entry(["default", str(int(NOW) - 30), "low", str(int(NOW * 1000) - 5000)], ["low", 1])

    (parsed,) = parse_reply(reply([0, {}, {}], [entry])).processes

    assert parsed.oldest_run_at_by_queue == {"default": NOW - 30, "low": NOW - 5}
    assert parsed.unknown_run_at_by_queue == {"low": 1}


def test_upcoming_scaled_when_truncated() -> None:
    scheduled = JobSetState(
        "schedule", 0, 0, {}, 0, upcoming=100, upcoming_by_queue={"a": 5, "b": 5}, upcoming_scanned=10
    )

    assert scheduled.upcoming_for_queues(["a"]) == (50, True)


def test_longest_running_takes_oldest() -> None:
    processes = [running({"default": NOW - 40}), running({"default": NOW - 10, "low": NOW - 90})]

    assert longest_running(processes, {"default"}, NOW) == 40.0
    assert longest_running(processes, {"default", "low"}, NOW) == 90.0


def test_longest_running_idle_is_zero() -> None:
    assert longest_running([running({})], {"default"}, NOW) == 0.0


def test_longest_running_unknown_run_at() -> None:
    assert longest_running([running({"default": NOW - 5}, {"default": 1})], {"default"}, NOW) is None


def test_longest_running_future_clock() -> None:
    assert longest_running([running({"default": NOW + 3})], {"default"}, NOW) == 0.0


def test_pool_gets_upcoming_and_age() -> None:
    state = parse_reply(
        reply([0, {}, {}, 3, 3, ["default", 2, "low", 1]], [process_entry(["default", str(int(NOW) - 12)], [])])
    )

    pool = aggregate_pools(state, [PoolSpec("default", ("default",))])["default"]

    assert pool.upcoming == 2
    assert pool.longest_running == 12.0
