"""Unit tests of parse_reply: the read script's JSON reply turned into a SidekiqState, without Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import JobSetState
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_parsing import (
    MILLISECONDS_FROM,
    enqueued_at_seconds,
    parse_reply,
)

NOW = 1_700_000_000.25


def script_reply(
    *,
    counters: tuple[Any, Any] = (False, False),
    job_sets: tuple[int, ...] = (0, 0, 0, 0, 0, 0),
    queues: list[Any] | None = None,
    schedule_scan: list[Any] | None = None,
    retry_scan: list[Any] | None = None,
    processes: list[Any] | None = None,
    errors: list[Any] | None = None,
) -> list[Any]:
    """Build a reply shaped like the script's, passed through JSON as the real one is.

    Empty lists are written as {} because that is how Lua's cjson encodes an empty table.
    """

    def lua_list(items: list[Any] | None) -> Any:
        return items if items else {}

    reply = [
        ["1700000000", "250000"],
        list(counters),
        list(job_sets),
        lua_list(queues),
        schedule_scan or [0, {}, {}],
        retry_scan or [0, {}, {}],
        lua_list(processes),
        lua_list(errors),
    ]
    return list(json.loads(json.dumps(reply)))


def process_entry(
    identity: str = "web-1:101:abc",
    *,
    exists: int = 1,
    hash_error: str = "",
    info: Any = None,
    busy: Any = "2",
    beat: Any = None,
    quiet: Any = "false",
    rss: Any = "51200",
    concurrency: Any = False,
    work: list[Any] | None = None,
    work_problems: list[Any] | None = None,
) -> list[Any]:
    if info is None:
        info = json.dumps(
            {
                "hostname": "web-1",
                "pid": 101,
                "tag": "shop",
                "labels": ["blue"],
                "concurrency": 10,
                "queues": ["default", "low"],
                "identity": identity,
            }
        )
    return [
        identity,
        exists,
        hash_error,
        info,
        busy,
        str(NOW - 3) if beat is None else beat,
        quiet,
        rss,
        concurrency,
        work or {},
        work_problems or {},
    ]


def test_parse_reply_empty_database() -> None:
    state = parse_reply(script_reply())

    assert state.sidekiq_data_found is False
    assert state.now == NOW
    assert state.processed == 0
    assert state.failed == 0
    assert state.queues == {}
    assert state.processes == ()
    assert state.malformed == ()
    assert state.enqueued == 0


def test_parse_reply_counters_and_job_sets() -> None:
    state = parse_reply(script_reply(counters=("1200", "34"), job_sets=(7, 3, 5, 1, 9, 0)))

    assert state.sidekiq_data_found is True
    assert state.processed == 1200
    assert state.failed == 34
    assert (state.scheduled.size, state.scheduled.due) == (7, 3)
    assert (state.retries.size, state.retries.due) == (5, 1)
    assert state.dead == 9


def test_parse_reply_counter_not_integer() -> None:
    state = parse_reply(script_reply(counters=("12abc", False)), prefix="shop:")

    assert state.processed == 0
    assert state.sidekiq_data_found is True
    assert [(entry.kind, entry.reason, entry.examples) for entry in state.malformed] == [
        ("counter", "not an integer", ("shop:stat:processed",))
    ]


def test_queue_latency_from_seconds() -> None:
    state = parse_reply(script_reply(queues=["default", 3, "1699999990.25", ""]))

    queue = state.queues["default"]
    assert queue.size == 3
    assert queue.oldest_enqueued_at == 1_699_999_990.25
    assert queue.latency == pytest.approx(10.0, abs=1e-6)


def test_queue_latency_from_milliseconds() -> None:
    # Sidekiq 8 writes integer epoch milliseconds.
    state = parse_reply(script_reply(queues=["default", 1, "1699999995250", ""]))

    queue = state.queues["default"]
    assert queue.oldest_enqueued_at == pytest.approx(1_699_999_995.25)
    assert queue.latency == pytest.approx(5.0, abs=1e-6)


def test_empty_queue_latency_is_zero() -> None:
    state = parse_reply(script_reply(queues=["idle", 0, "", ""]))

    assert state.queues["idle"].latency == 0.0
    assert state.queues["idle"].oldest_enqueued_at is None
    assert state.sidekiq_data_found is True


@pytest.mark.parametrize(
    ("enqueued_at", "problem", "reason"),
    [
        ("", "invalid JSON", "invalid JSON"),
        ("", "no enqueued_at", "no enqueued_at"),
        ("", "enqueued_at is not a number", "enqueued_at is not a number"),
        ("inf", "", "enqueued_at is not a finite number"),
    ],
)
def test_queue_with_malformed_oldest_job(enqueued_at: str, problem: str, reason: str) -> None:
    state = parse_reply(script_reply(queues=["imports", 4, enqueued_at, problem]), prefix="shop:")

    queue = state.queues["imports"]
    assert queue.size == 4
    assert queue.latency == 0.0
    assert queue.oldest_enqueued_at is None
    assert len(state.malformed) == 1
    assert state.malformed[0].kind == "queued job"
    assert state.malformed[0].reason == reason
    assert state.malformed[0].examples == ("shop:queue:imports",)


def test_enqueued_at_unit_threshold() -> None:
    assert enqueued_at_seconds(1_700_000_000.5) == 1_700_000_000.5
    assert enqueued_at_seconds(1_700_000_000_500) == 1_700_000_000.5
    assert enqueued_at_seconds(MILLISECONDS_FROM - 1) == MILLISECONDS_FROM - 1
    assert enqueued_at_seconds(MILLISECONDS_FROM) == MILLISECONDS_FROM / 1000


def test_live_process_fields() -> None:
    state = parse_reply(
        script_reply(processes=[process_entry(work=["default", 2], beat=str(NOW - 4.5))]),
    )

    (process,) = state.processes
    assert process.identity == "web-1:101:abc"
    assert process.hostname == "web-1"
    assert process.pid == 101
    assert process.tag == "shop"
    assert process.labels == ("blue",)
    assert process.version is None
    assert process.concurrency == 10
    assert process.queues == ("default", "low")
    assert process.busy == 2
    assert process.busy_by_queue == {"default": 2}
    assert process.quiet is False
    assert process.beat == NOW - 4.5
    assert process.seconds_since_beat == pytest.approx(4.5)
    assert process.rss_kb == 51200
    assert process.live is True
    assert process.stale_reason is None
    assert state.busy == 2


def test_concurrency_field_wins_over_info() -> None:
    # Sidekiq 8.1.2+ keeps concurrency in its own hash field.
    info = json.dumps({"hostname": "web-1", "pid": 101, "queues": ["default"], "version": "8.1.2"})
    state = parse_reply(script_reply(processes=[process_entry(info=info, concurrency="25")]))

    (process,) = state.processes
    assert process.concurrency == 25
    assert process.version == "8.1.2"
    assert process.live is True


def test_process_with_gone_hash_is_stale() -> None:
    entry = process_entry(
        "worker-7.example.com:4242:0a1b2c",
        exists=0,
        info=False,
        busy=False,
        beat=False,
        quiet=False,
        rss=False,
        work=["slow", 1],
    )
    state = parse_reply(script_reply(processes=[entry]))

    (process,) = state.processes
    assert process.live is False
    assert process.stale_reason is not None
    assert process.stale_reason.startswith("heartbeat hash is gone")
    assert process.hostname == "worker-7.example.com"
    assert process.pid == 4242
    assert process.concurrency == 0
    assert process.beat is None
    assert process.seconds_since_beat is None
    # Leftover work of a dead process is reported on the process but not counted as busy.
    assert process.busy_by_queue == {"slow": 1}
    assert state.busy == 0
    assert state.malformed == ()


def test_process_with_old_beat_is_stale() -> None:
    state = parse_reply(script_reply(processes=[process_entry(beat=str(NOW - 61))]))

    (process,) = state.processes
    assert process.live is False
    assert process.stale_reason == "last heartbeat 61 s ago, more than 60 s"
    assert process.concurrency == 10


def test_process_beat_at_limit_is_live() -> None:
    state = parse_reply(script_reply(processes=[process_entry(beat=str(NOW - 60))]))

    assert state.processes[0].live is True


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"info": "{not json"}, "info is not valid JSON"),
        ({"info": "[1, 2]"}, "info is not a JSON object"),
        ({"info": json.dumps({"concurrency": 5})}, "info has no list of queue names"),
        ({"info": False}, "heartbeat hash has no info field"),
        ({"info": json.dumps({"queues": ["default"], "concurrency": "5"})}, "info has no integer concurrency"),
        ({"concurrency": "ten"}, "concurrency field is not an integer"),
        ({"beat": "yesterday"}, "heartbeat hash has no valid beat"),
        (
            {"hash_error": "WRONGTYPE Operation against a key holding the wrong kind of value"},
            "heartbeat key is not a hash",
        ),
    ],
)
def test_malformed_process_is_counted_and_not_live(changes: dict[str, Any], reason: str) -> None:
    state = parse_reply(script_reply(processes=[process_entry(**changes)]), prefix="shop:")

    (process,) = state.processes
    assert process.live is False
    assert process.stale_reason == reason
    assert [(entry.kind, entry.reason, entry.count) for entry in state.malformed] == [("process", reason, 1)]
    assert state.malformed[0].examples == ("shop:web-1:101:abc",)


def test_busy_and_rss_not_integers() -> None:
    state = parse_reply(script_reply(processes=[process_entry(busy="two", rss="lots")]))

    (process,) = state.processes
    assert process.busy == 0
    assert process.rss_kb == 0
    assert process.live is True
    assert sorted(entry.reason for entry in state.malformed) == ["busy is not an integer", "rss is not an integer"]


def test_work_problems_are_counted() -> None:
    entry = process_entry(work=["default", 1], work_problems=["invalid JSON", 2, "no queue name", 1])
    state = parse_reply(script_reply(processes=[entry]))

    counts = {(item.kind, item.reason): item.count for item in state.malformed}
    assert counts == {("work entry", "invalid JSON"): 2, ("work entry", "no queue name"): 1}
    assert state.processes[0].live is True


def test_queue_busy_and_fetching_processes() -> None:
    quiet_info = json.dumps({"hostname": "web-2", "pid": 202, "concurrency": 5, "queues": ["default"]})
    processes = [
        process_entry("web-1:101:abc", work=["default", 2, "low", 1]),
        process_entry("web-2:202:def", info=quiet_info, quiet="true", work=["default", 3]),
        process_entry("web-3:303:ghi", beat=str(NOW - 300), work=["default", 4]),
    ]
    state = parse_reply(
        script_reply(
            queues=["default", 9, "1699999999.25", "", "low", 0, "", "", "other", 1, "1699999999", ""],
            processes=processes,
        )
    )

    assert state.queues["default"].busy == 5
    assert state.queues["default"].live_processes == 1
    assert state.queues["low"].busy == 1
    assert state.queues["low"].live_processes == 1
    assert state.queues["other"].live_processes == 0
    assert [process.identity for process in state.live_processes] == ["web-1:101:abc", "web-2:202:def"]
    assert [process.identity for process in state.stale_processes] == ["web-3:303:ghi"]
    assert state.enqueued == 10
    assert state.busy == 6


def test_due_scan_counts_and_problems() -> None:
    state = parse_reply(
        script_reply(
            job_sets=(10, 6, 4, 4, 0, 0),
            schedule_scan=[6, ["default", 3, "low", 2], ["invalid JSON", 1]],
            retry_scan=[4, ["default", 4], {}],
        )
    )

    assert state.scheduled == JobSetState(
        name="schedule", size=10, due=6, due_by_queue={"default": 3, "low": 2}, due_scanned=6
    )
    assert state.retries.due_by_queue == {"default": 4}
    assert state.scheduled.due_truncated is False
    assert [(entry.kind, entry.reason, entry.count, entry.examples) for entry in state.malformed] == [
        ("scheduled job", "invalid JSON", 1, ("schedule",))
    ]


def test_due_for_queues_scales_truncated_scan() -> None:
    job_set = JobSetState(
        name="retry", size=5000, due=4000, due_by_queue={"default": 600, "low": 400}, due_scanned=1000
    )

    assert job_set.due_truncated is True
    assert job_set.due_for_queues(["default"]) == (2400, True)
    assert job_set.due_for_queues(["default", "low"]) == (4000, True)
    assert job_set.due_for_queues(["absent"]) == (0, True)


def test_due_for_queues_exact_when_complete() -> None:
    job_set = JobSetState(name="schedule", size=9, due=3, due_by_queue={"default": 3}, due_scanned=3)

    assert job_set.due_for_queues(["default", "low"]) == (3, False)


def test_key_errors_are_reported() -> None:
    state = parse_reply(
        script_reply(errors=["queues", "WRONGTYPE Operation against a key holding the wrong kind of value"]),
        prefix="shop:",
    )

    (entry,) = state.malformed
    assert entry.kind == "key"
    assert entry.examples == ("shop:queues",)
    assert entry.reason.startswith("WRONGTYPE")


def test_malformed_examples_are_capped() -> None:
    queues: list[Any] = []
    for index in range(8):
        queues += [f"q{index}", 1, "", "invalid JSON"]
    state = parse_reply(script_reply(queues=queues))

    (entry,) = state.malformed
    assert entry.count == 8
    assert entry.examples == ("queue:q0", "queue:q1", "queue:q2", "queue:q3", "queue:q4")
    assert state.malformed_total == 8


def test_to_dict_is_plain_data() -> None:
    state = parse_reply(
        script_reply(
            counters=("5", "1"),
            queues=["default", 2, "1699999999.25", ""],
            processes=[process_entry(work=["default", 1])],
        )
    )

    data = state.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["queues"]["default"]["size"] == 2
    assert data["processes"][0]["queues"] == ["default", "low"]
    assert data["processes"][0]["labels"] == ["blue"]
    assert data["live_processes"] == 1
    assert data["stale_processes"] == 0
    assert data["scheduled"]["due_truncated"] is False
    assert data["enqueued"] == 2
    assert data["busy"] == 1
