"""sidekiq_ops.fleet.autoscale with backend kubernetes, aws_asg and aws_ecs, run by ansible-playbook.

No Kubernetes API server can run on these test machines, so the kubernetes tests use the local fake API server of
test_kubernetes_scaling.py, reached through the official kubernetes client as a cluster would be. The AWS tests use
a moto server on 127.0.0.1 (scaling_aws_support). Redis is a real redis-server on loopback, with Sidekiq 6.4
heartbeats and jobs written the way Sidekiq writes them, so the module reads them with the real read script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from scaling_aws_support import (  # type: ignore[import-not-found]
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    EcsScheduler,
    MotoServer,
    aws_environment,
    create_group,
    create_service,
    group_state,
    running_moto,
    task_protection_in_moto,
)
from sidekiq_fixtures import (  # type: ignore[import-not-found]
    ROOT,
    RedisServer,
    ruby_enqueue,
    ruby_eval,
    running_redis,
    sidekiq_launcher,
    wait_for,
)
from test_kubernetes_scaling import (  # type: ignore[import-not-found]
    DEPLOYMENT,
    NAMESPACE,
    TOKEN,
    Failure,
    FakeApiServer,
    make_handler,
)

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import leaving_key
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state

LOCK_KEY = "sidekiq-ops:autoscale:shop:lock"
STATE_KEY = "sidekiq-ops:autoscale:shop:state"
GROUP = "sidekiq-default"
CLUSTER = "shop-workers"
DEFAULT: dict[str, Any] = {
    "name": "default",
    "queues": ["default"],
    "concurrency": 10,
    "timeout": 25,
    "processes": {"min": 1, "max": 4},
    "autoscale": {"target_latency": 5, "scale_in_cooldown": 0, "scale_in_stabilization": 0},
}
# A second pool whose Deployment, group or service does not exist, so its backend fails.
MISSING: dict[str, Any] = dict(DEFAULT, name="missing", queues=["missing"])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    fake.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with running_moto() as server:
        yield server


def run_module(directory: Path, arguments: dict[str, Any], *options: str) -> dict[str, Any]:
    """Run one autoscale task on localhost with ansible-playbook and return its result."""
    directory.mkdir(parents=True, exist_ok=True)
    playbook = directory / f"playbook-{len(list(directory.glob('playbook-*.yml')))}.yml"
    task = {"name": "autoscale", "sidekiq_ops.fleet.autoscale": arguments, "ignore_errors": True}
    playbook.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))
    environment = {
        **os.environ,
        **aws_environment(directory),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
    }
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}", *options, str(playbook)],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(completed.stdout)
    (result,) = [task["hosts"]["localhost"] for play in report["plays"] for task in play["tasks"]]
    return dict(result)


def add_process(
    client: redis.Redis, host: str, *, busy: int = 0, quiet: bool = False, labels: tuple[str, ...] = (), pid: int = 1
) -> str:
    """Write a Sidekiq 6.4 heartbeat of a process of the default pool; return its identity."""
    identity = f"{host}:{pid}:0123456789ab"
    info = {
        "hostname": host,
        "pid": pid,
        "tag": "default",
        "concurrency": 10,
        "queues": ["default"],
        "labels": list(labels),
    }
    client.sadd("processes", identity)
    client.hset(
        identity,
        mapping={
            "info": json.dumps(info),
            "busy": busy,
            "beat": time.time(),
            "quiet": "true" if quiet else "false",
            "rss": 1000,
        },
    )
    return identity


def enqueue_backlog(client: redis.Redis, jobs: int = 200, age: float = 60.0) -> None:
    """Push jobs onto queue:default as Sidekiq's client does, the oldest enqueued `age` seconds ago."""
    enqueued_at = time.time() - age
    client.sadd("queues", "default")
    for number in range(jobs):
        job = {"class": "SlowJob", "args": [number], "queue": "default", "jid": f"{number:024x}"}
        job["enqueued_at"] = enqueued_at
        client.lpush("queue:default", json.dumps(job))


def sidekiq_ops_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.keys("sidekiq-ops:*"))


def stored_state(client: redis.Redis, pool: str) -> dict[str, Any]:
    raw = client.hget(STATE_KEY, f"pool:{pool}")
    assert raw is not None, f"no state stored for pool {pool}"
    return dict(json.loads(raw))


