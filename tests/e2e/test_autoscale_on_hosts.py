"""End to end: playbooks/autoscale.yml on real podman systemd hosts with real Redis and Sidekiq 6.4.1.

The hosts are a set of their own (as4-redis, as4-worker1, as4-worker2 on network as4-net), created fresh by
scripts/testhosts.sh and deployed with playbooks/site.yml from an inventory written here. Every job is checked by its
job id in the demo app's demo:done set and demo:runs counters. Short timeouts and cooldowns keep the file within a
few minutes. The tests run in file order on one fleet, and each waits until the fleet is idle before it starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import local_fleet

pytestmark = pytest.mark.hosts

PREFIX = "as4"
REDIS_HOST = f"{PREFIX}-redis"
WORKERS = (f"{PREFIX}-worker1", f"{PREFIX}-worker2")
SCALE_IN_COOLDOWN = 40
POOLS: list[dict[str, Any]] = [
    {"name": "critical", "queues": ["critical"], "concurrency": 2, "timeout": 5, "processes": {"min": 2, "max": 2}},
    {
        "name": "bulk",
        "queues": [["default", 3], ["low", 1], ["slow", 1]],
        "concurrency": 5,
        "timeout": 10,
        "processes": {"min": 2, "max": 6},
        "autoscale": {"target_latency": 5, "scale_in_cooldown": SCALE_IN_COOLDOWN, "scale_in_stabilization": 10},
    },
    # One process, so the deploy puts it on the first worker only.
    {
        "name": "solo",
        "queues": ["solo"],
        "concurrency": 2,
        "timeout": 5,
        "processes": {"min": 1, "max": 3},
        "autoscale": {"target_latency": 5, "scale_in_cooldown": 600},
    },
]
ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(ROOT / "tests" / "hosts" / "containers.conf"),
    "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
    "ANSIBLE_NOCOLOR": "1",
    "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
    "SIDEKIQ_OPS_HOSTS_PREFIX": PREFIX,
}


def run(command: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        command, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout[-6000:]}\n{completed.stderr}"
    return completed


@dataclass
class Fleet:
    inventory: Path
    url: str
    client: redis.Redis
    directory: Path


@dataclass
class AutoscaleRun:
    """One run of playbooks/autoscale.yml, read from the json callback."""

    returncode: int
    plan: dict[str, Any]
    outcome: dict[str, Any] | None
    host_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str = ""


def task_results(report: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """Return the results of the named task by host, from the json callback's report."""
    for play in report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"] == name:
                return dict(task["hosts"])
    return {}


def parse_run(completed: subprocess.CompletedProcess[str]) -> AutoscaleRun:
    report = json.loads(completed.stdout)
    plan = task_results(report, "Decide every pool and plan the units to start and stop")["localhost"]
    outcome = task_results(report, "Record the actions that succeeded and release the lock").get("localhost")
    stops = task_results(report, "Quiet, drain, stop and disable the planned units")
    return AutoscaleRun(completed.returncode, plan, outcome, stops, completed.stdout + completed.stderr)


def command(fleet: Fleet, *extra: str) -> list[str]:
    return ["ansible-playbook", "-i", str(fleet.inventory), "playbooks/autoscale.yml", *extra]


