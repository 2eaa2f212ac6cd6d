"""Shared helpers of the test_scaling_aws_* modules. This module contains no tests.

- a moto server (moto 5.2.5, server mode) on a free loopback port, reset between tests, driven through real
  boto3 calls with ``endpoint_url``;
- Auto Scaling groups and ECS services created in it;
- two test doubles for ECS behaviour that moto 5.2.5 lacks. moto does not implement UpdateTaskProtection and
  GetTaskProtection, so `task_protection_in_moto` adds both actions to moto's ECS backend, keeping the protection
  on moto's own task objects. moto's services never start or stop tasks, so `EcsScheduler` does what the ECS
  service scheduler does: start tasks up to the desired count, and stop unprotected tasks above it;
- real Sidekiq processes from examples/demo-app with a label that names their instance or task, and the
  policy's signals built from what the reader returns for them, as the autoscale module builds them.

Nothing here reaches a real AWS account: every client has the moto endpoint and fake keys, and the tests that
run Ansible point the AWS environment variables at moto and at empty config files.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from moto.core.responses import ActionResult
from moto.ecs.responses import EC2ContainerServiceResponse
from moto.server import ThreadedMotoServer
from sidekiq_fixtures import DEMO_APP, stop_process, wait_for  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import PoolSignals
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_client import AwsSettings
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState, SidekiqState

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
AMI = "ami-12c6146b"
# By default moto moves an ECS task one lifecycle step (RUNNING, DEACTIVATING, STOPPING, ...) on every
# DescribeTasks. This transition keeps tasks RUNNING until the scheduler double stops them.
TASK_TRANSITION = {"model_name": "ecs::task", "transition": {"progression": "manual", "times": 1_000_000}}


def aws_environment(home: Path) -> dict[str, str]:
    """Return environment variables that keep boto3 away from real accounts: fake keys, empty config files."""
    config = home / "aws-config"
    config.write_text("")
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(config),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@dataclass
class MotoServer:
    """A moto server on 127.0.0.1 and the boto3 clients that talk to it."""

    url: str

    def reset(self) -> None:
        """Drop every resource of earlier tests and keep ECS tasks in their state."""
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        requests.post(f"{self.url}/moto-api/state-manager/set-transition", json=TASK_TRANSITION, timeout=10)

    def settings(self, **overrides: Any) -> AwsSettings:
        values: dict[str, Any] = {
            "region": REGION,
            "endpoint_url": self.url,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "max_attempts": 2,
        }
        values.update(overrides)
        return AwsSettings(**values)

    def client(self, service: str, region: str = REGION, **credentials: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=region,
            aws_access_key_id=credentials.get("access_key", ACCESS_KEY),
            aws_secret_access_key=credentials.get("secret_key", SECRET_KEY),
        )

    @contextmanager
    def iam_enforced(self) -> Iterator[None]:
        """Make moto check every request against its IAM users and policies inside the block."""
        requests.post(f"{self.url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        try:
            yield
        finally:
            requests.post(f"{self.url}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


@contextmanager
def running_moto() -> Iterator[MotoServer]:
    """Run a moto server on a free loopback port for the duration of the block."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        moto = MotoServer(url=f"http://{host}:{port}")
        moto.reset()
        yield moto
    finally:
        server.stop()


# EC2 Auto Scaling


def create_group(moto: MotoServer, name: str, minimum: int, maximum: int, desired: int) -> list[str]:
    """Create a launch template and an Auto Scaling group; return the ids of the instances moto launched."""
    ec2 = moto.client("ec2")
    autoscaling = moto.client("autoscaling")
    template = f"lt-{name}"
    ec2.create_launch_template(
        LaunchTemplateName=template, LaunchTemplateData={"ImageId": AMI, "InstanceType": "t3.micro"}
    )
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": template},
        MinSize=minimum,
        MaxSize=maximum,
        DesiredCapacity=desired,
        VPCZoneIdentifier=subnet,
    )
    return sorted(group_state(moto, name)["instances"])


def group_state(moto: MotoServer, name: str) -> dict[str, Any]:
    """Return the group's desired capacity and, per counted instance, its lifecycle state and protection."""
    group = moto.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][
        0
    ]
    return {
        "desired": group["DesiredCapacity"],
        "instances": {
            item["InstanceId"]: {"state": item["LifecycleState"], "protected": item["ProtectedFromScaleIn"]}
            for item in group["Instances"]
        },
    }


def ec2_state(moto: MotoServer, instance_id: str) -> str:
    reservations = moto.client("ec2").describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


# ECS


def _find_task(response: Any, cluster: str, reference: str) -> Any:
    for arn, task in response.ecs_backend.tasks.get(cluster.rsplit("/", 1)[-1], {}).items():
        if reference in (arn, arn.rsplit("/", 1)[-1]):
            return task
    return None


