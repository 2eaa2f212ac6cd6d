"""Unit tests of the systemd backend: reading units, matching them to Sidekiq processes, planning starts and stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_systemd as backend
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import (
    HostReading,
    Instance,
    UnitReading,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

ROOT = Path(__file__).resolve().parents[2]
POOLS = ["bulk", "critical", "bulk-low"]


def process(hostname: str, pid: int, busy: int = 0, quiet: bool = False, live: bool = True) -> ProcessState:
    return ProcessState(
        identity=f"{hostname}:{pid}:abc{pid}",
        hostname=hostname,
        pid=pid,
        tag="bulk",
        labels=(),
        version=None,
        concurrency=5,
        queues=("default",),
        busy=busy,
        busy_by_queue={"default": busy} if busy else {},
        quiet=quiet,
        beat=1_700_000_000.0,
        seconds_since_beat=1.0,
        rss_kb=1000,
        live=live,
        stale_reason=None if live else "heartbeat expired",
    )


def instance(host: str, number: int, busy: int | None = 0, quiet: bool = False, state: str = "active") -> Instance:
    identity = None if busy is None else f"{host}:{100 + number}:x"
    return Instance(
        host=host, pool="bulk", number=number, active_state=state, main_pid=100 + number, identity=identity,
        busy=busy, quiet=quiet,
    )  # fmt: skip


def reading(host: str, *units: tuple[int, str], pool: str = "bulk", error: str | None = None) -> HostReading:
    return HostReading(
        host=host,
        hostname=None if error else host,
        error=error,
        units=tuple(UnitReading(host, pool, number, state, "running", 100 + number) for number, state in units),
    )


SHOW_OUTPUT = """worker1.example.com
MainPID=1286
Id=sidekiq-bulk@1.service
ActiveState=active
SubState=running

MainPID=0
Id=sidekiq-bulk@2.service
ActiveState=inactive
SubState=dead

MainPID=1400
Id=sidekiq-bulk-low@3.service
ActiveState=activating
SubState=start

MainPID=1218
Id=sidekiq-other@1.service
ActiveState=active
SubState=running

