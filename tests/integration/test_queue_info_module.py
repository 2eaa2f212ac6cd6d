"""sidekiq_ops.fleet.queue_info run by real ansible and ansible-playbook against real redis-server processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sidekiq_fixtures import ROOT, RedisServer, free_port, ruby_enqueue, running_redis  # type: ignore[import-not-found]

PASSWORD = "s3cr3t-for-module-tests"

POOLS: list[dict[str, Any]] = [
    {
        "name": "default",
        "queues": [["default", 3], ["low", 1]],
        "concurrency": 10,
        "processes": {"min": 1, "max": 8},
        "autoscale": {"target_latency": 10},
    },
    {"name": "critical", "queues": ["critical"], "concurrency": 5, "processes": {"min": 2, "max": 2}},
]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "password", password=PASSWORD) as server:
        yield server


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


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def task_results(output: str) -> list[dict[str, Any]]:
    """Return the localhost result of every task from the json callback's output."""
    report = json.loads(output)
    return [task["hosts"]["localhost"] for play in report["plays"] for task in play["tasks"]]


def run_playbook(directory: Path, tasks: list[dict[str, Any]], *options: str) -> tuple[list[dict[str, Any]], str]:
    playbook = directory / "playbook.yml"
    play = {"hosts": "localhost", "gather_facts": False, "tasks": tasks}
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    completed = subprocess.run(
        [
            bin_path("ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            *options,
            str(playbook),
        ],
        cwd=ROOT,
        env=ansible_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return task_results(completed.stdout), completed.stdout + completed.stderr


def queue_info_task(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "sidekiq_ops.fleet.queue_info": arguments, "ignore_errors": True}


def assert_clean_failure(result: dict[str, Any], message_start: str) -> None:
    assert result["failed"] is True
    assert result["msg"].startswith(message_start), result["msg"]
    # ansible-core 2.19 fills "exception" with this placeholder unless tracebacks are turned on.
    assert result.get("exception", "(traceback unavailable)") == "(traceback unavailable)"
    assert "module_stderr" not in result
    assert "Traceback" not in json.dumps(result)


def test_ad_hoc_run_reads_state(redis_server: RedisServer) -> None:
    ruby_enqueue(redis_server.url, "--fast", "9", "--queues", "default,low,critical")
    arguments = json.dumps({"redis_url": redis_server.url, "pools": POOLS})

    completed = subprocess.run(
        [
            bin_path("ansible"),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-m",
            "sidekiq_ops.fleet.queue_info",
            "-a",
            arguments,
        ],
        cwd=ROOT,
        env=ansible_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    (result,) = task_results(completed.stdout)
    assert result["changed"] is False
    assert result["enqueued"] == 9
    assert {name: queue["size"] for name, queue in result["queues"].items()} == {"critical": 3, "default": 3, "low": 3}
    assert result["pools"]["default"]["backlog"] == 6
    assert result["pools"]["default"]["queues"] == ["default", "low"]
    assert result["pools"]["critical"]["backlog"] == 3
    assert result["pools"]["critical"]["latency"] > 0
    assert result["sidekiq_data_found"] is True
    assert result["round_trips"] in (1, 2)
    assert result["redis_target"] == f"127.0.0.1:{redis_server.port} db 0"
    assert result["msg"].startswith(
        f"Read 3 queues and 0 processes (0 live, 0 stale) from 127.0.0.1:{redis_server.port}"
    )


def test_playbook_in_check_mode(tmp_path: Path, password_server: RedisServer) -> None:
    ruby_enqueue(password_server.url, "--fast", "4", "--queues", "default", "--in", "600")
    tasks = [
        queue_info_task(
            "read with a password",
            redis_host="127.0.0.1",
            redis_port=password_server.port,
            redis_password=PASSWORD,
            pools=POOLS,
        )
    ]

    results, output = run_playbook(tmp_path, tasks, "--check")

    (result,) = results
    assert result.get("failed") is not True, output
    assert result["changed"] is False
    assert result["scheduled"]["size"] == 4
    assert result["scheduled"]["due"] == 0
    assert result["pools"]["default"]["backlog"] == 0
    assert PASSWORD not in output
    # Nothing was written: the schedule still contains the same four jobs.
    assert password_server.client().zcard("schedule") == 4


def test_failures_give_clear_messages(tmp_path: Path, redis_server: RedisServer, password_server: RedisServer) -> None:
    closed_port = free_port()
    redis_server.client(db=5).set("unrelated", "x")
    tasks = [
        queue_info_task("unreachable", redis_host="127.0.0.1", redis_port=closed_port),
        queue_info_task("wrong password", redis_url=f"redis://:wrong-{PASSWORD}@127.0.0.1:{password_server.port}/0"),
        queue_info_task(
            "tls to a plain port",
            redis_host="127.0.0.1",
            redis_port=redis_server.port,
            redis_tls=True,
            redis_socket_timeout=1.0,
        ),
        queue_info_task("empty database", redis_host="127.0.0.1", redis_port=redis_server.port, redis_db=5),
        queue_info_task(
            "empty database allowed",
            redis_host="127.0.0.1",
            redis_port=redis_server.port,
            redis_db=5,
            allow_empty=True,
        ),
        queue_info_task("conflicting options", redis_url=redis_server.url, redis_host="127.0.0.1"),
        queue_info_task(
            "invalid pool", redis_url=redis_server.url, pools=[{"name": "p", "queues": [["default", "heavy"]]}]
        ),
    ]

    results, output = run_playbook(tmp_path, tasks)

    unreachable, wrong_password, tls, empty, allowed, conflicting, invalid_pool = results
    assert_clean_failure(unreachable, f"Could not connect to Redis at 127.0.0.1:{closed_port} db 0")
    assert "Connection refused" in unreachable["msg"]
    assert_clean_failure(wrong_password, f"Authentication to Redis at 127.0.0.1:{password_server.port} db 0 failed")
    assert "invalid username-password pair" in wrong_password["msg"]
    assert_clean_failure(tls, f"TLS connection to Redis at 127.0.0.1:{redis_server.port} db 0 over TLS failed")
    assert_clean_failure(empty, f"Redis at 127.0.0.1:{redis_server.port} db 5 holds no Sidekiq data")
    assert "Check redis_db and redis_namespace" in empty["msg"]
    assert allowed.get("failed") is not True
    assert allowed["sidekiq_data_found"] is False
    assert allowed["queues"] == {}
    assert_clean_failure(conflicting, "redis_url cannot be combined with redis_host")
    assert_clean_failure(invalid_pool, "Pool 'p' has an invalid queue entry ['default', 'heavy']")
    assert PASSWORD not in output