def signals(client: redis.Redis, identity: str) -> list[bytes]:
    return list(client.lrange(f"{identity}-signals", 0, -1))


# Kubernetes


def kubernetes_arguments(server: RedisServer, api: FakeApiServer, pools: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "backend": "kubernetes",
        "kubernetes_namespace": NAMESPACE,
        "host": api.url,
        "api_key": TOKEN,
        "request_timeout": 5,
        "pools": pools,
        "fleet": "shop",
        "redis_url": server.url,
    }


def test_kubernetes_backlog_scales_out(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, api_server: FakeApiServer
) -> None:
    api_server.add_running_pod(f"{DEPLOYMENT}-a")
    add_process(client, f"{DEPLOYMENT}-a", busy=10)
    enqueue_backlog(client)

    result = run_module(tmp_path, kubernetes_arguments(redis_server, api_server, [DEFAULT]), "--diff")

    assert result.get("failed") is not True, result
    assert result["changed"] is True
    assert result["actions_planned"] is False
    pool = result["pools"]["default"]
    assert pool["action"] == "scale_out", pool["reason"]
    assert (pool["current"], pool["target"]) == (1, 4)
    assert pool["signals"]["requested"] == 1
    assert pool["signals"]["longest_running"] == 0.0
    assert pool["backend_actions"] == [f"Scaled deployments/scale {NAMESPACE}/{DEPLOYMENT} from 1 to 4 replicas."]
    assert api_server.replicas == 4
    assert result["diff"] == {"before": "default: 1 processes\n", "after": "default: 4 processes\n"}
    assert result["log_lines"][0].startswith("autoscale shop/default scale_out 1 -> 4 (backlog 200, ")
    assert not client.exists(LOCK_KEY)
    assert stored_state(redis_server.client(), "default")["last_action"] == "scale_out"


def test_kubernetes_idle_scales_in_with_quiet(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, api_server: FakeApiServer
) -> None:
    api_server.add_running_pod(f"{DEPLOYMENT}-a")
    api_server.add_running_pod(f"{DEPLOYMENT}-b")
    busy = add_process(client, f"{DEPLOYMENT}-a", busy=1)
    idle = add_process(client, f"{DEPLOYMENT}-b")

    result = run_module(tmp_path, kubernetes_arguments(redis_server, api_server, [DEFAULT]))

    assert result.get("failed") is not True, result
    pool = result["pools"]["default"]
    assert pool["action"] == "scale_in", pool["reason"]
    assert pool["target"] == 1
    assert pool["backend"]["result"]["removals"] == [f"{DEPLOYMENT}-b"]
    assert signals(client, idle) == [b"TSTP"]
    assert signals(client, busy) == []
    assert list(api_server.pods) == [f"{DEPLOYMENT}-a"]
    state = stored_state(client, "default")
    assert state["last_action"] == "scale_in"
    assert state["last_action_at"] == result["now"]


def test_kubernetes_check_mode_changes_nothing(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, api_server: FakeApiServer
) -> None:
    api_server.add_running_pod(f"{DEPLOYMENT}-a")
    add_process(client, f"{DEPLOYMENT}-a", busy=10)
    enqueue_backlog(client)

    result = run_module(tmp_path, kubernetes_arguments(redis_server, api_server, [DEFAULT]), "--check", "--diff")

    assert result.get("failed") is not True, result
    assert result["changed"] is True
    assert result["pools"]["default"]["target"] == 4
    assert result["pools"]["default"]["backend_actions"] == []
    assert result["pools"]["default"]["backend"]["result"]["check_mode"] is True
    assert result["diff"]["after"] == "default: 4 processes\n"
    assert result["lock"]["value"] is None
    assert api_server.count("PATCH", ".") == 0
    assert api_server.replicas == 1
    assert sidekiq_ops_keys(client) == []