MainPID=77
Id=sidekiq-critical@x.service
ActiveState=active
SubState=running
"""


# --- reading the units ---


def test_show_output_parsed_per_unit() -> None:
    hostname, units = backend.parse_show_output("worker1", SHOW_OUTPUT, POOLS)

    assert hostname == "worker1.example.com"
    assert [(unit.pool, unit.number, unit.active_state, unit.main_pid) for unit in units] == [
        ("bulk", 1, "active", 1286),
        ("bulk", 2, "inactive", 0),
        ("bulk-low", 3, "activating", 1400),
    ]
    assert [unit.counted for unit in units] == [True, False, True]
    assert units[0].unit == "sidekiq-bulk@1.service"


def test_show_output_without_units() -> None:
    hostname, units = backend.parse_show_output("worker1", "worker1\n", POOLS)

    assert hostname == "worker1"
    assert units == ()


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        ({"unreachable": True, "msg": "Failed to connect to the host via ssh"}, "unreachable: Failed to connect"),
        ({"failed": True, "rc": 1, "stderr": "systemctl: not found"}, "reading the units failed: systemctl"),
        ({"rc": 3, "stdout": "", "stderr": ""}, "reading the units failed: exit code 3"),
        ({"skipped": True}, "skipped"),
        ({}, "no reading"),
    ],
    ids=["unreachable", "failed", "exit-code", "skipped", "missing"],
)
def test_host_not_read(registered: dict[str, Any], expected: str) -> None:
    (result,) = backend.parse_host_readings({"worker2": registered}, POOLS)

    assert not result.reachable
    assert result.error is not None
    assert expected in result.error
    assert result.units == ()


def test_host_readings_keep_inventory_order() -> None:
    readings = backend.parse_host_readings(
        {"w2": {"rc": 0, "stdout": "w2\n"}, "w1": {"rc": 0, "stdout": SHOW_OUTPUT}}, POOLS
    )

    assert [item.host for item in readings] == ["w2", "w1"]
    assert readings[1].hostname == "worker1.example.com"
    assert len(readings[1].units) == 3


def test_long_unreachable_message_is_shortened() -> None:
    (result,) = backend.parse_host_readings({"w": {"unreachable": True, "msg": "x " * 1000}}, POOLS)

    assert result.error is not None
    assert len(result.error) <= backend.MAX_ERROR_LENGTH


def test_host_reading_rejects_non_mapping() -> None:
    with pytest.raises(ValueError, match="instances\\['w1'\\] is str"):
        backend.parse_host_readings({"w1": "output"}, POOLS)


def test_playbook_reads_with_the_parsed_command() -> None:
    plays = yaml.safe_load((ROOT / "playbooks" / "autoscale.yml").read_text())
    read_play = next(play for play in plays if play["name"] == "Read the Sidekiq units on every worker host")

    assert read_play["tasks"][0]["ansible.builtin.shell"] == backend.READ_COMMAND


# --- matching units to processes ---


def test_units_match_processes_by_hostname_and_pid() -> None:
    readings = [reading("w1", (1, "active"), (2, "active")), reading("w2", (1, "active"))]
    processes = [process("w1", 101, busy=3), process("w2", 102, busy=1), process("w2", 101, busy=4, quiet=True)]

    matched = backend.match_instances(readings, processes)["bulk"]

    by_unit = {(item.host, item.number): item for item in matched}
    assert by_unit["w1", 1].identity == "w1:101:abc101"
    assert by_unit["w1", 1].busy == 3
    # w1's @2 runs as PID 102, but only w2 has a process with that PID.
    assert by_unit["w1", 2].identity is None
    assert by_unit["w1", 2].busy is None
    assert by_unit["w2", 1].busy == 4
    assert by_unit["w2", 1].quiet is True


def test_stale_process_not_matched() -> None:
    matched = backend.match_instances([reading("w1", (1, "active"))], [process("w1", 101, live=False)])

    assert matched["bulk"][0].identity is None


def test_unread_host_and_stopped_units_not_counted() -> None:
    readings = [reading("w1", (1, "active"), (2, "inactive"), (3, "failed")), reading("w2", error="unreachable")]

    matched = backend.match_instances(readings, [])

    assert [(item.host, item.number) for item in matched["bulk"]] == [("w1", 1)]


# --- starts: spread evenly, lowest free number ---


def test_starts_go_to_the_emptiest_host() -> None:
    readings = [reading("w1", (1, "active"), (2, "active")), reading("w2", (1, "active"))]
    instances = backend.match_instances(readings, [])["bulk"]

    plan = backend.plan_pool("bulk", instances, readings, desired=6, busy=0, concurrency=5)

    assert [(start.host, start.number) for start in plan.starts] == [("w2", 2), ("w1", 3), ("w2", 3)]
    assert plan.target == 6
    assert plan.stops == ()


def test_starts_tie_goes_to_first_host() -> None:
    readings = [reading("w1"), reading("w2"), reading("w3")]

    plan = backend.plan_pool("bulk", [], readings, desired=4, busy=0, concurrency=5)

    assert [(start.host, start.number) for start in plan.starts] == [("w1", 1), ("w2", 1), ("w3", 1), ("w1", 2)]


def test_starts_skip_numbers_still_in_use() -> None:
    # @1 is stopping (deactivating) and @3 runs: the free numbers are 2 and 4; a failed @5 is free again.
    readings = [reading("w1", (1, "deactivating"), (3, "active"), (5, "failed"))]
    instances = backend.match_instances(readings, [])["bulk"]

    plan = backend.plan_pool("bulk", instances, readings, desired=4, busy=0, concurrency=5)

    assert [start.number for start in plan.starts] == [2, 4, 5]


def test_starts_avoid_unread_hosts() -> None:
    readings = [reading("w1", (1, "active")), reading("w2", error="unreachable: timed out")]
    instances = backend.match_instances(readings, [])["bulk"]

    plan = backend.plan_pool("bulk", instances, readings, desired=3, busy=0, concurrency=5)

    assert {start.host for start in plan.starts} == {"w1"}
    assert [start.number for start in plan.starts] == [2, 3]


def test_starts_without_any_read_host() -> None:
    plan = backend.plan_pool("bulk", [], [reading("w1", error="unreachable")], desired=2, busy=0, concurrency=5)

    assert plan.starts == ()
    assert plan.target == 0
    assert "Only 0 of 2 new processes can be placed" in plan.notes[0]


# --- stops: least busy first, balanced, never below the busy floor ---


def test_stops_take_the_least_busy() -> None:
    instances = [instance("w1", 1, busy=5), instance("w1", 2, busy=0), instance("w2", 1, busy=2), instance("w2", 2, 4)]

    stops = backend.plan_stops("bulk", instances, 2, ["w1", "w2"])

    assert [(stop.host, stop.number, stop.busy) for stop in stops] == [("w1", 2, 0), ("w2", 1, 2)]
    assert stops[0].identity == "w1:102:x"


def test_stops_take_quiet_processes_first() -> None:
    instances = [instance("w1", 1, busy=0), instance("w2", 1, busy=3, quiet=True)]

    stops = backend.plan_stops("bulk", instances, 1, ["w1", "w2"])

    assert [(stop.host, stop.number) for stop in stops] == [("w2", 1)]


def test_stops_keep_hosts_balanced_among_idle() -> None:
    instances = [instance("w1", 1), instance("w1", 2), instance("w1", 3), instance("w2", 1), instance("w2", 2)]

    stops = backend.plan_stops("bulk", instances, 3, ["w1", "w2"])

    # The fuller host gives first and the highest number goes first on a host: 3 on w1, then alternately.
    assert [(stop.host, stop.number) for stop in stops] == [("w1", 3), ("w1", 2), ("w2", 2)]


def test_stops_order_unmatched_and_booting() -> None:
    instances = [
        instance("w1", 1, busy=None),
        instance("w1", 2, busy=1),
        instance("w2", 1, busy=None, state="activating"),
    ]

    stops = backend.plan_stops("bulk", instances, 2, ["w1", "w2"])

    assert [(stop.host, stop.number) for stop in stops] == [("w2", 1), ("w1", 2)]


def test_scale_in_never_below_busy_floor() -> None:
    readings = [reading("w1", (1, "active"), (2, "active")), reading("w2", (1, "active"), (2, "active"))]
    instances = [instance("w1", 1, busy=5), instance("w1", 2, busy=2), instance("w2", 1, busy=4), instance("w2", 2)]

    # 11 busy threads need 3 processes of 5 threads, so only one of the two stops the policy asked for happens.
    plan = backend.plan_pool("bulk", instances, readings, desired=2, busy=11, concurrency=5)

    assert [(stop.host, stop.number) for stop in plan.stops] == [("w2", 2)]
    assert plan.target == 3
    assert "Keeping 3 processes instead of 2: 11 threads are busy" in plan.notes[0]


def test_scale_in_blocked_entirely_by_busy_floor() -> None:
    readings = [reading("w1", (1, "active"), (2, "active"))]
    instances = [instance("w1", 1, busy=5), instance("w1", 2, busy=5)]

    plan = backend.plan_pool("bulk", instances, readings, desired=1, busy=10, concurrency=5)

    assert plan.stops == ()
    assert plan.target == 2


def test_unchanged_count_plans_nothing() -> None:
    readings = [reading("w1", (1, "active"))]

    plan = backend.plan_pool("bulk", [instance("w1", 1)], readings, desired=1, busy=0, concurrency=5)

    assert plan == backend.PoolPlan(starts=(), stops=(), target=1)


def test_busy_floor_rounds_up() -> None:
    assert backend.busy_floor(0, 5) == 0
    assert backend.busy_floor(1, 5) == 1
    assert backend.busy_floor(10, 5) == 2
    assert backend.busy_floor(11, 5) == 3
