"""End to end on inventories/local: real podman systemd hosts, real Redis, real Sidekiq 6.4.1 and the demo app.

The hosts are created fresh by scripts/testhosts.sh, deployed with playbooks/site.yml, and every job is checked by
its job id in the demo app's demo:done set and demo:runs counters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import local_fleet

pytestmark = pytest.mark.hosts

LOCAL_SIDEKIQ_VARS = ROOT / "inventories" / "local" / "group_vars" / "all" / "sidekiq.yml"
ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(ROOT / "tests" / "hosts" / "containers.conf"),
    "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
    "ANSIBLE_NOCOLOR": "1",
    "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
}


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout[-6000:]}\n{completed.stderr}"
    return completed


def deploy(*extra: str) -> str:
    return run(["ansible-playbook", "-i", "inventories/local", "playbooks/site.yml", *extra]).stdout


def changed_counts(output: str) -> dict[str, int]:
    return {host: int(count) for host, count in re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.M)}


def unit_pids(host: str, pool: str) -> dict[str, str]:
    output = run(["podman", "exec", host, "systemctl", "show", "--property=Id,MainPID", f"sidekiq-{pool}@*"]).stdout
    pids: dict[str, str] = {}
    unit = ""
    for line in output.splitlines():
        if line.startswith("MainPID="):
            pids[unit] = line.split("=", 1)[1]
        elif line.startswith("Id="):
            unit = line.split("=", 1)[1]
    return pids


@pytest.fixture(scope="module")
def fleet() -> Iterator[redis.Redis]:
    run(["scripts/testhosts.sh", "up"], timeout=600)
    deploy()
    client = redis.Redis.from_url(local_fleet.local_redis_url())
    yield client
    client.close()
    run(["scripts/testhosts.sh", "down"])


def test_thousand_jobs_all_run_once(fleet: redis.Redis) -> None:
    jids = local_fleet.enqueue(local_fleet.local_redis_url(), fast=900, slow=100, slow_seconds=0.2)
    assert len(set(jids)) == 1000

    final = local_fleet.wait_for(fleet, jids, timeout=300, echo=False)

    assert final.done == 1000
    assert final.run_twice == 0
    assert final.queued == 0
    assert final.retries == 0


def test_second_deploy_changes_nothing(fleet: redis.Redis) -> None:
    output = deploy()

    assert changed_counts(output) == {"sko-redis": 0, "sko-worker1": 0, "sko-worker2": 0}


def test_redeploy_during_slow_jobs_loses_none(fleet: redis.Redis, tmp_path: Path) -> None:
    """Change the bulk pool's concurrency while 200 slow jobs run: the rolling restart must drop none of them."""
    pools = yaml.safe_load(LOCAL_SIDEKIQ_VARS.read_text())["sidekiq_pools"]
    bulk = next(pool for pool in pools if pool["name"] == "bulk")
    bulk["concurrency"] += 3
    extra_vars = tmp_path / "pools.yml"
    extra_vars.write_text(yaml.safe_dump({"sidekiq_pools": pools}))
    pids_before = {host: unit_pids(host, "bulk") for host in ("sko-worker1", "sko-worker2")}

    jids = local_fleet.enqueue(local_fleet.local_redis_url(), fast=0, slow=200, slow_seconds=2)
    # Deploy once the slow jobs are running, so every restart has to quiet a busy process.
    deadline = time.monotonic() + 60
    while local_fleet.progress(fleet, jids).busy == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert local_fleet.progress(fleet, jids).busy > 0

    watcher_samples: list[local_fleet.Progress] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            watcher_samples.append(local_fleet.progress(fleet, jids))
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = deploy("-e", f"@{extra_vars}")
    stop.set()
    watcher.join()

    final = local_fleet.wait_for(fleet, jids, timeout=300, echo=False)
    pids_after = {host: unit_pids(host, "bulk") for host in ("sko-worker1", "sko-worker2")}
    assert "Restart changed pools" in output
    assert pids_after != pids_before, "the bulk pool was not restarted"
    assert final.done == 200, f"lost jobs: {final.line()}"
    assert final.run_twice == 0
    assert final.queued == 0
    assert final.busy == 0
    assert final.retries == 0
    assert any(sample.busy > 0 for sample in watcher_samples), "no job was running during the redeploy"
    concurrencies = {
        process["concurrency"] for process in local_fleet.status(fleet)["processes"] if process["tag"] == "bulk"
    }
    assert concurrencies == {bulk["concurrency"]}
