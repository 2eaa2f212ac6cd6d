"""The sidekiq role rejects bad input before anything changes.

Each case runs the real ansible-playbook in check mode against localhost (connection local) with the role's entry
point `preflight`: argument spec validation, then tasks/preflight.yml. Nothing here reaches the deploy tasks, so
no package, user, file or unit on this machine is touched. The cases run in parallel, one ansible-playbook each.

The inventory has a `redis` group, as the project's inventories do, unless a case models an external Redis. Its
host is never contacted, because every case with that group sets sidekiq_redis_version.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".collections"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
ARGUMENT_SPECS = ROOT / "roles" / "sidekiq" / "meta" / "argument_specs.yml"

PASSWORD = "local-sidekiq-p@ss/word"

PLAYBOOK = """\
---
- name: Run the preflight of the sidekiq role
  hosts: sidekiq_workers
  gather_facts: false
  tasks:
    - name: Check the pools and the Redis version
      ansible.builtin.include_role:
        name: sidekiq_ops.fleet.sidekiq
        tasks_from: preflight
"""

VALID_VARS: dict[str, Any] = {
    "sidekiq_app": "demo",
    "sidekiq_app_src": str(ROOT / "examples" / "demo-app"),
    "sidekiq_app_queues": ["critical", "default", "low"],
    "sidekiq_pools": [
        {
            "name": "critical",
            "queues": ["critical", "default"],
            "concurrency": 5,
            "timeout": 10,
            "processes": {"min": 2, "max": 2},
        },
        {
            "name": "bulk",
            "queues": [["default", 3], ["low", 1]],
            "concurrency": 5,
            "timeout": 15,
            "processes": {"min": 2, "max": 6},
            "autoscale": {"target_latency": 10},
        },
    ],
    "sidekiq_redis_password": PASSWORD,
    "sidekiq_redis_version": "7.0.15",
}

ARGUMENT_SPEC_TASK = "Validating arguments against arg spec 'preflight'"
POOLS_TASK = "Validate the pool definitions"
PASSWORD_TASK = "Check that the Redis password is set"
PORT_TASK = "Check the Redis port"
APP_SOURCE_TASK = "Check that the application source is a directory"
REDIS_VERSION_TASK = "Check that Redis is recent enough"


def with_vars(**changes: Any) -> dict[str, Any]:
    """Return the valid variables with some replaced."""
    variables = copy.deepcopy(VALID_VARS)
    variables.update(changes)
    return variables


def with_bulk(**changes: Any) -> dict[str, Any]:
    """Return the valid variables with keys of the pool 'bulk' replaced."""
    variables = copy.deepcopy(VALID_VARS)
    variables["sidekiq_pools"][1].update(changes)
    return variables


@dataclass(frozen=True)
class Case:
    """One bad input: the variables, the task expected to reject them and fragments of its message."""

    variables: dict[str, Any]
    task: str
    fragments: tuple[str, ...]
    redis_group: bool = True


NAME_FIX = "use lowercase letters, digits and '-'"

CASES: dict[str, Case] = {
    "name-uppercase": Case(with_bulk(name="Bulk"), POOLS_TASK, ("invalid name 'Bulk'", NAME_FIX)),
    "name-underscore": Case(with_bulk(name="bulk_jobs"), POOLS_TASK, ("invalid name 'bulk_jobs'", NAME_FIX)),
    "name-too-long": Case(
        with_bulk(name="b" * 41), POOLS_TASK, (f"invalid name '{'b' * 41}'", "at most 40 characters")
    ),
    "name-leading-dash": Case(
        with_bulk(name="-bulk"), POOLS_TASK, ("invalid name '-bulk'", "starting and ending with a letter or digit")
    ),
    "name-duplicate": Case(
        with_bulk(name="critical"),
        POOLS_TASK,
        ("pool 'critical'", "more than one pool", "give each pool a unique name"),
    ),
    "queues-mixed": Case(
        with_bulk(queues=[["default", 3], "low"]),
        POOLS_TASK,
        ("queues [['default', 3], 'low'] mix weighted and plain entries", "give every queue a weight", "or none"),
    ),
    "queue-duplicate": Case(
        with_bulk(queues=["default", "low", "default"]),
        POOLS_TASK,
        ("queue 'default' is listed twice", "list it once"),
    ),
    "concurrency-quoted": Case(
        with_bulk(concurrency="5"), POOLS_TASK, ("concurrency '5' is invalid", "positive integer (not a quoted string)")
    ),
    "concurrency-zero": Case(with_bulk(concurrency=0), POOLS_TASK, ("concurrency 0 is invalid", "a positive integer")),
    "concurrency-negative": Case(
        with_bulk(concurrency=-3), POOLS_TASK, ("concurrency -3 is invalid", "a positive integer")
    ),
    "timeout-zero": Case(with_bulk(timeout=0), POOLS_TASK, ("timeout 0 is invalid", "a positive integer")),
    "timeout-negative": Case(with_bulk(timeout=-1), POOLS_TASK, ("timeout -1 is invalid", "a positive integer")),
    "min-above-max": Case(
        with_bulk(processes={"min": 3, "max": 2}),
        POOLS_TASK,
        ("processes.min 3 is above processes.max 2", "lower min or raise max"),
    ),
    "min-negative": Case(
        with_bulk(processes={"min": -1, "max": 2}), POOLS_TASK, ("processes.min -1 is invalid", "an integer >= 0")
    ),
    "app-queue-unserved": Case(
        with_vars(sidekiq_app_queues=["critical", "default", "low", "mailers"]),
        POOLS_TASK,
        ("queue 'mailers' is used by the app but served by no pool", "add it to a pool's queues"),
    ),
    "singleton-scaled": Case(
        with_vars(sidekiq_singleton_queues=["low"]),
        POOLS_TASK,
        ("pool 'bulk': serves singleton queue 'low' with up to 6 processes", "processes.max 1"),
    ),
    "margin-small": Case(
        with_vars(sidekiq_shutdown_margin=4),
        POOLS_TASK,
        ("shutdown margin 4 is too small", "an integer >= 5 seconds"),
    ),
    "password-empty": Case(
        with_vars(sidekiq_redis_password=""),
        PASSWORD_TASK,
        ("sidekiq_redis_password is empty", "set the password of the Redis user sidekiq"),
    ),
    "port-out-of-range": Case(
        with_vars(sidekiq_redis_port=70000),
        PORT_TASK,
        ("sidekiq_redis_port 70000 is invalid", "give a TCP port from 1 to 65535"),
    ),
    "redis-too-old": Case(
        with_vars(sidekiq_major_version=7, sidekiq_redis_version="6.0.16"),
        REDIS_VERSION_TASK,
        ("Redis 6.0.16 is too old for Sidekiq 7", "needs Redis >= 6.2", "upgrade Redis"),
    ),
    "redis-version-unknown": Case(
        with_vars(sidekiq_redis_version=""),
        REDIS_VERSION_TASK,
        ("The Redis server version is unknown", "set sidekiq_redis_version"),
        redis_group=False,
    ),
    "app-source-missing": Case(
        with_vars(sidekiq_app_src="/nonexistent/sidekiq-ops-demo-app"),
        APP_SOURCE_TASK,
        ('sidekiq_app_src "/nonexistent/sidekiq-ops-demo-app" is not a directory', "point sidekiq_app_src at"),
    ),
    "app-require-missing": Case(
        with_vars(sidekiq_app_require="missing.rb"),
        APP_SOURCE_TASK,
        ('sidekiq_app_require "missing.rb"', "sidekiq_app_require at the file or folder Sidekiq loads"),
    ),
    "app-source-empty": Case(
        with_vars(sidekiq_app_src=""),
        APP_SOURCE_TASK,
        ('sidekiq_app_src "" is not a directory', "point sidekiq_app_src at"),
    ),
    "pool-unknown-key": Case(
        with_bulk(concurency=5),
        ARGUMENT_SPEC_TASK,
        ("sidekiq_pools.concurency", "Supported parameters include: autoscale, concurrency"),
    ),
    "processes-max-missing": Case(
        with_bulk(processes={"min": 2}),
        ARGUMENT_SPEC_TASK,
        ("missing required arguments: max", "sidekiq_pools -> processes"),
    ),
    "sidekiq-major-unsupported": Case(
        with_vars(sidekiq_major_version=9),
        ARGUMENT_SPEC_TASK,
        ("sidekiq_major_version must be one of: 6, 7, 8", "got: 9"),
    ),
}


@dataclass(frozen=True)
class Run:
    """What one ansible-playbook run returned and printed."""

    returncode: int
    output: str

    def failures(self) -> list[tuple[str, dict[str, Any]]]:
        """Return (task name, result) for every failed task, in the order they ran."""
        found: list[tuple[str, dict[str, Any]]] = []
        task = ""
        for line in self.output.splitlines():
            header = re.match(r"^TASK \[(?:[\w.]+ : )?(.*)\] \**$", line)
            if header:
                task = header.group(1)
            elif " FAILED! => " in line:
                found.append((task, json.loads(line.split(" FAILED! => ", 1)[1])))
        return found

    def recap(self) -> dict[str, int]:
        """Return the counters of the PLAY RECAP line of localhost."""
        match = re.search(r"^localhost\s+:\s+(.*)$", self.output, re.MULTILINE)
        assert match, f"no PLAY RECAP line for localhost in:\n{self.output}"
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def write_inventory(directory: Path, redis_group: bool) -> str:
    """Write an inventory with localhost as the one worker host, and optionally a `redis` group."""
    lines = ["[sidekiq_workers]", f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}"]
    if redis_group:
        lines += ["[redis]", f"redis-1 ansible_connection=local ansible_python_interpreter={sys.executable}"]
    path = directory / "hosts.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_preflight(directory: Path, variables: dict[str, Any], inventory: str | None = None, *extra: str) -> Run:
    """Run the role's preflight in check mode with these variables and return the exit code and the output.

    `inventory` defaults to localhost in an inventory with a `redis` group.
    """
    directory.mkdir(parents=True, exist_ok=True)
    playbook = directory / "preflight.yml"
    playbook.write_text(PLAYBOOK)
    # JSON keeps the types: a quoted "5" stays a string and 5 stays an integer, as in group_vars.
    variables_file = directory / "vars.json"
    variables_file.write_text(json.dumps(variables))
    if inventory is None:
        inventory = write_inventory(directory, redis_group=True)
    environment = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_CONFIG": str(directory / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_LOCAL_TEMP": str(directory / "tmp"),
    }
    (directory / "ansible.cfg").write_text("[defaults]\n")
    completed = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", inventory, str(playbook), "--check", "-e", f"@{variables_file}", *extra],
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Run(completed.returncode, completed.stdout + completed.stderr)


def selected_cases(session: pytest.Session) -> list[str]:
    """Return the ids of the cases whose test was collected, so `-k` runs only those playbooks."""
    ids = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if item.path == Path(__file__) and item.name.startswith("test_preflight_rejects[") and callspec is not None:
            ids.append(callspec.id)
    return ids


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Run every selected case at once, a few ansible-playbook processes at a time."""
    base = tmp_path_factory.mktemp("preflight")
    names = selected_cases(request.session)
    with ThreadPoolExecutor(max_workers=max(2, min(6, (os.cpu_count() or 2) * 2))) as pool:
        futures = {}
        for name in names:
            directory = base / name
            directory.mkdir()
            inventory = write_inventory(directory, CASES[name].redis_group)
            futures[name] = pool.submit(run_preflight, directory, CASES[name].variables, inventory)
        yield {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", CASES.keys())
def test_preflight_rejects(runs: dict[str, Run], name: str) -> None:
    case = CASES[name]
    run = runs[name]
    failures = run.failures()

    assert run.returncode != 0, run.output
    assert len(failures) == 1, run.output
    task, result = failures[0]
    assert case.task in task, run.output
    for fragment in case.fragments:
        assert fragment in result["msg"], result["msg"]

    recap = run.recap()
    assert recap["changed"] == 0
    assert recap["failed"] == 1
    assert PASSWORD not in run.output
    assert "p%40ss%2Fword" not in run.output


def test_preflight_accepts_valid(tmp_path: Path) -> None:
    run = run_preflight(tmp_path, VALID_VARS)
    assert run.returncode == 0, run.output
    assert ARGUMENT_SPEC_TASK in run.output
    assert POOLS_TASK in run.output
    recap = run.recap()
    assert recap["failed"] == 0
    assert recap["changed"] == 0
    assert PASSWORD not in run.output


def test_preflight_accepts_external_redis(tmp_path: Path) -> None:
    """Without a `redis` group in the inventory, sidekiq_redis_version alone gives the version."""
    run = run_preflight(tmp_path, VALID_VARS, write_inventory(tmp_path, redis_group=False))
    assert run.returncode == 0, run.output
    recap = run.recap()
    assert recap["failed"] == 0
    assert recap["changed"] == 0


def test_preflight_accepts_margin_from_command_line(tmp_path: Path) -> None:
    """`-e sidekiq_shutdown_margin=12` passes the string "12". The argument spec converts it, so the preflight must."""
    run = run_preflight(tmp_path, VALID_VARS, None, "-e", "sidekiq_shutdown_margin=12")
    assert run.returncode == 0, run.output
    assert run.recap()["failed"] == 0


def test_preflight_accepts_local_inventory(tmp_path: Path) -> None:
    """The local inventory's group_vars and the role defaults pass. Its hosts run on this machine, in check mode."""
    run = run_preflight(
        tmp_path,
        {
            "sidekiq_redis_version": "7.0.15",
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
        },
        str(ROOT / "inventories" / "local"),
        "--limit",
        "sko-worker1",
    )
    assert run.returncode == 0, run.output
    assert ARGUMENT_SPEC_TASK in run.output
    assert re.search(r"^sko-worker1\s+:\s+ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", run.output, re.MULTILINE)


def test_entry_points_share_options() -> None:
    specs = yaml.safe_load(ARGUMENT_SPECS.read_text())["argument_specs"]
    defaults = yaml.safe_load((ROOT / "roles" / "sidekiq" / "defaults" / "main.yml").read_text())
    assert specs["preflight"]["options"] == specs["main"]["options"]
    assert set(specs["main"]["options"]) == set(defaults)