def test_kubernetes_lock_held_acts_on_nothing(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, api_server: FakeApiServer
) -> None:
    api_server.add_running_pod(f"{DEPLOYMENT}-a")
    add_process(client, f"{DEPLOYMENT}-a", busy=10)
    enqueue_backlog(client)
    client.set(LOCK_KEY, "0123 host=other since=2024-05-01T12:00:00Z", px=60_000)

    result = run_module(tmp_path, kubernetes_arguments(redis_server, api_server, [DEFAULT]))

    assert result.get("failed") is not True, result
    assert result["lock_held"] is True
    assert result["changed"] is False
    assert result["pools"] == {}
    assert "held by host=other since=2024-05-01T12:00:00Z" in result["msg"]
    assert api_server.requests == []
    assert not client.exists(STATE_KEY)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kubernetes_namespace": None}, "kubernetes_namespace is missing"),
        ({"request_timeout": 0}, "request_timeout must be a number of seconds above 0"),
        ({"pools_filter": ["nightly"]}, "pools_filter names unknown pools ['nightly']"),
    ],
    ids=["namespace", "request-timeout", "unknown-filter"],
)
def test_kubernetes_invalid_options_fail_first(
    tmp_path: Path,
    redis_server: RedisServer,
    client: redis.Redis,
    api_server: FakeApiServer,
    extra: dict[str, Any],
    message: str,
) -> None:
    arguments = {**kubernetes_arguments(redis_server, api_server, [DEFAULT]), **extra}

    result = run_module(tmp_path, {name: value for name, value in arguments.items() if value is not None})

    assert result["failed"] is True
    assert message in result["msg"]
    assert api_server.requests == []
    assert client.keys("*") == []


def test_kubernetes_api_error_spares_other_pool(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, api_server: FakeApiServer
) -> None:
    api_server.add_running_pod(f"{DEPLOYMENT}-a")
    add_process(client, f"{DEPLOYMENT}-a", busy=10)
    enqueue_backlog(client)
    api_server.failures.append(Failure("GET", "/deployments/sidekiq-missing/scale$", 403, "forbidden by RBAC"))

    result = run_module(tmp_path, kubernetes_arguments(redis_server, api_server, [MISSING, DEFAULT]))

    assert result["failed"] is True
    assert result["pools"]["missing"]["status"] == "failed"
    assert result["problems"] == [f"missing: {result['pools']['missing']['error']}"]
    assert "Not allowed to read deployments/scale shop/sidekiq-missing (403): forbidden by RBAC." in result["msg"]
    assert result["pools"]["default"]["action"] == "scale_out"
    assert api_server.replicas == 4
    assert not client.exists(LOCK_KEY)
    assert stored_state(client, "default")["last_action"] == "scale_out"
    assert client.hget(STATE_KEY, "pool:missing") is None


# AWS


@pytest.fixture
def clean_moto(moto: MotoServer) -> MotoServer:
    moto.reset()
    return moto


def aws_arguments(
    server: RedisServer, moto: MotoServer, backend: str, pools: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "backend": backend,
        "region": REGION,
        "endpoint_url": moto.url,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "aws_max_attempts": 2,
        "pools": pools,
        "fleet": "shop",
        "redis_url": server.url,
        **extra,
    }


def busy_group_with_backlog(client: redis.Redis, moto: MotoServer) -> None:
    """Create the group with one instance whose process has every thread busy, and a backlog behind it."""
    (instance,) = create_group(moto, GROUP, minimum=1, maximum=4, desired=1)
    add_process(client, "worker-1", busy=10, labels=(f"instance-id={instance}",))
    enqueue_backlog(client)


def test_asg_backlog_scales_out(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, clean_moto: MotoServer
) -> None:
    busy_group_with_backlog(client, clean_moto)

    result = run_module(tmp_path, aws_arguments(redis_server, clean_moto, "aws_asg", [DEFAULT]))

    assert result.get("failed") is not True, result
    pool = result["pools"]["default"]
    assert pool["action"] == "scale_out", pool["reason"]
    assert pool["target"] == 4
    assert pool["backend_actions"] == [f"Set the desired capacity of the Auto Scaling group '{GROUP}' to 4."]
    assert group_state(clean_moto, GROUP)["desired"] == 4
    assert result["changed"] is True


