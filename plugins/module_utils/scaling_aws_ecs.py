"""The ``aws_ecs`` backend: one ECS service per pool, each task running the pool's processes.

`EcsBackend.read` first checks that ECS gives Sidekiq its stop budget: the ``stopTimeout`` of the Sidekiq
container must be at least the pool's timeout plus the shutdown margin, and Fargate allows at most 120 s. A pool
that does not fit is rejected with StopBudgetError before anything changes, because ECS would otherwise kill
Sidekiq (SIGKILL) before it pushes unfinished jobs back to Redis.

ECS has no call that stops one named task of a service and lowers the desired count with it: the service picks
the tasks to stop, and it skips tasks with scale-in protection (UpdateTaskProtection). So a drained task is
removed by lowering the desired count at a moment when every other task of the service is protected and running.
`apply` (``scaling_aws_apply``) makes the plan's changes in this order:

1. write the leaving record: new leavers, and drained tasks marked removed (Redis);
2. turn protection on or renew it (UpdateTaskProtection, 10 tasks per call, expiring after
   ``protection_minutes``). A task that ECS could not protect stops the run before the count changes;
3. send TSTP to the processes of leaving tasks that are not quiet yet (Redis);
4. turn protection off for drained tasks;
5. set the desired count (UpdateService);
6. delete the records of tasks that are gone.

Protection expires by itself. ECS deployments also wait for protected tasks, so an autoscaler that stopped
running delays a deployment by ``protection_minutes`` at most. While the service is not steady (a deployment in
progress, or fewer or more tasks than the desired count), a run turns no protection on and renews none. It
takes protection off drained tasks instead of removing them, so that a deployment can replace them. Their
leaving records are deleted once they are gone.

NOTE: AWS documents that scale-in protection holds against service auto scaling and deployments; that it also
holds when UpdateService lowers the desired count is assumed here, and moto 5.2.5 does not model either.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_apply import MemberScaler
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_client import (
    AwsApi,
    AwsConfigurationError,
    AwsNotFoundError,
    AwsOptionsError,
    AwsRequestError,
    AwsSettings,
    chunks,
    epoch_seconds,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import (
    leaving_key,
    load_leaving,
    protection_key,
    redis_errors,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import (
    TASK_LABEL,
    Member,
    ScalingPlan,
    ScalingReading,
    build_views,
    plan_scaling,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

BACKEND = "aws_ecs"
ECS_PERMISSIONS = (
    "ecs:DescribeServices",
    "ecs:DescribeTaskDefinition",
    "ecs:ListTasks",
    "ecs:DescribeTasks",
    "ecs:GetTaskProtection",
    "ecs:UpdateTaskProtection",
    "ecs:UpdateService",
)
# ECS container stopTimeout: Fargate allows at most 120 s, and without a value ECS waits 30 s (on the EC2 launch
# type the agent's ECS_CONTAINER_STOP_TIMEOUT applies instead, whose own default is 30 s).
FARGATE_MAX_STOP_TIMEOUT = 120
DEFAULT_STOP_TIMEOUT = 30
FARGATE_PROVIDERS = frozenset({"FARGATE", "FARGATE_SPOT"})
# Task protection lasts 1 to 2880 minutes. The default outlasts many runs 30 to 60 s apart, and is short enough
# that a deployment waits at most this long for a task protected by an autoscaler that stopped running.
DEFAULT_PROTECTION_MINUTES = 15
MIN_PROTECTION_MINUTES = 1
MAX_PROTECTION_MINUTES = 2880
# UpdateTaskProtection and GetTaskProtection take at most 10 tasks per call, DescribeTasks at most 100.
PROTECTION_BATCH = 10
DESCRIBE_BATCH = 100
DEFAULT_CONTAINER = "sidekiq"


class StopBudgetError(AwsConfigurationError):
    """The service's task definition cannot give the pool its stop budget."""


def _ip_hostname(address: str | None) -> str | None:
    if not address or address.count(".") != 3:
        return None
    return "ip-" + address.replace(".", "-")


def sidekiq_container(task_definition: Mapping[str, Any], container: str | None) -> Mapping[str, Any]:
    """Return the container definition that runs Sidekiq: the named one, the only one, or one named sidekiq."""
    containers: list[Mapping[str, Any]] = list(task_definition.get("containerDefinitions") or [])
    names = [str(item.get("name")) for item in containers]
    label = f"task definition {task_definition.get('taskDefinitionArn', '?')}"
    if container is not None:
        for item in containers:
            if item.get("name") == container:
                return item
        raise AwsConfigurationError(f"The {label} has no container named {container!r}; its containers are {names}.")
    if len(containers) == 1:
        return containers[0]
    for item in containers:
        if item.get("name") == DEFAULT_CONTAINER:
            return item
    raise AwsConfigurationError(f"The {label} has the containers {names}; set container to the one that runs Sidekiq.")


