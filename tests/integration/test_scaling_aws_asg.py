"""The aws_asg backend against a moto server and a real redis-server, then end to end with real Sidekiq.

Groups, instances and protection live in moto and are read back through boto3; leaving records and quiet
signals live in the real Redis. The last two tests run real Sidekiq 6.4.1 processes from examples/demo-app,
labelled with their instance ids, and let the scaling policy decide from the state the reader returns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.endpoint
import pytest
import redis
from botocore.awsrequest import AWSResponse
from scaling_aws_support import (  # type: ignore[import-not-found]
    LabelledWorker,
    MotoServer,
    create_group,
    ec2_state,
    group_state,
    labelled_sidekiq,
    policy_signals,
    pool_processes,
    running_moto,
    synthetic_process,
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
    AsgBackend,
    AwsAccessDeniedError,
    AwsConfigurationError,
    AwsCredentialsError,
    AwsNotFoundError,
    AwsThrottlingError,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import leaving_key, protection_key
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state

GROUP = "sidekiq-default"
LEAVING_KEY = leaving_key("aws_asg", GROUP)
PROTECTION_KEY = protection_key("aws_asg", GROUP)
THROTTLING_BODY = (
    b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
    b"<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with running_moto() as server:
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


def backend(moto: MotoServer, pool: dict[str, Any] | None = None, **settings: Any) -> AsgBackend:
    return AsgBackend(moto.settings(**settings), GROUP, pool=pool, margin=10)


def leaving(client: redis.Redis) -> dict[str, dict[str, Any]]:
    return {key.decode(): json.loads(value) for key, value in client.hgetall(LEAVING_KEY).items()}


def signals_of(client: redis.Redis, identity: str) -> list[bytes]:
    return list(client.lrange(f"{identity}-signals", 0, -1))


# Scale-out and scale-in against moto


def test_scale_out_clamps_to_max(moto: MotoServer, client: redis.Redis) -> None:
    create_group(moto, GROUP, minimum=1, maximum=3, desired=1)
    scaler = backend(moto)

    reading = scaler.read([], client)
    plan = scaler.plan(reading, 5)
    result = scaler.apply(plan, client)

    state = group_state(moto, GROUP)
    assert reading.requested_processes == 1
    assert plan.capacity_after == 3
    assert any("above the maximum of 3" in note for note in plan.notes)
    assert result.actions == ("Set the desired capacity of the Auto Scaling group 'sidekiq-default' to 3.",)
    assert state["desired"] == 3
    assert len(state["instances"]) == 3


def test_scale_in_quiets_then_terminates(moto: MotoServer, client: redis.Redis) -> None:
    first, second, third = create_group(moto, GROUP, minimum=1, maximum=4, desired=3)
    scaler = backend(moto)
    busy = synthetic_process(f"instance-id={first}", busy=2, pid=1)
    idle = [synthetic_process(f"instance-id={second}", pid=2), synthetic_process(f"instance-id={third}", pid=3)]

    plan = scaler.plan(scaler.read([busy, *idle], client), 1)
    scaler.apply(plan, client)

    state = group_state(moto, GROUP)
    assert sorted(plan.leave) == sorted([second, third])
    assert state["desired"] == 3
    assert {instance: item["protected"] for instance, item in state["instances"].items()} == {
        first: True,
        second: True,
        third: True,
    }
    assert sorted(leaving(client)) == sorted([second, third])
    assert signals_of(client, idle[0].identity) == [b"TSTP"]
    assert signals_of(client, idle[1].identity) == [b"TSTP"]
    assert signals_of(client, busy.identity) == []
    assert 0 < client.ttl(f"{idle[0].identity}-signals") <= 60

    drained = [
        synthetic_process(f"instance-id={member}", quiet=True, pid=pid) for member, pid in ((second, 2), (third, 3))
    ]
    reading = scaler.read([synthetic_process(f"instance-id={first}", busy=1, pid=1), *drained], client)
    plan = scaler.plan(reading, 1)
    result = scaler.apply(plan, client)

    state = group_state(moto, GROUP)
    assert reading.requested_processes == 1
    assert sorted(plan.unprotect) == sorted([second, third])
    assert sorted(removal.member_id for removal in plan.remove) == sorted([second, third])
    assert state["desired"] == 1
    assert state["instances"] == {first: {"state": "InService", "protected": True}}
    assert ec2_state(moto, second) in ("shutting-down", "terminated")
    assert ec2_state(moto, third) in ("shutting-down", "terminated")
    assert leaving(client) == {}
    assert any(action.startswith(f"Terminated {second}") for action in result.actions)

    # The next run finds nothing leaving and takes off the protection that the scale-in put on the busy keeper.
    release = scaler.plan(scaler.read([synthetic_process(f"instance-id={first}", pid=1)], client), 1)
    scaler.apply(release, client)
    assert release.unprotect == (first,)
    assert group_state(moto, GROUP)["instances"][first]["protected"] is False
    assert client.hgetall(PROTECTION_KEY) == {}

    again = scaler.plan(scaler.read([synthetic_process(f"instance-id={first}", pid=1)], client), 1)
    assert not again.changed


def test_busy_leaver_stays_protected(moto: MotoServer, client: redis.Redis) -> None:
    first, second = create_group(moto, GROUP, minimum=1, maximum=4, desired=2)
    scaler = backend(moto)
    running = [
        synthetic_process(f"instance-id={first}", busy=1, pid=1),
        synthetic_process(f"instance-id={second}", pid=2),
    ]
    scaler.apply(scaler.plan(scaler.read(running, client), 1), client)
    assert group_state(moto, GROUP)["instances"][second]["protected"] is True

    still_busy = synthetic_process(f"instance-id={second}", busy=1, quiet=True, pid=2)
    plan = scaler.plan(scaler.read([synthetic_process(f"instance-id={first}", pid=1), still_busy], client), 1)
    result = scaler.apply(plan, client)

    state = group_state(moto, GROUP)
    assert plan.remove == ()
    assert result.actions == ()
    assert state["desired"] == 2
    assert state["instances"][second]["protected"] is True
    assert any(f"Waiting for {second} to finish 1 running jobs" in note for note in plan.notes)


def test_vanished_process_waits_for_budget(moto: MotoServer, client: redis.Redis) -> None:
    first, second = create_group(moto, GROUP, minimum=1, maximum=4, desired=2)
    scaler = backend(moto, pool={"name": "default", "timeout": 20})
    busy = synthetic_process(f"instance-id={first}", busy=2, pid=1)
    now = time.time()
    scaler.apply(
        scaler.plan(scaler.read([busy, synthetic_process(f"instance-id={second}", pid=2)], client, now=now), 1), client
    )
    assert sorted(leaving(client)) == [second]

    # The leaver's process is gone from the reading: stop budget 30 s + heartbeat expiry 60 s must pass first.
    for offset in (30, 60, 120):
        plan = scaler.plan(scaler.read([busy], client, now=now + offset), 1)
        scaler.apply(plan, client)
        state = group_state(moto, GROUP)
        assert plan.remove == ()
        assert state["desired"] == 2
        assert state["instances"][second]["protected"] is True
        assert leaving(client)[second]["gone_since"] == now + 30
        assert any(f"Waiting for {second}: its Sidekiq process has been missing" in note for note in plan.notes)

    plan = scaler.plan(scaler.read([busy], client, now=now + 121), 1)
    scaler.apply(plan, client)

    state = group_state(moto, GROUP)
    assert [removal.member_id for removal in plan.remove] == [second]
    assert state["desired"] == 1
    assert list(state["instances"]) == [first]
    assert ec2_state(moto, second) in ("shutting-down", "terminated")
    assert leaving(client) == {}


def test_release_spares_user_protection(moto: MotoServer, client: redis.Redis) -> None:
    first, second, third = create_group(moto, GROUP, minimum=1, maximum=4, desired=3)
    moto.client("autoscaling").set_instance_protection(
        AutoScalingGroupName=GROUP, InstanceIds=[third], ProtectedFromScaleIn=True
    )
    scaler = backend(moto)
    busy = [
        synthetic_process(f"instance-id={first}", busy=2, pid=1),
        synthetic_process(f"instance-id={third}", busy=1, pid=3),
    ]

    first_plan = scaler.plan(scaler.read([*busy, synthetic_process(f"instance-id={second}", pid=2)], client), 2)
    scaler.apply(first_plan, client)
    assert first_plan.leave == (second,)
    assert sorted(client.hgetall(PROTECTION_KEY)) == sorted([first.encode(), second.encode()])

    drained = synthetic_process(f"instance-id={second}", quiet=True, pid=2)
    scaler.apply(scaler.plan(scaler.read([*busy, drained], client), 2), client)
    assert list(client.hgetall(PROTECTION_KEY)) == [first.encode()]

    release = scaler.plan(scaler.read(busy, client), 2)
    result = scaler.apply(release, client)

    state = group_state(moto, GROUP)
    assert release.unprotect == (first,)
    assert result.actions == (f"Removed scale-in protection from {first}.",)
    assert state["instances"] == {
        first: {"state": "InService", "protected": False},
        third: {"state": "InService", "protected": True},
    }
    assert client.hgetall(PROTECTION_KEY) == {}


def test_check_mode_changes_nothing(moto: MotoServer, client: redis.Redis) -> None:
    first, second = create_group(moto, GROUP, minimum=1, maximum=4, desired=2)
    scaler = backend(moto)
    before = group_state(moto, GROUP)

    plan = scaler.plan(scaler.read([synthetic_process(f"instance-id={first}", pid=1)], client), 4)
    plan_in = scaler.plan(scaler.read([synthetic_process(f"instance-id={second}", pid=2)], client), 1)

    assert plan.changed
    assert plan_in.changed
    assert group_state(moto, GROUP) == before
    assert client.keys("*") == []


def test_weighted_group_rejected(moto: MotoServer, client: redis.Redis) -> None:
    ec2 = moto.client("ec2")
    ec2.create_launch_template(
        LaunchTemplateName="lt-weighted", LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"}
    )
    moto.client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        MinSize=0,
        MaxSize=4,
        DesiredCapacity=0,
        AvailabilityZones=["us-east-1a"],
        MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateName": "lt-weighted"},
                "Overrides": [
                    {"InstanceType": "t3.micro", "WeightedCapacity": "1"},
                    {"InstanceType": "t3.large", "WeightedCapacity": "2"},
                ],
            }
        },
    )

    with pytest.raises(AwsConfigurationError, match=r"weights \['1', '2'\]"):
        backend(moto).read([], client)


# Errors


def test_missing_group_not_found(moto: MotoServer, client: redis.Redis) -> None:
    with pytest.raises(AwsNotFoundError) as raised:
        backend(moto).read([], client)

    assert "Auto Scaling group 'sidekiq-default' was not found in region us-east-1" in str(raised.value)


def create_limited_user(moto: MotoServer, actions: list[str]) -> dict[str, str]:
    iam = moto.client("iam")
    iam.create_user(UserName="autoscaler")
    document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName="autoscaler", PolicyName="read-only", PolicyDocument=json.dumps(document))
    key = iam.create_access_key(UserName="autoscaler")["AccessKey"]
    return {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}


def test_access_denied_names_permission(moto: MotoServer, client: redis.Redis) -> None:
    create_group(moto, GROUP, minimum=1, maximum=3, desired=1)
    credentials = create_limited_user(moto, ["autoscaling:Describe*", "ec2:Describe*"])

    with moto.iam_enforced():
        scaler = backend(moto, **credentials)
        reading = scaler.read([], client)
        with pytest.raises(AwsAccessDeniedError) as raised:
            scaler.apply(scaler.plan(reading, 2), client)

    text = str(raised.value)
    assert "AWS denied autoscaling:SetDesiredCapacity on Auto Scaling group 'sidekiq-default'" in text
    assert "user/autoscaler is not authorized" in text
    assert "the aws_asg backend needs autoscaling:DescribeAutoScalingGroups" in text
    assert group_state(moto, GROUP)["desired"] == 1


def test_unknown_key_rejected(moto: MotoServer, client: redis.Redis) -> None:
    create_group(moto, GROUP, minimum=1, maximum=3, desired=1)

    with moto.iam_enforced(), pytest.raises(AwsCredentialsError) as raised:
        backend(moto, access_key="AKIAUNKNOWNKEY000000", secret_key="wrong").read([], client)

    assert "AWS rejected the credentials for autoscaling:DescribeAutoScalingGroups" in str(raised.value)
    assert "InvalidClientTokenId" in str(raised.value)


class Throttler:
    """A botocore before-send handler that returns a Throttling error for the first `count` attempts."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.attempt_headers: list[str] = []

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        self.attempt_headers.append(request.headers.get("amz-sdk-request", b"").decode())
        if len(self.attempt_headers) > self.count:
            return None
        return AWSResponse(request.url, 400, {"Content-Type": "text/xml"}, RawBody(THROTTLING_BODY))