def test_asg_idle_quiets_then_terminates(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, clean_moto: MotoServer
) -> None:
    first, second = create_group(clean_moto, GROUP, minimum=1, maximum=4, desired=2)
    busy = add_process(client, "worker-1", busy=1, labels=(f"instance-id={first}",), pid=1)
    idle = add_process(client, "worker-2", labels=(f"instance-id={second}",), pid=2)
    arguments = aws_arguments(redis_server, clean_moto, "aws_asg", [DEFAULT])

    first_run = run_module(tmp_path, arguments)

    assert first_run.get("failed") is not True, first_run
    assert first_run["pools"]["default"]["action"] == "scale_in", first_run["pools"]["default"]["reason"]
    assert signals(client, idle) == [b"TSTP"]
    assert signals(client, busy) == []
    assert list(client.hgetall(leaving_key("aws_asg", GROUP))) == [second.encode()]
    assert group_state(clean_moto, GROUP)["instances"][second]["protected"] is True
    assert group_state(clean_moto, GROUP)["desired"] == 2

    # Sidekiq acts on TSTP at its next heartbeat: the process reports quiet with no busy thread.
    client.hset(idle, mapping={"quiet": "true", "beat": time.time()})
    second_run = run_module(tmp_path, arguments)

    assert second_run.get("failed") is not True, second_run
    assert f"Terminated {second}, lowering the desired capacity." in second_run["pools"]["default"]["backend_actions"]
    state = group_state(clean_moto, GROUP)
    assert state["desired"] == 1
    assert list(state["instances"]) == [first]
    assert client.hgetall(leaving_key("aws_asg", GROUP)) == {}


def test_asg_check_mode_changes_nothing(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, clean_moto: MotoServer
) -> None:
    first, second = create_group(clean_moto, GROUP, minimum=1, maximum=4, desired=2)
    add_process(client, "worker-1", busy=1, labels=(f"instance-id={first}",), pid=1)
    idle = add_process(client, "worker-2", labels=(f"instance-id={second}",), pid=2)

    result = run_module(tmp_path, aws_arguments(redis_server, clean_moto, "aws_asg", [DEFAULT]), "--check")

    assert result.get("failed") is not True, result
    plan = result["pools"]["default"]["backend"]["plan"]
    assert plan["leave"] == [second]
    assert plan["quiet"] == {second: [idle]}
    assert result["pools"]["default"]["backend_actions"] == []
    assert signals(client, idle) == []
    assert sidekiq_ops_keys(client) == []
    assert group_state(clean_moto, GROUP)["instances"][second]["protected"] is False


def test_ecs_scales_out_despite_missing_pool(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, clean_moto: MotoServer
) -> None:
    with task_protection_in_moto():
        service = create_service(clean_moto, CLUSTER, "sidekiq-default", stop_timeout=40, desired=1)
        scheduler = EcsScheduler(service)
        scheduler.converge()
        (task,) = service.running_tasks()
        add_process(client, "worker-1", busy=10, labels=(f"task-id={task.rsplit('/', 1)[-1]}",))
        enqueue_backlog(client)
        targets = {"default": {"cluster": CLUSTER}, "missing": {"cluster": CLUSTER}}

        result = run_module(
            tmp_path, aws_arguments(redis_server, clean_moto, "aws_ecs", [DEFAULT, MISSING], aws_targets=targets)
        )

    assert result["failed"] is True
    assert result["pools"]["missing"]["status"] == "failed"
    assert "ECS service 'sidekiq-missing' in cluster 'shop-workers'" in result["pools"]["missing"]["error"]
    assert result["problems"][0].startswith("missing: ")
    assert result["pools"]["default"]["action"] == "scale_out"
    assert service.desired_count() == 4
    assert not client.exists(LOCK_KEY)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ({}, "aws_targets.default.cluster is missing"),
        ({"nightly": {"cluster": CLUSTER}}, "aws_targets names unknown pools ['nightly']"),
        ({"default": {"cluster": CLUSTER, "replicas": 2}}, "aws_targets.default has unknown keys ['replicas']"),
    ],
    ids=["cluster", "unknown-pool", "unknown-key"],
)
def test_ecs_invalid_targets_fail_first(
    tmp_path: Path,
    redis_server: RedisServer,
    client: redis.Redis,
    clean_moto: MotoServer,
    targets: dict[str, Any],
    message: str,
) -> None:
    result = run_module(tmp_path, aws_arguments(redis_server, clean_moto, "aws_ecs", [DEFAULT], aws_targets=targets))

    assert result["failed"] is True
    assert message in result["msg"]
    assert result["msg"].startswith("Invalid autoscale settings; nothing was changed: ")
    assert client.keys("*") == []


# The reader's data behind the upcoming and longest_running signals