def autoscale(fleet: Fleet, *extra: str) -> AutoscaleRun:
    """Run one scheduled run and return what it decided and did."""
    completed = subprocess.run(
        command(fleet, *extra), cwd=ROOT, env={**ENV, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    result = parse_run(completed)
    assert result.plan.get("failed") is not True, result.output[-4000:]
    return result


def running_units(pool: str) -> dict[str, list[str]]:
    """Return, per worker host, the running units of a pool as systemd reports them."""
    units: dict[str, list[str]] = {}
    for host in WORKERS:
        output = run(["podman", "exec", host, "systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                      f"sidekiq-{pool}@*.service"]).stdout  # fmt: skip
        units[host] = sorted(line.split()[0] for line in output.splitlines() if line.strip())
    return units


def wait_idle(client: redis.Redis, timeout: float = 120) -> None:
    """Wait until no job waits or runs anywhere in the fleet."""
    deadline = time.monotonic() + timeout
    while True:
        status = local_fleet.status(client)
        waiting = sum(status["queues"].values())
        busy = sum(process["busy"] for process in status["processes"])
        if waiting == 0 and busy == 0:
            return
        assert time.monotonic() < deadline, f"fleet still busy after {timeout} s: {status}"
        time.sleep(1)


def write_inventory(directory: Path, redis_url: str) -> Path:
    inventory = directory / "inventory"
    group_vars = inventory / "group_vars" / "all"
    group_vars.mkdir(parents=True)
    hosts = {
        "all": {
            "vars": {
                "ansible_connection": "containers.podman.podman",
                "ansible_python_interpreter": "/usr/bin/python3",
            },
            "children": {
                "redis": {"hosts": {REDIS_HOST: None}},
                "sidekiq_workers": {"hosts": dict.fromkeys(WORKERS)},
            },
        }
    }
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    local_vars = ROOT / "inventories" / "local" / "group_vars" / "all"
    (group_vars / "redis.yml").write_text((local_vars / "redis.yml").read_text())
    sidekiq = {
        "sidekiq_app": "demo",
        "sidekiq_app_src": str(ROOT / "examples" / "demo-app"),
        "sidekiq_app_require": "app.rb",
        "sidekiq_environment": "production",
        "sidekiq_shutdown_margin": 5,
        "sidekiq_pools": POOLS,
        "sidekiq_redis_password": "{{ redis_sidekiq_password }}",
        # The control host reaches the Redis container by its address; the workers use its name.
        "autoscale_redis_url": redis_url,
    }
    (group_vars / "sidekiq.yml").write_text(yaml.safe_dump(sidekiq, sort_keys=False))
    return inventory


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("autoscale-e2e")
    run(["scripts/testhosts.sh", "up"], timeout=600)
    try:
        url = local_fleet.local_redis_url(REDIS_HOST)
        inventory = write_inventory(directory, url)
        run(["ansible-playbook", "-i", str(inventory), "playbooks/site.yml"])
        client = redis.Redis.from_url(url)
        yield Fleet(inventory=inventory, url=url, client=client, directory=directory)
        client.close()
    finally:
        run(["scripts/testhosts.sh", "down"])


def test_burst_scales_out_then_in_after_cooldown(fleet: Fleet) -> None:
    first = autoscale(fleet)
    assert first.plan["pools"]["bulk"]["current"] == 2
    jids = local_fleet.enqueue(fleet.url, fast=0, slow=150, slow_seconds=1)

    runs = [autoscale(fleet)]
    if runs[0].plan["pools"]["bulk"]["action"] != "scale_out":
        runs.append(autoscale(fleet))

    scale_out = runs[-1]
    bulk = scale_out.plan["pools"]["bulk"]
    assert bulk["action"] == "scale_out", [run.plan["log_lines"] for run in runs]
    assert scale_out.outcome is not None
    assert scale_out.outcome["pools"]["bulk"]["status"] == "succeeded", scale_out.outcome
    units = running_units("bulk")
    assert sum(len(names) for names in units.values()) == bulk["target"]
    assert abs(len(units[WORKERS[0]]) - len(units[WORKERS[1]])) <= 1, units

    final = local_fleet.wait_for(fleet.client, jids, timeout=120, echo=False)
    assert final.done == 150
    assert final.run_twice == 0

    holds: list[AutoscaleRun] = []
    deadline = time.monotonic() + SCALE_IN_COOLDOWN + 90
    while True:
        current = autoscale(fleet)
        if current.plan["pools"]["bulk"]["action"] == "scale_in":
            break
        holds.append(current)
        assert time.monotonic() < deadline, [run.plan["log_lines"] for run in holds]
        time.sleep(6)

    waited = current.plan["now"] - scale_out.plan["now"]
    assert waited >= SCALE_IN_COOLDOWN
    # Runs inside the cooldown must hold for the cooldown or for the stabilization window, whichever the policy
    # names first. On a loaded machine the first run after the drain can already fall after the cooldown.
    inside_cooldown = [run for run in holds if run.plan["now"] - scale_out.plan["now"] < SCALE_IN_COOLDOWN]
    reasons = [run.plan["pools"]["bulk"]["reason"] for run in inside_cooldown]
    assert all("scale-in cooldown" in reason or "demand of the last" in reason for reason in reasons), reasons
    cooldown_holds = [run for run in holds if "scale-in cooldown" in run.plan["pools"]["bulk"]["reason"]]
    assert all(run.plan["now"] - scale_out.plan["now"] < SCALE_IN_COOLDOWN for run in cooldown_holds)
    assert current.outcome is not None
    assert current.outcome["pools"]["bulk"]["status"] == "succeeded", current.outcome
    after = current.plan["pools"]["bulk"]["target"]
    assert sum(len(names) for names in running_units("bulk").values()) == after
    assert after < bulk["target"]


def test_unreachable_host_blocks_its_pools_only(fleet: Fleet) -> None:
    wait_idle(fleet.client)
    assert running_units("solo") == {WORKERS[0]: ["sidekiq-solo@1.service"], WORKERS[1]: []}
    jids = local_fleet.enqueue(fleet.url, fast=0, slow=30, slow_seconds=2, slow_queue="solo")
    time.sleep(3)

    run(["podman", "pause", WORKERS[1]])
    try:
        completed = subprocess.run(
            command(fleet), cwd=ROOT, env={**ENV, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"},
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        run(["podman", "unpause", WORKERS[1]])
    result = parse_run(completed)

    assert result.returncode != 0, "a run with a pool it could not scale must fail"
    assert list(result.plan["unreadable_hosts"]) == [WORKERS[1]]
    assert result.plan["unreadable_hosts"][WORKERS[1]].startswith("unreachable: ")
    for name in ("bulk", "critical"):
        reason = result.plan["pools"][name]["reason"]
        assert result.plan["pools"][name]["status"] == "blocked"
        assert re.match(
            rf"Not scaled this run: \d+ live process(es)? of the pool run on {WORKERS[1]}, which could", reason
        )
    solo = result.plan["pools"]["solo"]
    assert solo["action"] == "scale_out", solo["reason"]
    assert {item["host"] for item in solo["start"]} == {WORKERS[0]}
    assert result.outcome is not None
    assert result.outcome["pools"]["solo"]["status"] == "succeeded"
    assert sorted(problem.split(":")[0] for problem in result.outcome["problems"]) == ["bulk", "critical"]
    report = json.loads(completed.stdout)
    failure = task_results(report, "Fail the run when a pool could not be scaled")["localhost"]
    assert failure["msg"].startswith("Autoscaling could not scale every pool: critical: Not scaled this run: ")
    assert len(running_units("solo")[WORKERS[0]]) == solo["target"]
    assert running_units("solo")[WORKERS[1]] == []

    final = local_fleet.wait_for(fleet.client, jids, timeout=120, echo=False)
    assert final.done == len(jids)


def test_two_runs_at_once_only_one_acts(fleet: Fleet) -> None:
    wait_idle(fleet.client)
    before = sum(len(names) for names in running_units("bulk").values())
    jids = local_fleet.enqueue(fleet.url, fast=0, slow=200, slow_seconds=2)
    time.sleep(4)

    # A check run first: it decides the same scale-out but starts nothing, takes no lock and stores no state.
    state_before = fleet.client.hgetall("sidekiq-ops:autoscale:demo:state")
    checked = autoscale(fleet, "--check", "--diff")
    assert checked.plan["pools"]["bulk"]["action"] == "scale_out", checked.plan["pools"]["bulk"]["reason"]
    assert checked.plan["lock"]["value"] is None
    assert f"bulk: {before} processes" in checked.plan["diff"]["before"]
    assert f"bulk: {checked.plan['pools']['bulk']['target']} processes" in checked.plan["diff"]["after"]
    assert sum(len(names) for names in running_units("bulk").values()) == before
    assert fleet.client.hgetall("sidekiq-ops:autoscale:demo:state") == state_before

    json_env = {**ENV, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"}
    processes = [
        subprocess.Popen(command(fleet), cwd=ROOT, env=json_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in processes]
    runs = [
        parse_run(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        for process, (stdout, stderr) in zip(processes, outputs, strict=True)
    ]

    held = [run for run in runs if run.plan["lock_held"]]
    acted = [run for run in runs if not run.plan["lock_held"]]
    assert len(held) == 1, [run.plan["msg"] for run in runs]
    assert len(acted) == 1
    assert held[0].returncode == 0
    assert held[0].plan["msg"].startswith("Another autoscaling run of fleet demo holds the lock (held by host=")
    assert held[0].outcome is None
    winner = acted[0].plan["pools"]["bulk"]
    assert winner["action"] == "scale_out", winner["reason"]
    assert acted[0].outcome is not None
    assert acted[0].outcome["pools"]["bulk"]["status"] == "succeeded"
    assert sum(len(names) for names in running_units("bulk").values()) == winner["target"] > before
    assert not fleet.client.exists("sidekiq-ops:autoscale:demo:lock")

    final = local_fleet.wait_for(fleet.client, jids, timeout=180, echo=False)
    assert final.done == 200


def test_slow_jobs_survive_scale_in(fleet: Fleet) -> None:
    wait_idle(fleet.client)
    jids = local_fleet.enqueue(fleet.url, fast=1800, slow=200, slow_seconds=5, queues="default,low")
    assert len(set(jids)) == 2000
    for _ in range(2):
        if autoscale(fleet).plan["pools"]["bulk"]["current"] >= 4:
            break
    running = sum(len(names) for names in running_units("bulk").values())
    assert running >= 4

    # Lowering processes.max to 2 makes every run scale in as far as the busy floor allows. While all threads run
    # slow jobs nothing stops. As the slow jobs thin out, the least busy processes are quieted, drained and stopped
    # while the other processes still run slow jobs.
    pools = [dict(pool, processes={"min": 1, "max": 2}) if pool["name"] == "bulk" else pool for pool in POOLS]
    extra_vars = fleet.directory / "bulk-max-2.yml"
    extra_vars.write_text(yaml.safe_dump({"sidekiq_pools": pools}))
    stopped: list[dict[str, Any]] = []
    busy_at_scale_in: list[int] = []
    deadline = time.monotonic() + 180
    while sum(len(names) for names in running_units("bulk").values()) > 2:
        assert time.monotonic() < deadline, "bulk did not come down to 2 processes"
        scale_in = autoscale(fleet, "-e", f"@{extra_vars}")
        bulk = scale_in.plan["pools"]["bulk"]
        assert bulk["action"] in ("scale_in", "hold"), bulk["reason"]
        if bulk["stop"]:
            assert scale_in.outcome is not None
            assert scale_in.outcome["pools"]["bulk"]["status"] == "succeeded", scale_in.outcome
            stopped += [item for host in scale_in.host_results.values() for item in host.get("results", [])]
            busy_at_scale_in.append(bulk["signals"]["busy"])
        time.sleep(1)

    assert len(stopped) == running - 2
    assert all(item.get("failed") is not True for item in stopped), stopped
    assert any(busy > 0 for busy in busy_at_scale_in), f"no slow job ran during the scale-in: {busy_at_scale_in}"
    final = local_fleet.wait_for(fleet.client, jids, timeout=240, echo=False)
    assert final.done == 2000, f"lost jobs: {final.line()}"
    assert final.run_twice == 0
    assert final.queued == 0
    assert final.retries == 0