class RawBody:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


class SleepRecorder:
    """Stands in for the time module inside botocore.endpoint: records each backoff instead of sleeping it."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)


def throttled_backend(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, count: int, attempts: int) -> Any:
    recorder = SleepRecorder()
    monkeypatch.setattr(botocore.endpoint, "time", recorder)
    scaler = backend(moto, max_attempts=attempts)
    throttler = Throttler(count)
    scaler.autoscaling.client.meta.events.register("before-send.auto-scaling.SetDesiredCapacity", throttler)
    return scaler, throttler, recorder


def test_throttling_exhausts_attempts(moto: MotoServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    create_group(moto, GROUP, minimum=1, maximum=3, desired=1)
    scaler, throttler, recorder = throttled_backend(moto, monkeypatch, count=99, attempts=4)

    with pytest.raises(AwsThrottlingError) as raised:
        scaler.apply(scaler.plan(scaler.read([], client), 2), client)

    text = str(raised.value)
    assert "AWS throttled autoscaling:SetDesiredCapacity on Auto Scaling group 'sidekiq-default'" in text
    assert "on all 4 attempts (retry mode standard)" in text
    assert [header.split(";")[0].strip() for header in throttler.attempt_headers] == [
        "attempt=1",
        "attempt=2",
        "attempt=3",
        "attempt=4",
    ]
    # Full-jitter exponential backoff: before attempt n+1 botocore waits rand() * 2^(n-1) seconds for throttling.
    assert len(recorder.delays) == 3
    for index, delay in enumerate(recorder.delays):
        assert 0 <= delay <= 2**index
    assert group_state(moto, GROUP)["desired"] == 1


def test_throttling_recovers(moto: MotoServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    create_group(moto, GROUP, minimum=1, maximum=3, desired=1)
    scaler, throttler, recorder = throttled_backend(moto, monkeypatch, count=2, attempts=3)

    scaler.apply(scaler.plan(scaler.read([], client), 2), client)

    assert len(throttler.attempt_headers) == 3
    assert len(recorder.delays) == 2
    assert group_state(moto, GROUP)["desired"] == 2


# Real Sidekiq


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., LabelledWorker]]:
    with labelled_sidekiq(tmp_path / "sidekiq") as start:
        yield start


POOL: dict[str, Any] = {
    "name": "default",
    "queues": ["default"],
    "concurrency": 2,
    "timeout": 2,
    "processes": {"min": 1, "max": 3},
    "autoscale": {"target_latency": 2, "scale_in_stabilization": 0, "scale_in_cooldown": 0},
}


def read_pool(client: redis.Redis) -> Any:
    return read_state(client, pools=[POOL])


def quiet_identities(client: redis.Redis) -> set[str]:
    return {process.identity for process in pool_processes(read_pool(client), "default") if process.quiet}


def drained_identities(client: redis.Redis) -> set[str]:
    """Return the processes whose latest heartbeat reports them quiet with no busy thread."""
    processes = pool_processes(read_pool(client), "default")
    return {process.identity for process in processes if process.quiet and process.busy == 0}


@pytest.mark.sidekiq
def test_real_busy_leaver_waits(
    moto: MotoServer, redis_server: RedisServer, client: redis.Redis, workers: Callable[..., LabelledWorker]
) -> None:
    first, second = create_group(moto, GROUP, minimum=1, maximum=2, desired=2)
    identities = {}
    for member in (first, second):
        worker = workers(redis_server.url, tag="default", labels=(f"instance-id={member}",), concurrency=1)
        identities[member] = worker.identity(client)
    ruby_enqueue(redis_server.url, "--slow", "2", "--slow-seconds", "25", "--slow-queue", "default")
    wait_for(lambda: read_pool(client).pools["default"].busy == 2, timeout=20, description="both workers busy")
    scaler = backend(moto)

    plan = scaler.plan(scaler.read(pool_processes(read_pool(client), "default"), client), 1)
    scaler.apply(plan, client)
    (chosen,) = plan.leave
    wait_for(lambda: identities[chosen] in quiet_identities(client), timeout=20, description="the leaver quiet")

    reading = scaler.read(pool_processes(read_pool(client), "default"), client)
    waiting = scaler.plan(reading, 1)
    scaler.apply(waiting, client)

    state = group_state(moto, GROUP)
    assert [view.busy for view in reading.members if view.member.id == chosen] == [1]
    assert waiting.remove == ()
    assert state["desired"] == 2
    assert state["instances"][chosen]["protected"] is True

    wait_for(lambda: client.scard("demo:done") == 2, timeout=40, description="both slow jobs done")
    wait_for(lambda: read_pool(client).pools["default"].busy == 0, timeout=15, description="an idle heartbeat")
    final = scaler.plan(scaler.read(pool_processes(read_pool(client), "default"), client), 1)
    scaler.apply(final, client)

    state = group_state(moto, GROUP)
    assert [removal.member_id for removal in final.remove] == [chosen]
    assert state["desired"] == 1
    assert list(state["instances"]) == [first if chosen == second else second]
    assert client.hlen("demo:runs") == 2
    assert set(client.hvals("demo:runs")) == {b"1"}


@pytest.mark.sidekiq
def test_policy_drives_group(
    moto: MotoServer, redis_server: RedisServer, client: redis.Redis, workers: Callable[..., LabelledWorker]
) -> None:
    settings = settings_from_pool(POOL)
    (first,) = create_group(moto, GROUP, minimum=1, maximum=3, desired=1)
    workers(redis_server.url, tag="default", labels=(f"instance-id={first}",)).identity(client)
    scaler = backend(moto)

    # Scale-out: 16 jobs of 1 s wait for one process of 2 threads.
    ruby_enqueue(redis_server.url, "--slow", "16", "--slow-seconds", "1", "--slow-queue", "default")
    state = read_pool(client)
    own = pool_processes(state, "default")
    reading = scaler.read(own, client, now=state.now)
    decision = decide(policy_signals(state, "default", own, reading.requested_processes), settings)
    scaler.apply(scaler.plan(reading, decision.desired), client)

    group = group_state(moto, GROUP)
    assert decision.action == SCALE_OUT
    assert decision.desired == 3
    assert group["desired"] == 3
    assert len(group["instances"]) == 3
    for member in sorted(set(group["instances"]) - {first}):
        workers(redis_server.url, tag="default", labels=(f"instance-id={member}",)).identity(client)
    wait_for(lambda: client.scard("demo:done") == 16, timeout=60, description="the 16 jobs done")

    # Scale-in: the queue is empty and one process runs a long job.
    ruby_enqueue(redis_server.url, "--slow", "1", "--slow-seconds", "15", "--slow-queue", "default")
    wait_for(lambda: read_pool(client).pools["default"].busy == 1, timeout=20, description="one busy thread")
    state = read_pool(client)
    own = pool_processes(state, "default")
    reading = scaler.read(own, client, now=state.now)
    decision = decide(policy_signals(state, "default", own, reading.requested_processes), settings, decision.state)
    plan = scaler.plan(reading, decision.desired)
    scaler.apply(plan, client)

    (busy_member,) = [view.member.id for view in reading.members if view.busy]
    leavers = sorted(set(group["instances"]) - {busy_member})
    group = group_state(moto, GROUP)
    assert decision.action == SCALE_IN
    assert decision.desired == 1
    assert sorted(plan.leave) == leavers
    assert group["desired"] == 3
    assert all(item["protected"] for item in group["instances"].values())
    leaver_identities = {
        process.identity for view in reading.members if view.member.id in leavers for process in view.processes
    }
    wait_for(lambda: leaver_identities <= drained_identities(client), timeout=20, description="the leavers drained")

    # The next run removes exactly the quiet, idle instances; the busy one stays protected.
    state = read_pool(client)
    own = pool_processes(state, "default")
    reading = scaler.read(own, client, now=state.now)
    decision = decide(policy_signals(state, "default", own, reading.requested_processes), settings, decision.state)
    scaler.apply(scaler.plan(reading, decision.desired), client)

    group = group_state(moto, GROUP)
    assert reading.requested_processes == 1
    assert decision.action == HOLD
    assert group["desired"] == 1
    assert group["instances"] == {busy_member: {"state": "InService", "protected": True}}
    for member in leavers:
        assert ec2_state(moto, member) in ("shutting-down", "terminated")
    wait_for(lambda: client.scard("demo:done") == 17, timeout=30, description="the long job done")
    assert set(client.hvals("demo:runs")) == {b"1"}
