"""sidekiq_ops.fleet.autoscale and autoscale_commit run by ansible-playbook against a real redis-server and Sidekiq.

Unit readings written the way the playbook registers them take the place of the worker hosts. They name real
Sidekiq 6.4.1 processes started here, with this machine's hostname and the Sidekiq PID as MainPID, so the module
matches units to processes exactly as on a host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sidekiq_fixtures import (  # type: ignore[import-not-found]
    ROOT,
    RedisServer,
    SidekiqWorker,
    free_port,
    ruby_enqueue,
    running_redis,
    sidekiq_launcher,
    wait_for,
)

pytestmark = pytest.mark.sidekiq

HOSTNAME = socket.gethostname()
LOCK_KEY = "sidekiq-ops:autoscale:shop:lock"
STATE_KEY = "sidekiq-ops:autoscale:shop:state"
BULK: dict[str, Any] = {
    "name": "bulk",
    "queues": ["default", "slow"],
    "concurrency": 2,
    "timeout": 5,
    "processes": {"min": 1, "max": 4},
    "autoscale": {"target_latency": 5, "scale_in_cooldown": 0, "scale_in_stabilization": 0},
}
CRITICAL: dict[str, Any] = {
    "name": "critical",
    "queues": ["critical"],
    "concurrency": 2,
    "processes": {"min": 1, "max": 1},
}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., SidekiqWorker]]:
    with sidekiq_launcher(tmp_path / "sidekiq") as start:
        yield start


def show_output(units: list[tuple[str, int, int]]) -> str:
    """Write what READ_COMMAND prints for the given (pool, instance number, MainPID) units on this machine."""
    blocks = [
        f"MainPID={pid}\nId=sidekiq-{pool}@{number}.service\nActiveState=active\nSubState=running"
        for pool, number, pid in units
    ]
    return HOSTNAME + "\n" + "\n\n".join(blocks) + "\n"


def registered(units: list[tuple[str, int, int]]) -> dict[str, Any]:
    return {"changed": False, "rc": 0, "stdout": show_output(units), "stderr": "", "failed": False}


def ansible_environment() -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
    }


def run_tasks(directory: Path, tasks: list[dict[str, Any]], *options: str) -> list[dict[str, Any]]:
    """Run tasks on localhost with ansible-playbook and return the result of each, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    playbook = directory / f"playbook-{len(list(directory.glob('playbook-*.yml')))}.yml"
    playbook.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", *options, str(playbook)],
        cwd=ROOT, env=ansible_environment(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(completed.stdout)
    return [task["hosts"]["localhost"] for play in report["plays"] for task in play["tasks"]]


def autoscale_task(server: RedisServer, instances: dict[str, Any], pools: list[dict[str, Any]], **extra: Any) -> dict:
    arguments = {"pools": pools, "fleet": "shop", "redis_url": server.url, "instances": instances, **extra}
    return {"name": "autoscale", "sidekiq_ops.fleet.autoscale": arguments, "ignore_errors": True}


def commit_task(server: RedisServer, plan: dict[str, Any], starts: dict[str, Any], stops: dict[str, Any]) -> dict:
    arguments = {"plan": plan, "redis_url": server.url, "start_results": starts, "stop_results": stops}
    return {"name": "commit", "sidekiq_ops.fleet.autoscale_commit": arguments, "ignore_errors": True}


def started(host_plan: list[dict[str, Any]], failed_units: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write the loop result that the playbook's start task registers, failing the named units."""
    results = []
    for item in host_plan:
        if item["unit"] in failed_units:
            results.append({"item": item, "failed": True, "changed": False, "msg": f"Unit {item['unit']} failed."})
        else:
            results.append({"item": item, "changed": True, "state": "started"})
    return {"changed": True, "results": results}


def stored_pool_state(server: RedisServer, pool: str) -> dict[str, Any]:
    raw = server.client().hget(STATE_KEY, f"pool:{pool}")
    assert raw is not None, f"no state stored for pool {pool}"
    return dict(json.loads(raw))


@pytest.fixture
def busy_fleet(redis_server: RedisServer, launch: Callable[..., SidekiqWorker]) -> dict[str, Any]:
    """One bulk and one critical process running, with 40 slow jobs waiting for the bulk pool."""
    bulk = launch(redis_server.url, ("default", "slow"), concurrency=2, timeout=5, tag="bulk")
    critical = launch(redis_server.url, ("critical",), concurrency=2, timeout=5, tag="critical")
    client = redis_server.client()
    bulk.identity(client)
    critical.identity(client)
    ruby_enqueue(redis_server.url, "--slow", "40", "--slow-seconds", "2")
    wait_for(lambda: int(client.hget(bulk.identity(client), "busy") or 0) == 2, timeout=30, description="busy")
    instances = {"w1": registered([("bulk", 1, bulk.pid), ("critical", 1, critical.pid)])}
    return {"instances": instances, "bulk": bulk}


def test_check_mode_plans_without_lock_or_state(tmp_path: Path, redis_server: RedisServer, busy_fleet: dict) -> None:
    (result,) = run_tasks(
        tmp_path, [autoscale_task(redis_server, busy_fleet["instances"], [BULK, CRITICAL])], "--check", "--diff"
    )

    assert result.get("failed") is not True, result
    assert result["changed"] is True
    bulk = result["pools"]["bulk"]
    assert bulk["action"] == "scale_out"
    assert bulk["current"] == 1
    assert bulk["target"] == 4
    assert [item["unit"] for item in bulk["start"]] == [f"sidekiq-bulk@{number}.service" for number in (2, 3, 4)]
    assert result["pools"]["critical"]["action"] == "hold"
    assert result["diff"] == {
        "before": "bulk: 1 processes\ncritical: 1 processes\n",
        "after": "bulk: 4 processes\ncritical: 1 processes\n",
    }
    assert result["lock"]["value"] is None
    assert redis_server.client().keys("sidekiq-ops:*") == []


def test_plan_then_commit_records_the_action(tmp_path: Path, redis_server: RedisServer, busy_fleet: dict) -> None:
    (plan,) = run_tasks(tmp_path, [autoscale_task(redis_server, busy_fleet["instances"], [BULK, CRITICAL])])

    assert plan.get("failed") is not True, plan
    assert plan["actions_planned"] is True
    assert plan["lock_held"] is False
    client = redis_server.client()
    assert client.get(LOCK_KEY) == plan["lock"]["value"].encode()
    assert stored_pool_state(redis_server, "bulk")["last_action"] is None
    assert plan["log_lines"][0].startswith("autoscale shop/bulk scale_out 1 -> 4 (backlog ")

    (outcome,) = run_tasks(tmp_path, [commit_task(redis_server, plan, {"w1": started(plan["starts"]["w1"])}, {})])

    assert outcome.get("failed") is not True, outcome
    assert outcome["pools"]["bulk"]["status"] == "succeeded"
    assert outcome["recorded"] == ["bulk"]
    assert outcome["problems"] == []
    assert outcome["lock_released"] is True
    assert not client.exists(LOCK_KEY)
    state = stored_pool_state(redis_server, "bulk")
    assert state["last_action"] == "scale_out"
    assert state["last_action_at"] == plan["now"]


def test_second_run_reports_the_lock(tmp_path: Path, redis_server: RedisServer, busy_fleet: dict) -> None:
    task = autoscale_task(redis_server, busy_fleet["instances"], [BULK, CRITICAL])
    (first,) = run_tasks(tmp_path, [task])
    state_after_first = redis_server.client().hgetall(STATE_KEY)

    (second,) = run_tasks(tmp_path, [task])

    assert second.get("failed") is not True, second
    assert second["lock_held"] is True
    assert second["changed"] is False
    assert second["actions_planned"] is False
    assert second["starts"] == {}
    assert second["msg"].startswith(
        f"Another autoscaling run of fleet shop holds the lock (held by host={HOSTNAME} since="
    )
    assert redis_server.client().hgetall(STATE_KEY) == state_after_first

    run_tasks(tmp_path, [commit_task(redis_server, first, {"w1": started(first["starts"]["w1"])}, {})])
    (third,) = run_tasks(tmp_path, [task])

    assert third["lock_held"] is False


def test_failed_start_is_reported_and_not_recorded(tmp_path: Path, redis_server: RedisServer, busy_fleet: dict) -> None:
    (plan,) = run_tasks(tmp_path, [autoscale_task(redis_server, busy_fleet["instances"], [BULK, CRITICAL])])
    units = plan["starts"]["w1"]

    (outcome,) = run_tasks(
        tmp_path, [commit_task(redis_server, plan, {"w1": started(units, failed_units=(units[1]["unit"],))}, {})]
    )

    assert outcome.get("failed") is not True, outcome
    assert outcome["pools"]["bulk"]["status"] == "failed"
    assert outcome["recorded"] == []
    assert outcome["problems"] == [
        f"bulk: scale_out from 1 to 4 failed: start {units[1]['unit']} on w1: failed: Unit {units[1]['unit']} "
        f"failed.; done: {units[0]['unit']} on w1, {units[2]['unit']} on w1"
    ]
    assert stored_pool_state(redis_server, "bulk")["last_action"] is None
    assert not redis_server.client().exists(LOCK_KEY)


def test_idle_fleet_run_releases_the_lock(
    tmp_path: Path, redis_server: RedisServer, launch: Callable[..., SidekiqWorker]
) -> None:
    worker = launch(redis_server.url, ("critical",), concurrency=2, tag="critical")
    worker.identity(redis_server.client())
    instances = {"w1": registered([("critical", 1, worker.pid)])}

    results = run_tasks(tmp_path, [autoscale_task(redis_server, instances, [CRITICAL]) for _ in range(2)])

    for result in results:
        assert result.get("failed") is not True, result
        assert result["changed"] is False
        assert result["lock"]["released"] is True
        assert result["actions_planned"] is False
    assert not redis_server.client().exists(LOCK_KEY)
    fleet = json.loads(redis_server.client().hget(STATE_KEY, "fleet"))
    assert fleet["busy"] == {"critical": 0, "(other)": 0}


def test_scale_in_stops_the_idle_process(
    tmp_path: Path, redis_server: RedisServer, launch: Callable[..., SidekiqWorker]
) -> None:
    busy = launch(redis_server.url, ("slow",), concurrency=2, timeout=5, tag="bulk")
    idle = launch(redis_server.url, ("default",), concurrency=2, timeout=5, tag="bulk")
    client = redis_server.client()
    busy_identity, idle_identity = busy.identity(client), idle.identity(client)
    ruby_enqueue(redis_server.url, "--slow", "1", "--slow-seconds", "20")
    wait_for(lambda: int(client.hget(busy_identity, "busy") or 0) == 1, timeout=30, description="the slow job")
    instances = {"w1": registered([("bulk", 1, busy.pid), ("bulk", 2, idle.pid)])}

    (result,) = run_tasks(tmp_path, [autoscale_task(redis_server, instances, [BULK])], "--check")

    bulk = result["pools"]["bulk"]
    assert bulk["action"] == "scale_in", bulk["reason"]
    assert bulk["stop"] == [
        {"host": "w1", "unit": "sidekiq-bulk@2.service", "pool": "bulk", "busy": 0, "identity": idle_identity}
    ]
    assert result["stops"] == {"w1": [{"unit": "sidekiq-bulk@2.service", "pool": "bulk", "timeout": 5, "busy": 0}]}


def test_unread_host_blocks_only_its_pools(tmp_path: Path, redis_server: RedisServer, busy_fleet: dict) -> None:
    # The Sidekiq processes run on this machine, which plays the unreachable w2 here. The only host that was read,
    # w1, has another node name and no units.
    instances = {
        "w1": {"changed": False, "rc": 0, "stdout": "w1-node\n", "stderr": ""},
        "w2": {"unreachable": True, "msg": "Failed to connect to the host via ssh: timed out", "changed": False},
    }
    lone = dict(BULK, name="lone", queues=["lone"])

    (result,) = run_tasks(tmp_path, [autoscale_task(redis_server, instances, [BULK, CRITICAL, lone])], "--check")

    assert result.get("failed") is not True, result
    assert result["unreadable_hosts"] == {"w2": "unreachable: Failed to connect to the host via ssh: timed out"}
    for name in ("bulk", "critical"):
        pool = result["pools"][name]
        assert pool["status"] == "blocked"
        assert pool["reason"] == (
            f"Not scaled this run: 1 live process of the pool run on {HOSTNAME}, which could not be read (w2: "
            "unreachable: Failed to connect to the host via ssh: timed out). Check that host, or remove it from the "
            "inventory group if it is gone."
        )
    assert result["pools"]["lone"]["status"] == "act"
    assert result["pools"]["lone"]["start"] == [
        {"host": "w1", "unit": "sidekiq-lone@1.service", "pool": "lone", "busy": None, "identity": None}
    ]
    assert [problem.split(":")[0] for problem in result["problems"]] == ["bulk", "critical"]


@pytest.mark.parametrize(
    ("pools", "extra", "message"),
    [
        ([dict(BULK, processes={"min": 5, "max": 2})], {}, "processes.min 5 is above processes.max 2; lower min"),
        ([dict(BULK, autoscale={"scale_in_cooldown": -10})], {}, "autoscale.scale_in_cooldown -10 is invalid"),
        ([dict(BULK, autoscale={"target_latency": 0})], {}, "autoscale.target_latency 0 is invalid"),
        ([BULK], {"pools_filter": ["nightly"]}, "pools_filter names unknown pools ['nightly']"),
        ([BULK], {"fleet": "my fleet"}, "fleet 'my fleet' is invalid"),
        ([BULK], {"instances": {"w1": "not a result"}}, "instances['w1'] is str"),
    ],
    ids=["min-above-max", "negative-cooldown", "zero-target-latency", "unknown-filter", "fleet-name", "instances"],
)
def test_invalid_input_fails_before_anything_changes(
    tmp_path: Path, redis_server: RedisServer, pools: list[dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    arguments = {"instances": {}, **extra}
    instances = arguments.pop("instances")

    (result,) = run_tasks(tmp_path, [autoscale_task(redis_server, instances, pools, **arguments)])

    assert result["failed"] is True
    assert message in result["msg"]
    assert redis_server.client().keys("*") == []


def test_unreachable_redis_fails_clearly(tmp_path: Path) -> None:
    port = free_port()
    task = {
        "name": "autoscale",
        "sidekiq_ops.fleet.autoscale": {"pools": [BULK], "redis_host": "127.0.0.1", "redis_port": port},
        "ignore_errors": True,
    }

    (result,) = run_tasks(tmp_path, [task])

    assert result["failed"] is True
    assert result["msg"].startswith(f"Could not connect to Redis at 127.0.0.1:{port} db 0")