def _protection_item(task: Any) -> dict[str, Any]:
    enabled, expires = getattr(task, "sidekiq_ops_protection", (False, None))
    if enabled and expires is not None and expires <= datetime.datetime.now(datetime.UTC):
        enabled, expires = False, None
    item: dict[str, Any] = {"taskArn": task.task_arn, "protectionEnabled": enabled}
    if enabled:
        item["expirationDate"] = expires
    return item


def _update_task_protection(self: Any) -> ActionResult:
    cluster = self._get_param("cluster", "default")
    enabled = bool(self._get_param("protectionEnabled"))
    minutes = int(self._get_param("expiresInMinutes", 120))
    protected, failures = [], []
    for reference in self._get_param("tasks") or []:
        task = _find_task(self, cluster, reference)
        if task is None or task.desired_status != "RUNNING":
            failures.append({"arn": reference, "reason": "TASK_NOT_VALID"})
            continue
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes)
        task.sidekiq_ops_protection = (enabled, expires if enabled else None)
        protected.append(_protection_item(task))
    return ActionResult({"protectedTasks": protected, "failures": failures})


def _get_task_protection(self: Any) -> ActionResult:
    cluster = self._get_param("cluster", "default")
    protected, failures = [], []
    for reference in self._get_param("tasks") or []:
        task = _find_task(self, cluster, reference)
        if task is None:
            failures.append({"arn": reference, "reason": "MISSING"})
        else:
            protected.append(_protection_item(task))
    return ActionResult({"protectedTasks": protected, "failures": failures})


@contextmanager
def task_protection_in_moto() -> Iterator[None]:
    """Add UpdateTaskProtection and GetTaskProtection to moto's ECS backend inside the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EC2ContainerServiceResponse, "update_task_protection", _update_task_protection, raising=False)
        patch.setattr(EC2ContainerServiceResponse, "get_task_protection", _get_task_protection, raising=False)
        yield


@dataclass
class EcsService:
    """An ECS cluster, Fargate task definition and service created in moto."""

    moto: MotoServer
    cluster: str
    service: str
    network: dict[str, Any]

    @property
    def ecs(self) -> Any:
        return self.moto.client("ecs")

    def desired_count(self) -> int:
        described = self.ecs.describe_services(cluster=self.cluster, services=[self.service])["services"][0]
        return int(described["desiredCount"])

    def running_tasks(self) -> list[str]:
        """Return the ARNs of the service's running tasks, in the order moto started them."""
        arns = self.ecs.list_tasks(cluster=self.cluster, desiredStatus="RUNNING")["taskArns"]
        if not arns:
            return []
        tasks = self.ecs.describe_tasks(cluster=self.cluster, tasks=arns)["tasks"]
        mine = {task["taskArn"] for task in tasks if task["group"] == f"service:{self.service}"}
        return [arn for arn in arns if arn in mine]

    def protection(self) -> dict[str, bool]:
        arns = self.running_tasks()
        if not arns:
            return {}
        reply = self.ecs.get_task_protection(cluster=self.cluster, tasks=arns)
        return {item["taskArn"]: item["protectionEnabled"] for item in reply["protectedTasks"]}

    def start_tasks(self, count: int) -> list[str]:
        tasks = self.ecs.run_task(
            cluster=self.cluster,
            taskDefinition=self.service,
            count=count,
            launchType="FARGATE",
            group=f"service:{self.service}",
            startedBy="ecs-svc/0123456789",
            networkConfiguration=self.network,
        )["tasks"]
        return [task["taskArn"] for task in tasks]


@dataclass
class EcsScheduler:
    """Test double of the ECS service scheduler: converge the running tasks on the desired count.

    Below the desired count it starts tasks; above it, it stops unprotected tasks (never protected ones), as
    ECS does on scale-in. Returns what it started and stopped, so a test can assert exactly which tasks went.
    """

    service: EcsService
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    def converge(self) -> tuple[list[str], list[str]]:
        running = self.service.running_tasks()
        desired = self.service.desired_count()
        started: list[str] = []
        stopped: list[str] = []
        if len(running) < desired:
            started = self.service.start_tasks(desired - len(running))
        elif len(running) > desired:
            protection = self.service.protection()
            for arn in [arn for arn in running if not protection.get(arn)][: len(running) - desired]:
                self.service.ecs.stop_task(cluster=self.service.cluster, task=arn, reason="Scaling activity")
                stopped.append(arn)
        self.started += started
        self.stopped += stopped
        return started, stopped