def is_fargate(service: Mapping[str, Any], task_definition: Mapping[str, Any]) -> bool:
    """Return whether the service's tasks run on Fargate: by launch type, capacity providers or compatibilities."""
    if service.get("launchType"):
        return bool(service.get("launchType") == "FARGATE")
    providers = {item.get("capacityProvider") for item in service.get("capacityProviderStrategy") or []}
    if providers:
        return bool(providers & FARGATE_PROVIDERS)
    return list(task_definition.get("requiresCompatibilities") or []) == ["FARGATE"]


def check_stop_timeout(
    pool: Mapping[str, Any],
    margin: int,
    task_definition: Mapping[str, Any],
    container: str | None,
    fargate: bool,
) -> str:
    """Check that ECS waits at least the pool's stop budget before it kills Sidekiq; return a sentence on success.

    Raises StopBudgetError naming the pool, the values and the fix.
    """
    name = pool.get("name", "?")
    timeout = int(pool.get("timeout", pool_model.DEFAULT_TIMEOUT))
    budget = pool_model.stop_budget(pool, margin)
    parts = f"timeout {timeout} s + shutdown margin {margin} s"
    if fargate and budget > FARGATE_MAX_STOP_TIMEOUT:
        highest_timeout = FARGATE_MAX_STOP_TIMEOUT - margin
        raise StopBudgetError(
            f"Pool {name!r}: the stop budget of {budget} s ({parts}) exceeds Fargate's maximum stopTimeout of "
            f"{FARGATE_MAX_STOP_TIMEOUT} s, so ECS would kill Sidekiq before it pushes unfinished jobs back. Lower "
            f"the pool's timeout to at most {highest_timeout} s, or run the service on the EC2 launch type."
        )
    definition = sidekiq_container(task_definition, container)
    configured = definition.get("stopTimeout")
    stop_timeout = int(configured) if configured is not None else DEFAULT_STOP_TIMEOUT
    source = "" if configured is not None else " (not set, so ECS uses its default)"
    arn = task_definition.get("taskDefinitionArn", "?")
    if stop_timeout < budget:
        limit = f"; Fargate allows up to {FARGATE_MAX_STOP_TIMEOUT}" if fargate else ""
        raise StopBudgetError(
            f"Pool {name!r}: container {definition.get('name')!r} of task definition {arn} has stopTimeout "
            f"{stop_timeout} s{source}, below the stop budget of {budget} s ({parts}), so ECS would kill Sidekiq "
            f"before it pushes unfinished jobs back. Set stopTimeout to at least {budget} in the task definition "
            f"and deploy it{limit}."
        )
    return (
        f"Container {definition.get('name')!r} of {arn} waits {stop_timeout} s{source} before it kills Sidekiq, "
        f"which covers the stop budget of {budget} s."
    )