def test_reader_counts_upcoming_jobs(redis_server: RedisServer, client: redis.Redis) -> None:
    now = time.time()
    for number, delay in enumerate((10, 30, 59, 120)):
        job = {"class": "SlowJob", "args": [number], "queue": "default", "jid": f"s{number:023x}"}
        client.zadd("schedule", {json.dumps(job): now + delay})
    retry = {"class": "SlowJob", "args": [], "queue": "low", "jid": "r" * 24, "retry_count": 1}
    client.zadd("retry", {json.dumps(retry): now + 20})

    state = read_state(client, pools=[DEFAULT, dict(MISSING, queues=["low"])])

    assert state.scheduled.upcoming == 3
    assert state.scheduled.upcoming_by_queue == {"default": 3}
    assert state.retries.upcoming_by_queue == {"low": 1}
    assert state.pools["default"].upcoming == 3
    assert state.pools["missing"].upcoming == 1
    assert state.pools["default"].backlog == 0


def test_reader_ages_real_sidekiq_job(tmp_path: Path, redis_server: RedisServer, client: redis.Redis) -> None:
    with sidekiq_launcher(tmp_path / "sidekiq") as launch:
        worker = launch(redis_server.url, ("slow",), concurrency=2, timeout=5, tag="default")
        identity = worker.identity(client)
        ruby_enqueue(redis_server.url, "--slow", "1", "--slow-seconds", "30")
        wait_for(lambda: client.hlen(f"{identity}:workers") == 1, timeout=30, description="the slow job to run")
        time.sleep(2)

        state = read_state(client, pools=[dict(DEFAULT, queues=["slow"])])

    (process,) = state.live_processes
    assert list(process.oldest_run_at_by_queue) == ["slow"]
    assert process.unknown_run_at_by_queue == {}
    age = state.pools["default"].longest_running
    assert age is not None
    assert 1.0 <= age <= 30.0


def test_asg_scales_out_from_real_sidekiq_backlog(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, clean_moto: MotoServer
) -> None:
    """A real Sidekiq 6.4.1 process with every thread busy and a queue behind it makes the group grow."""
    create_group(clean_moto, GROUP, minimum=1, maximum=4, desired=1)
    pool = dict(DEFAULT, queues=["slow"])
    with sidekiq_launcher(tmp_path / "sidekiq") as launch:
        worker = launch(redis_server.url, ("slow",), concurrency=2, timeout=5, tag="default")
        identity = worker.identity(client)
        ruby_enqueue(redis_server.url, "--slow", "12", "--slow-seconds", "30")
        wait_for(lambda: client.hlen(f"{identity}:workers") == 2, timeout=30, description="both threads to be busy")
        time.sleep(6)
        sidekiq_view = ruby_eval(
            redis_server.url, 'puts [Sidekiq::Workers.new.size, Sidekiq::Queue.new("slow").size].join(" ")'
        )

        result = run_module(tmp_path, aws_arguments(redis_server, clean_moto, "aws_asg", [pool]))

    assert result.get("failed") is not True, result
    decided = result["pools"]["default"]
    busy, queued = (int(value) for value in sidekiq_view.split())
    assert decided["signals"]["busy"] == busy
    assert decided["signals"]["backlog"] == queued
    assert queued == 10
    assert decided["signals"]["latency"] >= 5.0
    assert decided["action"] == "scale_out", decided["reason"]
    assert group_state(clean_moto, GROUP)["desired"] == decided["target"]
    assert decided["target"] > 1


def test_asg_never_reads_fixed_pool(
    tmp_path: Path, redis_server: RedisServer, client: redis.Redis, clean_moto: MotoServer
) -> None:
    """A fixed-size pool with no Auto Scaling group and no aws_targets entry is reported, not failed."""
    busy_group_with_backlog(client, clean_moto)
    fixed = dict(MISSING, name="fixed", processes={"min": 2, "max": 2})

    result = run_module(tmp_path, aws_arguments(redis_server, clean_moto, "aws_asg", [DEFAULT, fixed]))

    assert result.get("failed") is not True, result
    assert result["pools"]["default"]["action"] == "scale_out"
    assert result["pools"]["fixed"]["status"] == "hold"
    assert "fixed size of 2" in result["pools"]["fixed"]["reason"]
    assert any(
        line.startswith("autoscale shop/fixed not scaled: The pool has a fixed size") for line in result["log_lines"]
    )
    assert result["problems"] == []