def create_service(moto: MotoServer, cluster: str, service: str, stop_timeout: int | None, desired: int) -> EcsService:
    """Create a cluster, a Fargate task definition with one container named sidekiq, and a service."""
    ec2 = moto.client("ec2")
    ecs = moto.client("ecs")
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    group = ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]
    network = {"awsvpcConfiguration": {"subnets": [subnet], "securityGroups": [group]}}
    container: dict[str, Any] = {"name": "sidekiq", "image": "shop:1", "essential": True, "memory": 512, "cpu": 256}
    if stop_timeout is not None:
        container["stopTimeout"] = stop_timeout
    ecs.create_cluster(clusterName=cluster)
    ecs.register_task_definition(
        family=service,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        containerDefinitions=[container],
    )
    ecs.create_service(
        cluster=cluster,
        serviceName=service,
        taskDefinition=service,
        desiredCount=desired,
        launchType="FARGATE",
        networkConfiguration=network,
    )
    return EcsService(moto=moto, cluster=cluster, service=service, network=network)


# Sidekiq processes that name their member


@dataclass
class LabelledWorker:
    """One real ``sidekiq -r ./app.rb`` from examples/demo-app with a tag and labels in its sidekiq.yml."""

    redis_url: str
    directory: Path
    tag: str
    labels: tuple[str, ...]
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 2
    timeout: int = 2
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> LabelledWorker:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"sidekiq-{uuid.uuid4().hex[:8]}"
        config = self.directory / f"{name}.yml"
        lines = [f":concurrency: {self.concurrency}", f":timeout: {self.timeout}", f":tag: {self.tag}", ":queues:"]
        lines += [f"  - {queue}" for queue in self.queues]
        lines += [":labels:"] + [f'  - "{label}"' for label in self.labels]
        config.write_text("\n".join(lines) + "\n")
        log = (self.directory / f"{name}.log").open("wb")
        self.process = subprocess.Popen(
            ["sidekiq", "-r", "./app.rb", "-C", str(config)],
            cwd=DEMO_APP,
            env={**os.environ, "REDIS_URL": self.redis_url},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def identity(self, client: Any) -> str:
        """Wait for the first heartbeat and return the identity (host:pid:nonce)."""
        assert self.process is not None
        pid = str(self.process.pid)

        def find() -> str | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"sidekiq exited with {self.process.returncode}: see {self.directory}")
            for member in client.smembers("processes"):
                identity = member.decode() if isinstance(member, bytes) else str(member)
                if identity.split(":")[-2] == pid and client.exists(identity):
                    return identity
            return None

        return str(wait_for(find, timeout=30, description=f"the heartbeat of sidekiq pid {pid}"))

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=self.timeout + 10)


@contextmanager
def labelled_sidekiq(directory: Path) -> Iterator[Callable[..., LabelledWorker]]:
    """Start labelled Sidekiq workers on demand inside the block and stop every one of them at the end."""
    started: list[LabelledWorker] = []

    def start(redis_url: str, tag: str, labels: tuple[str, ...], **options: Any) -> LabelledWorker:
        worker = LabelledWorker(redis_url=redis_url, directory=directory, tag=tag, labels=labels, **options).start()
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


def synthetic_process(label: str, busy: int = 0, quiet: bool = False, pid: int = 100) -> ProcessState:
    """A live process as the reader returns it, labelled with `label` (for tests that need no real Sidekiq)."""
    identity = f"worker-{pid}:{pid}:{uuid.uuid4().hex[:12]}"
    return ProcessState(
        identity=identity,
        hostname=f"worker-{pid}",
        pid=pid,
        tag="default",
        labels=(label,),
        version=None,
        concurrency=2,
        queues=("default",),
        busy=busy,
        busy_by_queue={"default": busy} if busy else {},
        quiet=quiet,
        beat=None,
        seconds_since_beat=1.0,
        rss_kb=1000,
        live=True,
        stale_reason=None,
    )


def pool_processes(state: SidekiqState, tag: str) -> list[ProcessState]:
    """Return the live processes of a pool, found by the tag the sidekiq role gives them."""
    return [process for process in state.live_processes if process.tag == tag]


def policy_signals(state: SidekiqState, pool: str, own: list[ProcessState], requested: int) -> PoolSignals:
    """Build the policy's signals of a pool from the reader's aggregates and the backend's requested count."""
    pool_state = state.pools[pool]
    active = [process for process in own if not process.quiet]
    return PoolSignals(
        backlog=pool_state.backlog,
        latency=pool_state.latency,
        busy=max(pool_state.busy, sum(process.busy for process in own)),
        processes=len(active),
        capacity=sum(process.concurrency for process in active),
        now=state.now,
        processed=state.processed,
        requested=requested,
        idle_processes=sum(1 for process in active if process.busy == 0),
    )