class EcsBackend(MemberScaler):
    """Scale one pool's ECS service. See the module docstring for the order of the changes."""

    name = BACKEND
    unit = "task"

    def __init__(
        self,
        settings: AwsSettings,
        cluster: str,
        service: str,
        pool: Mapping[str, Any],
        margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN,
        container: str | None = None,
        processes_per_task: int = 1,
        protection_minutes: int = DEFAULT_PROTECTION_MINUTES,
        ecs: AwsApi | None = None,
    ) -> None:
        for option, value in (("cluster", cluster), ("service", service)):
            if not isinstance(value, str) or not value:
                raise AwsOptionsError(f"{option} {value!r} is invalid; give the ECS {option}'s name or ARN.")
        if isinstance(processes_per_task, bool) or not isinstance(processes_per_task, int) or processes_per_task < 1:
            raise AwsOptionsError(f"processes_per_task {processes_per_task!r} must be an integer >= 1.")
        if (
            isinstance(protection_minutes, bool)
            or not isinstance(protection_minutes, int)
            or not MIN_PROTECTION_MINUTES <= protection_minutes <= MAX_PROTECTION_MINUTES
        ):
            raise AwsOptionsError(
                f"aws_task_protection_minutes {protection_minutes!r} is invalid; ECS accepts {MIN_PROTECTION_MINUTES} "
                f"to {MAX_PROTECTION_MINUTES} minutes (in playbooks/autoscale.yml: "
                "autoscale_aws_task_protection_minutes)."
            )
        self.settings = settings
        self.cluster = cluster
        self.service = service
        self.pool = pool
        self.margin = margin
        self.container = container
        self.per_member = processes_per_task
        self.protection_minutes = protection_minutes
        self.ecs = ecs or AwsApi.open(settings, "ecs", BACKEND, ECS_PERMISSIONS)

    @property
    def resource(self) -> str:
        return f"ECS service '{self.service}' in cluster '{self.cluster}'"

    def key(self, namespace_prefix: str = "") -> str:
        return leaving_key(BACKEND, f"{self.cluster}/{self.service}", namespace_prefix)

    def protection_key(self, namespace_prefix: str = "") -> str:
        # Nothing writes this key: ECS task protection expires by itself, so the plan records no protection.
        return protection_key(BACKEND, f"{self.cluster}/{self.service}", namespace_prefix)

    def describe_service(self) -> dict[str, Any]:
        """Return the service as DescribeServices reports it; raise AwsNotFoundError when it is missing or inactive."""
        response = self.ecs.call("describe_services", self.resource, cluster=self.cluster, services=[self.service])
        services = response.get("services") or []
        if not services:
            reasons = sorted({str(item.get("reason")) for item in response.get("failures") or []})
            raise AwsNotFoundError(
                f"{self.resource} was not found in {self.settings.describe()} ({', '.join(reasons) or 'no reply'}); "
                "check the cluster and service names and the region."
            )
        service: dict[str, Any] = services[0]
        if service.get("status") != "ACTIVE":
            raise AwsNotFoundError(
                f"{self.resource} is {service.get('status')}, not ACTIVE; it was deleted or is being deleted."
            )
        return service

    def check_task_definition(self, service: Mapping[str, Any]) -> str:
        """Check the stop budget against the service's task definition; raise StopBudgetError when it does not fit."""
        arn = str(service.get("taskDefinition"))
        response = self.ecs.call("describe_task_definition", f"task definition {arn}", taskDefinition=arn)
        definition = response.get("taskDefinition") or {}
        return check_stop_timeout(self.pool, self.margin, definition, self.container, is_fargate(service, definition))

    def _task_arns(self) -> list[str]:
        arns: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"cluster": self.cluster, "serviceName": self.service, "desiredStatus": "RUNNING"}
            if token:
                params["nextToken"] = token
            response = self.ecs.call("list_tasks", self.resource, **params)
            arns += response.get("taskArns") or []
            token = response.get("nextToken")
            if not token:
                return arns

    def _tasks(self) -> list[dict[str, Any]]:
        """Return the service's tasks that ECS keeps running (desired status RUNNING), in ListTasks order."""
        tasks: list[dict[str, Any]] = []
        group = f"service:{self.service.rsplit('/', 1)[-1]}"
        for batch in chunks(self._task_arns(), DESCRIBE_BATCH):
            response = self.ecs.call("describe_tasks", f"tasks of {self.resource}", cluster=self.cluster, tasks=batch)
            for task in response.get("tasks") or []:
                if task.get("group") == group and task.get("desiredStatus") == "RUNNING":
                    tasks.append(task)
        return tasks

    def _protection(self, arns: Sequence[str]) -> dict[str, tuple[bool, float | None]]:
        """Return (enabled, expiry in epoch seconds) per task ARN; tasks ECS reports as failures are unprotected."""
        found: dict[str, tuple[bool, float | None]] = {}
        for batch in chunks(arns, PROTECTION_BATCH):
            response = self.ecs.call(
                "get_task_protection", f"tasks of {self.resource}", cluster=self.cluster, tasks=batch
            )
            for item in response.get("protectedTasks") or []:
                expires = item.get("expirationDate")
                found[item["taskArn"]] = (
                    bool(item.get("protectionEnabled")),
                    epoch_seconds(expires),
                )
        return found

    @staticmethod
    def _hostnames(task: Mapping[str, Any]) -> tuple[str, ...]:
        # NOTE: the hostname a container reports on Fargate and in bridge mode was not checked on real ECS, only
        # against moto's task descriptions; the task-id label is the reliable match.
        names: list[str] = []
        for attachment in task.get("attachments") or []:
            details = {item.get("name"): item.get("value") for item in attachment.get("details") or []}
            for name in (details.get("privateDnsName"), _ip_hostname(details.get("privateIPv4Address"))):
                if name:
                    names.append(str(name).lower())
        for container in task.get("containers") or []:
            runtime = container.get("runtimeId")
            if runtime:
                names.append(str(runtime)[:12].lower())
            for interface in container.get("networkInterfaces") or []:
                name = _ip_hostname(interface.get("privateIpv4Address"))
                if name:
                    names.append(name)
        return tuple(dict.fromkeys(names))

    def _members(self, tasks: Sequence[Mapping[str, Any]]) -> list[Member]:
        protection = self._protection([task["taskArn"] for task in tasks])
        members = []
        for task in tasks:
            arn = str(task["taskArn"])
            enabled, expires = protection.get(arn, (False, None))
            started = task.get("startedAt") or task.get("createdAt")
            members.append(
                Member(
                    id=arn,
                    label_ids=(arn.rsplit("/", 1)[-1], arn),
                    state=str(task.get("lastStatus")),
                    ready=task.get("lastStatus") == "RUNNING",
                    protected=enabled,
                    protection_expires=expires if enabled else None,
                    zone=task.get("availabilityZone"),
                    launched_at=epoch_seconds(started),
                    hostnames=self._hostnames(task),
                )
            )
        return members

    @staticmethod
    def _unsteady_reason(service: Mapping[str, Any], members: Sequence[Member]) -> str | None:
        """Return why tasks must not be chosen or removed now, or None when the service is steady."""
        deployments = service.get("deployments") or []
        if len(deployments) > 1:
            return f"a deployment is in progress ({len(deployments)} deployments)."
        desired = int(service.get("desiredCount") or 0)
        if len(members) != desired:
            return f"the service runs {len(members)} tasks for a desired count of {desired}."
        starting = [member.id for member in members if not member.ready]
        if starting:
            return f"tasks {', '.join(starting)} are not running yet."
        return None

    def read(
        self,
        processes: Iterable[ProcessState],
        redis_client: Any,
        namespace_prefix: str = "",
        now: float | None = None,
    ) -> ScalingReading:
        """Check the stop budget, read the service, its tasks and their protection, and the leaving record.

        Raises StopBudgetError when the pool does not fit the task definition, another AwsError subclass when a
        call fails, or a RedisAccessError subclass when the leaving record cannot be read.
        """
        service = self.describe_service()
        notes = [self.check_task_definition(service)]
        members = self._members(self._tasks())
        with redis_errors():
            entries, invalid = load_leaving(redis_client, self.key(namespace_prefix))
        if invalid:
            notes.append(f"Ignored unreadable leaving records for {', '.join(invalid)}.")
        views, match_notes, stale = build_views(members, processes, entries, TASK_LABEL)
        reason = self._unsteady_reason(service, members)
        return ScalingReading(
            backend=BACKEND,
            target=self.resource,
            unit=self.unit,
            capacity=int(service.get("desiredCount") or 0),
            min_capacity=0,
            max_capacity=None,
            per_member=self.per_member,
            members=views,
            steady=reason is None,
            unsteady_reason=reason,
            exact_removal=False,
            protection_minutes=self.protection_minutes,
            stop_budget=pool_model.stop_budget(self.pool, self.margin),
            stale_records=tuple(sorted(set(stale) | set(invalid))),
            notes=tuple(notes + match_notes),
            now=time.time() if now is None else now,
        )

    def plan(self, reading: ScalingReading, desired_processes: int) -> ScalingPlan:
        """Plan the run for the policy's desired process count; pure, so check mode can return it as it is."""
        return plan_scaling(reading, desired_processes)

    def _protect(self, ids: Sequence[str], enabled: bool) -> None:
        """Turn protection of the task ARNs on (for protection_minutes) or off; raise AwsRequestError on failure."""
        failures: list[str] = []
        for batch in chunks(ids, PROTECTION_BATCH):
            params: dict[str, Any] = {"cluster": self.cluster, "tasks": batch, "protectionEnabled": enabled}
            if enabled:
                params["expiresInMinutes"] = self.protection_minutes
            response = self.ecs.call("update_task_protection", f"tasks of {self.resource}", **params)
            for item in response.get("failures") or []:
                failures.append(f"{item.get('arn')}: {item.get('reason')} {item.get('detail') or ''}".strip())
        if failures:
            verb = "protect" if enabled else "unprotect"
            raise AwsRequestError(
                f"ECS could not {verb} tasks of {self.resource}: {'; '.join(failures)}. The desired count was not "
                "changed; the next run tries again."
            )

    def _protected_sentence(self, ids: Sequence[str]) -> str:
        return f"Protected {', '.join(ids)} from scale-in for {self.protection_minutes} minutes."

    def _set_capacity(self, capacity: int) -> str:
        self.ecs.call(
            "update_service", self.resource, cluster=self.cluster, service=self.service, desiredCount=capacity
        )
        return f"Set the desired count of the {self.resource} to {capacity}."
