"""Autoscaling backends for pools on AWS: ``aws_asg`` (EC2 Auto Scaling groups) and ``aws_ecs`` (ECS services).

Each pool maps to one group or service (``aws_targets``), whose members (instances or tasks) each run the
pool's Sidekiq processes. A backend works in three steps, and the autoscale module decides between the first two:

    backend = build_backend("aws_asg", aws_settings(params), pool, target, margin=10)
    reading = backend.read(own_processes, redis_client, namespace_prefix)  # AWS and Redis reads, no change
    # PoolSignals(..., requested=reading.requested_processes) -> policy.decide -> decision.desired
    plan = backend.plan(reading, decision.desired)                          # pure: check mode stops here
    result = backend.apply(plan, redis_client, namespace_prefix)            # the changes, in a safe order

Scale-out raises the desired capacity (EC2, clamped to the group's MinSize and MaxSize with a note) or the
desired count (ECS). Scale-in removes only members whose Sidekiq processes are quiet and idle:

- Run N chooses the members to leave (quiet ones first, then the least busy), records them in Redis, turns on
  their scale-in protection, and quiets their processes (``LPUSH <identity>-signals TSTP``, picked up within one
  heartbeat). While members are leaving, busy members that stay are protected too, so that no other scale-in
  (a manual change, another policy) takes them. The desired capacity does not change yet.
- Each later run sends TSTP again to any process of a leaving member that is not quiet (one restarted since),
  and keeps protecting leaving members until they are drained: every process quiet and idle in one heartbeat.
  A member whose processes are missing from the reading (heartbeat expired, tag changed, restarting) counts
  as drained only once they have been missing for longer than the pool's stop budget plus Sidekiq's 60 s
  heartbeat expiry (``gone_since`` in the leaving record), because their jobs may still run.
- The run that finds a member drained removes protection and removes the member. EC2 terminates that very
  instance and lowers the desired capacity in one call (TerminateInstanceInAutoScalingGroup), so the group
  cannot pick another one. ECS picks the tasks itself, so the backend first protects every task that stays and
  then lowers the desired count. It does so only while the service is steady: no deployment in progress, and
  exactly the desired number of tasks running. While it is not steady, the backend turns no protection on and
  renews none, and drained leavers lose theirs, so that a deployment can replace them.
- EC2 instance protection does not expire, so the ASG backend lists the instances it protected
  (``...:<group>:protected``) and takes protection off them at the first run with nothing leaving. It never
  touches protection that it did not set, except on a drained instance just before terminating it.

While members leave, the policy's ``requested`` signal is the capacity without them
(``reading.requested_processes``), so the next decision starts from the processes that stay.

Processes are matched to members by a Sidekiq label (``instance-id=<id>`` or ``task-id=<id>``) or by hostname;
see ``scaling_aws_plan``. Redis keys written: ``sidekiq-ops:autoscale:aws:<backend>:<target>:leaving`` and each
quieted process's ``<identity>-signals`` list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_asg import ASG_PERMISSIONS, AsgBackend
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_client import (
    AWS_ARGUMENT_SPEC,
    AwsAccessDeniedError,
    AwsConfigurationError,
    AwsCredentialsError,
    AwsDependencyError,
    AwsError,
    AwsNotFoundError,
    AwsOptionsError,
    AwsRequestError,
    AwsSettings,
    AwsThrottlingError,
    aws_settings,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_ecs import (
    DEFAULT_PROTECTION_MINUTES,
    ECS_PERMISSIONS,
    EcsBackend,
    StopBudgetError,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import (
    ApplyResult,
    ScalingPlan,
    ScalingReading,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

__all__ = [
    "ASG_PERMISSIONS",
    "AWS_ARGUMENT_SPEC",
    "AWS_BACKENDS",
    "AWS_TARGETS_ARGUMENT_SPEC",
    "ECS_PERMISSIONS",
    "ApplyResult",
    "AsgBackend",
    "AwsAccessDeniedError",
    "AwsBackend",
    "AwsConfigurationError",
    "AwsCredentialsError",
    "AwsDependencyError",
    "AwsError",
    "AwsNotFoundError",
    "AwsOptionsError",
    "AwsRequestError",
    "AwsSettings",
    "AwsTarget",
    "AwsThrottlingError",
    "EcsBackend",
    "ScalingPlan",
    "ScalingReading",
    "StopBudgetError",
    "aws_settings",
    "build_backend",
    "parse_targets",
]

AWS_BACKENDS = ("aws_asg", "aws_ecs")
AWS_TARGETS_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "aws_targets": {"type": "dict", "default": {}},
    "aws_task_protection_minutes": {"type": "int", "default": DEFAULT_PROTECTION_MINUTES},
}
TARGET_KEYS = {
    "aws_asg": ("group_name", "processes_per_instance"),
    "aws_ecs": ("cluster", "service", "container", "processes_per_task"),
}


class AwsBackend(Protocol):
    """The interface both AWS backends offer to the autoscale module."""

    name: str

    def read(
        self, processes: Iterable[ProcessState], redis_client: Any, namespace_prefix: str = "", now: float | None = None
    ) -> ScalingReading: ...

    def plan(self, reading: ScalingReading, desired_processes: int) -> ScalingPlan: ...

    def apply(self, plan: ScalingPlan, redis_client: Any, namespace_prefix: str = "") -> ApplyResult: ...


@dataclass(frozen=True)
class AwsTarget:
    """The AWS resource that runs one pool. Unset names default to ``sidekiq-<pool>``, like its systemd units."""

    pool: str
    group_name: str | None = None
    processes_per_instance: int = 1
    cluster: str | None = None
    service: str | None = None
    container: str | None = None
    processes_per_task: int = 1


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_targets(backend: str, targets: Any, pool_names: Sequence[str]) -> dict[str, AwsTarget]:
    """Validate ``aws_targets`` (pool name to target settings) and return a target for every pool.

    For ``aws_asg`` an entry may give ``group_name`` (default ``sidekiq-<pool>``) and ``processes_per_instance``
    (default 1). For ``aws_ecs`` it gives ``cluster`` (required), ``service`` (default ``sidekiq-<pool>``),
    ``container`` (default: the only container, or the one named ``sidekiq``) and ``processes_per_task``
    (default 1). Raises AwsOptionsError listing every problem with its fix.
    """
    if backend not in AWS_BACKENDS:
        raise AwsOptionsError(f"backend {backend!r} is not an AWS backend; use one of {list(AWS_BACKENDS)}.")
    if targets is None:
        targets = {}
    if not isinstance(targets, Mapping):
        raise AwsOptionsError(f"aws_targets must be a mapping of pool name to settings, got {type(targets).__name__}.")
    errors: list[str] = []
    unknown = sorted(str(name) for name in targets if name not in pool_names)
    if unknown:
        errors.append(f"aws_targets names unknown pools {unknown}; use names from pools: {sorted(pool_names)}")
    allowed = TARGET_KEYS[backend]
    parsed: dict[str, AwsTarget] = {}
    for pool in pool_names:
        entry = targets.get(pool) or {}
        if not isinstance(entry, Mapping):
            errors.append(f"aws_targets.{pool} must be a mapping with the keys {list(allowed)}")
            continue
        extra = sorted(set(entry) - set(allowed))
        if extra:
            errors.append(f"aws_targets.{pool} has unknown keys {extra}; for {backend} the keys are {list(allowed)}")
        per_key = "processes_per_instance" if backend == "aws_asg" else "processes_per_task"
        per = entry.get(per_key, 1)
        if not _is_count(per):
            errors.append(f"aws_targets.{pool}.{per_key} {per!r} is invalid; it must be an integer >= 1")
            per = 1
        default_name = f"sidekiq-{pool}"
        if backend == "aws_asg":
            parsed[pool] = AwsTarget(
                pool=pool, group_name=str(entry.get("group_name") or default_name), processes_per_instance=per
            )
            continue
        cluster = entry.get("cluster")
        if not isinstance(cluster, str) or not cluster:
            errors.append(f"aws_targets.{pool}.cluster is missing; give the name or ARN of the pool's ECS cluster")
        parsed[pool] = AwsTarget(
            pool=pool,
            cluster=str(cluster or ""),
            service=str(entry.get("service") or default_name),
            container=entry.get("container") or None,
            processes_per_task=per,
        )
    if errors:
        raise AwsOptionsError("; ".join(errors) + ".")
    return parsed


def build_backend(
    backend: str,
    settings: AwsSettings,
    pool: Mapping[str, Any],
    target: AwsTarget,
    margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN,
    protection_minutes: int = DEFAULT_PROTECTION_MINUTES,
) -> AsgBackend | EcsBackend:
    """Open the backend for one pool without calling AWS yet. Raises AwsOptionsError or AwsDependencyError."""
    if backend == "aws_asg":
        return AsgBackend(
            settings,
            str(target.group_name),
            processes_per_instance=target.processes_per_instance,
            pool=pool,
            margin=margin,
        )
    if backend == "aws_ecs":
        return EcsBackend(
            settings,
            cluster=str(target.cluster),
            service=str(target.service),
            pool=pool,
            margin=margin,
            container=target.container,
            processes_per_task=target.processes_per_task,
            protection_minutes=protection_minutes,
        )
    raise AwsOptionsError(f"backend {backend!r} is not an AWS backend; use one of {list(AWS_BACKENDS)}.")
