"""The aws_ecs backend against a moto server and a real redis-server, then end to end with real Sidekiq.

moto 5.2.5 lacks task protection and never starts or stops a service's tasks; the test doubles for both are in
scaling_aws_support (`task_protection_in_moto`, `EcsScheduler`). Everything else is moto's own ECS, driven
through boto3.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from scaling_aws_support import (  # type: ignore[import-not-found]
    EcsScheduler,
    EcsService,
    LabelledWorker,
    MotoServer,
    create_service,
    labelled_sidekiq,
    policy_signals,
    pool_processes,
    running_moto,
    synthetic_process,
    task_protection_in_moto,
)
from sidekiq_fixtures import RedisServer, ruby_enqueue, running_redis, wait_for  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import (
    HOLD,
    SCALE_IN,
    SCALE_OUT,
    decide,
    settings_from_pool,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws import (
    AwsAccessDeniedError,
    AwsNotFoundError,
    AwsRequestError,
    EcsBackend,
    StopBudgetError,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import leaving_key
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state

CLUSTER = "shop"
SERVICE = "sidekiq-default"
LEAVING_KEY = leaving_key("aws_ecs", f"{CLUSTER}/{SERVICE}")
POOL: dict[str, Any] = {
    "name": "default",
    "queues": ["default"],
    "concurrency": 2,
    "timeout": 2,
    "processes": {"min": 1, "max": 3},
    "autoscale": {"target_latency": 2, "scale_in_stabilization": 0, "scale_in_cooldown": 0},
}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with task_protection_in_moto(), running_moto() as server:
        yield server


@pytest.fixture(autouse=True)
def clean_moto(moto: MotoServer) -> None:
    moto.reset()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


def backend(moto: MotoServer, pool: dict[str, Any] | None = None, **settings: Any) -> EcsBackend:
    return EcsBackend(moto.settings(**settings), CLUSTER, SERVICE, pool or POOL, margin=10, protection_minutes=10)


def service_with_tasks(moto: MotoServer, count: int, stop_timeout: int | None = 30) -> tuple[EcsService, list[str]]:
    service = create_service(moto, CLUSTER, SERVICE, stop_timeout=stop_timeout, desired=count)
    return service, service.start_tasks(count)


def task_label(arn: str) -> str:
    return f"task-id={arn.rsplit('/', 1)[-1]}"


def leaving(client: redis.Redis) -> dict[str, dict[str, Any]]:
    return {key.decode(): json.loads(value) for key, value in client.hgetall(LEAVING_KEY).items()}


# Stop budget and missing resources


def test_stop_budget_above_fargate_cap(moto: MotoServer, client: redis.Redis) -> None:
    service, _ = service_with_tasks(moto, 1, stop_timeout=120)

    with pytest.raises(StopBudgetError) as raised:
        backend(moto, pool={**POOL, "timeout": 115}).read([], client)

    text = str(raised.value)
    assert "Pool 'default': the stop budget of 125 s (timeout 115 s + shutdown margin 10 s)" in text
    assert "lower the pool's timeout to at most 110 s".lower() in text.lower()
    assert service.desired_count() == 1


def test_stop_timeout_below_budget(moto: MotoServer, client: redis.Redis) -> None:
    service_with_tasks(moto, 1, stop_timeout=None)

    with pytest.raises(StopBudgetError) as raised:
        backend(moto, pool={**POOL, "timeout": 25}).read([], client)

    text = str(raised.value)
    assert "container 'sidekiq' of task definition arn:aws:ecs:us-east-1:123456789012:task-definition/" in text
    assert "stopTimeout 30 s (not set, so ECS uses its default), below the stop budget of 35 s" in text
    assert "Set stopTimeout to at least 35" in text


def test_missing_cluster_and_service(moto: MotoServer, client: redis.Redis) -> None:
    with pytest.raises(AwsNotFoundError, match="ECS service 'sidekiq-default' in cluster 'shop' was not found"):
        backend(moto).read([], client)

    moto.client("ecs").create_cluster(clusterName=CLUSTER)
    with pytest.raises(AwsNotFoundError, match=r"was not found in region us-east-1 .*\(MISSING\)"):
        backend(moto).read([], client)


# Scaling


def test_scale_out_raises_count(moto: MotoServer, client: redis.Redis) -> None:
    service, (task,) = service_with_tasks(moto, 1)
    scaler = backend(moto)

    reading = scaler.read([synthetic_process(task_label(task))], client)
    plan = scaler.plan(reading, 3)
    scaler.apply(plan, client)
    started, stopped = EcsScheduler(service).converge()

    assert reading.steady
    assert reading.requested_processes == 1
    assert any("covers the stop budget of 12 s" in note for note in reading.notes)
    assert service.desired_count() == 3
    assert len(started) == 2
    assert stopped == []


def test_scale_in_removes_exactly_drained(moto: MotoServer, client: redis.Redis) -> None:
    service, tasks = service_with_tasks(moto, 4)
    scaler = backend(moto)
    busy = synthetic_process(task_label(tasks[0]), busy=2, pid=1)
    idle = {arn: synthetic_process(task_label(arn), pid=index + 2) for index, arn in enumerate(tasks[1:])}

    first = scaler.plan(scaler.read([busy, *idle.values()], client), 2)
    scaler.apply(first, client)

    leavers = sorted(first.leave)
    (idle_keeper,) = sorted(set(tasks[1:]) - set(leavers))
    protection = service.protection()
    assert len(leavers) == 2
    assert service.desired_count() == 4
    assert {arn: protection[arn] for arn in tasks} == {
        tasks[0]: True,
        idle_keeper: False,
        leavers[0]: True,
        leavers[1]: True,
    }
    assert sorted(leaving(client)) == leavers
    for arn in leavers:
        assert client.lrange(f"{idle[arn].identity}-signals", 0, -1) == [b"TSTP"]

    drained = [synthetic_process(task_label(arn), quiet=True, pid=9 + index) for index, arn in enumerate(leavers)]
    keepers = [synthetic_process(task_label(tasks[0]), busy=1, pid=1), idle[idle_keeper]]
    reading = scaler.read(keepers + drained, client)
    second = scaler.plan(reading, 2)
    scaler.apply(second, client)

    protection = service.protection()
    assert reading.requested_processes == 2
    assert second.protect == (idle_keeper,)
    assert sorted(second.unprotect) == leavers
    assert service.desired_count() == 2
    assert protection[tasks[0]] is True
    assert protection[idle_keeper] is True
    assert [protection[arn] for arn in leavers] == [False, False]
    assert all(entry["removed"] for entry in leaving(client).values())

    _, stopped = EcsScheduler(service).converge()
    assert sorted(stopped) == leavers

    third = scaler.plan(scaler.read(keepers, client), 2)
    scaler.apply(third, client)
    assert sorted(third.forget) == leavers
    assert leaving(client) == {}
    assert service.desired_count() == 2


def test_unsteady_service_unprotects_drained(moto: MotoServer, client: redis.Redis) -> None:
    service, tasks = service_with_tasks(moto, 2)
    scaler = backend(moto)
    running = [synthetic_process(task_label(tasks[0]), pid=1), synthetic_process(task_label(tasks[1]), busy=1, pid=2)]
    scaler.apply(scaler.plan(scaler.read(running, client), 1), client)
    assert service.protection() == {tasks[0]: True, tasks[1]: True}
    moto.client("ecs").update_service(cluster=CLUSTER, service=SERVICE, desiredCount=3)

    drained = synthetic_process(task_label(tasks[0]), quiet=True, pid=1)
    reading = scaler.read([drained, running[1]], client)
    plan = scaler.plan(reading, 1)
    result = scaler.apply(plan, client)

    assert not reading.steady
    assert reading.unsteady_reason == "the service runs 2 tasks for a desired count of 3."
    assert plan.remove == ()
    assert plan.protect == ()
    assert plan.unprotect == (tasks[0],)
    assert result.actions == (f"Removed scale-in protection from {tasks[0]}.",)
    assert service.desired_count() == 3
    assert service.protection() == {tasks[0]: False, tasks[1]: True}
    assert sorted(leaving(client)) == [tasks[0]]

    # ECS replaces the unprotected drained task, as a deployment does, and the next run deletes its record.
    service.ecs.stop_task(cluster=CLUSTER, task=tasks[0], reason="Deployment")
    (replacement,) = service.start_tasks(1)
    fresh = synthetic_process(task_label(replacement), pid=3)
    after = scaler.plan(scaler.read([running[1], fresh], client), 2)
    scaler.apply(after, client)

    assert after.forget == (tasks[0],)
    assert leaving(client) == {}


def test_protection_failure_keeps_count(moto: MotoServer, client: redis.Redis) -> None:
    service, tasks = service_with_tasks(moto, 3)
    scaler = backend(moto)
    running = [
        synthetic_process(task_label(arn), busy=int(index == 0), pid=index + 1) for index, arn in enumerate(tasks)
    ]
    first = scaler.plan(scaler.read(running, client), 2)
    scaler.apply(first, client)
    (leaver,) = first.leave
    keepers = [process for arn, process in zip(tasks, running, strict=True) if arn != leaver]

    quiet = synthetic_process(task_label(leaver), quiet=True, pid=9)
    plan = scaler.plan(scaler.read([*keepers, quiet], client), 2)
    assert plan.set_capacity
    (stopped_keeper,) = plan.protect
    service.ecs.stop_task(cluster=CLUSTER, task=stopped_keeper, reason="Essential container exited")

    with pytest.raises(AwsRequestError) as raised:
        scaler.apply(plan, client)

    assert f"ECS could not protect tasks of ECS service 'sidekiq-default' in cluster 'shop': {stopped_keeper}" in str(
        raised.value
    )
    assert "The desired count was not changed" in str(raised.value)
    assert service.desired_count() == 3


def test_access_denied_on_update_service(moto: MotoServer, client: redis.Redis) -> None:
    service, (task,) = service_with_tasks(moto, 1)
    iam = moto.client("iam")
    iam.create_user(UserName="autoscaler")
    document = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["ecs:Describe*", "ecs:List*", "ecs:Get*"], "Resource": "*"}],
    }
    iam.put_user_policy(UserName="autoscaler", PolicyName="read-only", PolicyDocument=json.dumps(document))
    key = iam.create_access_key(UserName="autoscaler")["AccessKey"]

    with moto.iam_enforced():
        scaler = backend(moto, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
        reading = scaler.read([synthetic_process(task_label(task))], client)
        with pytest.raises(AwsAccessDeniedError) as raised:
            scaler.apply(scaler.plan(reading, 2), client)

    text = str(raised.value)
    assert "AWS denied ecs:UpdateService on ECS service 'sidekiq-default' in cluster 'shop'" in text
    assert "ecs:UpdateTaskProtection" in text
    assert service.desired_count() == 1


# Real Sidekiq


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., LabelledWorker]]:
    with labelled_sidekiq(tmp_path / "sidekiq") as start:
        yield start


def read_pool(client: redis.Redis) -> Any:
    return read_state(client, pools=[POOL])


@pytest.mark.sidekiq
def test_policy_drives_service(
    moto: MotoServer, redis_server: RedisServer, client: redis.Redis, workers: Callable[..., LabelledWorker]
) -> None:
    settings = settings_from_pool(POOL)
    service, (first,) = service_with_tasks(moto, 1)
    scheduler = EcsScheduler(service)
    workers(redis_server.url, tag="default", labels=(task_label(first),)).identity(client)
    scaler = backend(moto)

    def run(previous: Any = None) -> tuple[Any, Any, Any]:
        state = read_pool(client)
        own = pool_processes(state, "default")
        reading = scaler.read(own, client, now=state.now)
        decision = decide(policy_signals(state, "default", own, reading.requested_processes), settings, previous)
        plan = scaler.plan(reading, decision.desired)
        scaler.apply(plan, client)
        return reading, decision, plan

    # Scale-out: 16 jobs of 1 s wait for one process of 2 threads; ECS starts the new tasks.
    ruby_enqueue(redis_server.url, "--slow", "16", "--slow-seconds", "1", "--slow-queue", "default")
    _, decision, _ = run()
    started, _ = scheduler.converge()

    assert decision.action == SCALE_OUT
    assert decision.desired == 3
    assert service.desired_count() == 3
    assert len(started) == 2
    for arn in started:
        workers(redis_server.url, tag="default", labels=(task_label(arn),)).identity(client)
    wait_for(lambda: client.scard("demo:done") == 16, timeout=60, description="the 16 jobs done")

    # Scale-in: the queue is empty and one task runs a long job.
    ruby_enqueue(redis_server.url, "--slow", "1", "--slow-seconds", "15", "--slow-queue", "default")
    wait_for(lambda: read_pool(client).pools["default"].busy == 1, timeout=20, description="one busy thread")
    reading, decision, plan = run(decision.state)

    (busy_task,) = [view.member.id for view in reading.members if view.busy]
    leavers = sorted(set(service.running_tasks()) - {busy_task})
    assert decision.action == SCALE_IN
    assert decision.desired == 1
    assert sorted(plan.leave) == leavers
    assert service.desired_count() == 3
    assert service.protection() == {arn: True for arn in [busy_task, *leavers]}
    quieted = {process.identity for view in reading.members if view.member.id in leavers for process in view.processes}

    def leavers_quiet() -> bool:
        quiet = {process.identity for process in pool_processes(read_pool(client), "default") if process.quiet}
        return quieted <= quiet

    wait_for(leavers_quiet, timeout=20, description="the leavers quiet")

    # The next run lowers the count with only the drained tasks unprotected; ECS stops exactly those.
    reading, decision, plan = run(decision.state)
    protection = service.protection()
    _, stopped = scheduler.converge()

    assert reading.requested_processes == 1
    assert decision.action == HOLD
    assert service.desired_count() == 1
    assert protection == {busy_task: True, leavers[0]: False, leavers[1]: False}
    assert sorted(stopped) == leavers
    assert service.running_tasks() == [busy_task]

    reading, decision, plan = run(decision.state)
    assert sorted(plan.forget) == leavers
    assert leaving(client) == {}
    wait_for(lambda: client.scard("demo:done") == 17, timeout=30, description="the long job done")
    assert set(client.hvals("demo:runs")) == {b"1"}
