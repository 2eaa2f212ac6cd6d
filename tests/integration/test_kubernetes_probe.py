"""The pod health probe (roles/sidekiq_kubernetes/files/probe.rb) and the preStop hook against the real Sidekiq 6.4.1.

The probe runs as the kubelet runs it: `ruby probe.rb ready|live` with REDIS_URL and the maximum beat ages in the
environment. Inside a pod the hostname is the pod's name. Here Sidekiq and the probe both see this machine's
hostname, so the probe finds the heartbeats of the Sidekiq processes these tests start. The preStop test runs
Sidekiq as PID 1 of its own PID namespace, as the container's exec-form command runs it; unshare --pid needs root,
which the test machines and CI have.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from sidekiq_fixtures import (  # type: ignore[import-not-found]
    DEMO_APP,
    RedisServer,
    SidekiqWorker,
    free_port,
    running_redis,
    sidekiq_launcher,
    wait_for,
)

pytestmark = pytest.mark.sidekiq

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "roles" / "sidekiq_kubernetes" / "files" / "probe.rb"
TEMPLATE = ROOT / "roles" / "sidekiq_kubernetes" / "templates" / "deployment.yaml.j2"
HOSTNAME = socket.gethostname()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def sidekiq_workers(tmp_path: Path) -> Iterator[Callable[..., SidekiqWorker]]:
    with sidekiq_launcher(tmp_path / "sidekiq") as start:
        yield start


def probe(mode: str, redis_url: str, ready_age: int = 30, live_age: int = 60) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SIDEKIQ_PROBE_READY_MAX_AGE": str(ready_age),
        "SIDEKIQ_PROBE_LIVE_MAX_AGE": str(live_age),
    }
    return subprocess.run(
        ["ruby", str(PROBE), mode], env=environment, capture_output=True, text=True, timeout=30, check=False
    )


def write_heartbeat(server: RedisServer, pid: int, seconds_ago: float) -> str:
    """Write the heartbeat hash of a Sidekiq 6.4 process on this host whose last beat was `seconds_ago`."""
    client = server.client()
    identity = f"{HOSTNAME}:{pid}:abcdef012345"
    info = {"hostname": HOSTNAME, "pid": pid, "tag": "default", "concurrency": 5, "queues": ["default"]}
    client.sadd("processes", identity)
    client.hset(identity, mapping={"info": json.dumps(info), "busy": 0, "beat": time.time() - seconds_ago})
    return identity


def test_probe_passes_for_running_sidekiq(
    redis_server: RedisServer, sidekiq_workers: Callable[..., SidekiqWorker]
) -> None:
    worker = sidekiq_workers(redis_server.url, queues=("default",))
    worker.identity(redis_server.client())

    ready = probe("ready", redis_server.url)
    live = probe("live", redis_server.url)

    assert ready.returncode == 0, ready.stderr
    assert live.returncode == 0, live.stderr


def test_probe_fails_without_heartbeat(redis_server: RedisServer) -> None:
    ready = probe("ready", redis_server.url)
    live = probe("live", redis_server.url)

    assert ready.returncode == 1
    assert live.returncode == 1
    assert f"no Sidekiq heartbeat for host {HOSTNAME}" in ready.stderr


def test_probe_ignores_other_hosts(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.sadd("processes", "sidekiq-other-pod:1:abc")
    client.hset("sidekiq-other-pod:1:abc", mapping={"beat": time.time()})

    assert probe("ready", redis_server.url).returncode == 1


def test_probe_ages_separate_ready_from_live(redis_server: RedisServer) -> None:
    write_heartbeat(redis_server, pid=4242, seconds_ago=45)

    ready = probe("ready", redis_server.url, ready_age=30, live_age=60)
    live = probe("live", redis_server.url, ready_age=30, live_age=60)

    assert ready.returncode == 1
    assert "more than 30.0 s" in ready.stderr
    assert live.returncode == 0, live.stderr


def test_probe_uses_freshest_beat(redis_server: RedisServer) -> None:
    write_heartbeat(redis_server, pid=1, seconds_ago=300)
    write_heartbeat(redis_server, pid=2, seconds_ago=1)

    assert probe("ready", redis_server.url).returncode == 0
    assert probe("live", redis_server.url).returncode == 0


def test_probe_stale_heartbeat_fails_live(redis_server: RedisServer) -> None:
    write_heartbeat(redis_server, pid=4242, seconds_ago=90)

    live = probe("live", redis_server.url, live_age=60)

    assert live.returncode == 1
    assert "more than 60.0 s" in live.stderr


def test_probe_without_redis_keeps_pod_alive() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    ready = probe("ready", url)
    live = probe("live", url)

    assert ready.returncode == 1
    assert "Redis cannot be reached" in ready.stderr
    assert live.returncode == 0, live.stderr


def test_probe_rejects_unknown_mode(redis_server: RedisServer) -> None:
    result = probe("healthy", redis_server.url)

    assert result.returncode == 2
    assert "usage" in result.stderr


def pre_stop_command() -> list[str]:
    """Return the preStop command of the Deployment template, as the kubelet runs it."""
    text = TEMPLATE.read_text()
    start = text.index("'preStop': {'exec': {'command': ")
    literal = text[start:].split("'command': ", 1)[1].split("}}", 1)[0]
    command = yaml.safe_load(literal)
    assert isinstance(command, list)
    return [str(part) for part in command]


def child_pid(parent: int) -> int | None:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    text = children.read_text().split() if children.exists() else []
    return int(text[0]) if text else None


def test_pre_stop_quiets_sidekiq_as_pid_one(redis_server: RedisServer, tmp_path: Path) -> None:
    config = tmp_path / "sidekiq.yml"
    config.write_text(":concurrency: 2\n:timeout: 2\n:queues:\n  - default\n")
    log = (tmp_path / "sidekiq.log").open("wb")
    namespace = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sidekiq", "-r", "./app.rb", "-C", str(config)],
        cwd=DEMO_APP,
        env={**os.environ, "REDIS_URL": redis_server.url},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = redis_server.client()
    sidekiq = None
    try:
        sidekiq = wait_for(lambda: child_pid(namespace.pid), timeout=10, description="sidekiq inside the namespace")
        identity = wait_for(
            lambda: next((m.decode() for m in client.smembers("processes") if m.decode().split(":")[1] == "1"), None),
            timeout=30,
            description="the heartbeat of sidekiq as PID 1",
        )
        assert client.hget(identity, "quiet") == b"false"

        subprocess.run(["nsenter", "--target", str(sidekiq), "--pid", "--mount", *pre_stop_command()], check=True)

        wait_for(lambda: client.hget(identity, "quiet") == b"true", timeout=15, description="Sidekiq to turn quiet")
        assert namespace.poll() is None
    finally:
        if sidekiq is not None and namespace.poll() is None:
            os.kill(sidekiq, signal.SIGTERM)
        try:
            namespace.wait(timeout=20)
        except subprocess.TimeoutExpired:
            namespace.kill()
            namespace.wait(timeout=10)
        log.close()
