"""The ``aws_asg`` backend: one EC2 Auto Scaling group per pool, each instance running the pool's processes.

`AsgBackend.read` describes the group and its instances (EC2 DescribeInstances gives the hostnames), matches the
pool's Sidekiq processes to instances and loads the leaving and protection records from Redis. `plan` is pure.
`apply` (``scaling_aws_apply``) makes the plan's changes in this order, so that a run that stops half-way leaves
nothing that the next run cannot finish:

1. record the newly chosen instances as leaving, and the instances about to be protected in the protection
   record (Redis);
2. turn scale-in protection on (SetInstanceProtection, 50 instances per call);
3. send TSTP to the processes of leaving instances that are not quiet yet (Redis);
4. turn protection off for drained instances, and, once no instance is leaving, for the instances in the
   protection record; then delete them from that record;
5. terminate each drained instance with TerminateInstanceInAutoScalingGroup and ShouldDecrementDesiredCapacity,
   then delete its record. The call names the instance, so the group cannot pick another one, as it could
   if only the desired capacity were lowered;
6. set the desired capacity (SetDesiredCapacity, HonorCooldown false) when the plan changes it otherwise;
7. delete the records of instances that are gone.

EC2 scale-in protection never expires: a protected instance is skipped by every later scale-in, and an instance
refresh waits for it. That is why the backend records what it protects and takes only that protection off
again. Two exceptions touch protection that a user set: a drained instance loses its protection right before it
is terminated, and an instance that the record lists loses it even if a user protected it again meanwhile.
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
    AwsSettings,
    chunks,
    epoch_seconds,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import (
    forget_leaving,
    leaving_key,
    load_leaving,
    load_protection,
    protection_key,
    redis_errors,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import (
    INSTANCE_LABEL,
    Member,
    Removal,
    ScalingPlan,
    ScalingReading,
    build_views,
    plan_scaling,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

BACKEND = "aws_asg"
ASG_PERMISSIONS = (
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:SetDesiredCapacity",
    "autoscaling:SetInstanceProtection",
    "autoscaling:TerminateInstanceInAutoScalingGroup",
    "ec2:DescribeInstances",
)
# Lifecycle states in which an instance counts towards the desired capacity. Standby, warm pool and terminating
# instances do not.
COUNTED_STATES = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})
# SetInstanceProtection accepts at most 50 instance ids per call.
PROTECTION_BATCH = 50
DESCRIBE_BATCH = 100


def _ip_hostname(address: str | None) -> str | None:
    """Return the hostname EC2 derives from a private IPv4 address: 10.0.1.23 gives ip-10-0-1-23."""
    if not address or address.count(".") != 3:
        return None
    return "ip-" + address.replace(".", "-")


class AsgBackend(MemberScaler):
    """Scale one pool's Auto Scaling group. See the module docstring for the order of the changes."""

    name = BACKEND
    unit = "instance"

    def __init__(
        self,
        settings: AwsSettings,
        group_name: str,
        processes_per_instance: int = 1,
        autoscaling: AwsApi | None = None,
        ec2: AwsApi | None = None,
        pool: Mapping[str, Any] | None = None,
        margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN,
    ) -> None:
        """Open the backend without calling AWS yet.

        `pool` and `margin` give the stop budget (the pool's timeout plus the margin). Without `pool` the budget
        uses Sidekiq's default timeout of 25 s, which is too short for a pool with a longer timeout.
        """
        if not isinstance(group_name, str) or not group_name:
            raise AwsOptionsError(f"group_name {group_name!r} is invalid; give the Auto Scaling group's name.")
        valid_count = isinstance(processes_per_instance, int) and not isinstance(processes_per_instance, bool)
        if not valid_count or processes_per_instance < 1:
            raise AwsOptionsError(f"processes_per_instance {processes_per_instance!r} must be an integer >= 1.")
        self.settings = settings
        self.group_name = group_name
        self.per_member = processes_per_instance
        self.stop_budget = pool_model.stop_budget(pool or {}, margin)
        self.autoscaling = autoscaling or AwsApi.open(settings, "autoscaling", BACKEND, ASG_PERMISSIONS)
        self.ec2 = ec2 or AwsApi.open(settings, "ec2", BACKEND, ASG_PERMISSIONS)

    @property
    def resource(self) -> str:
        return f"Auto Scaling group '{self.group_name}'"

    def key(self, namespace_prefix: str = "") -> str:
        return leaving_key(BACKEND, self.group_name, namespace_prefix)

    def protection_key(self, namespace_prefix: str = "") -> str:
        return protection_key(BACKEND, self.group_name, namespace_prefix)

    def describe_group(self) -> dict[str, Any]:
        """Return the group as DescribeAutoScalingGroups reports it; raise AwsNotFoundError when it is missing."""
        response = self.autoscaling.call(
            "describe_auto_scaling_groups", self.resource, AutoScalingGroupNames=[self.group_name]
        )
        groups = response.get("AutoScalingGroups") or []
        if not groups:
            raise AwsNotFoundError(
                f"{self.resource} was not found in {self.settings.describe()}; check the group name and region."
            )
        group: dict[str, Any] = groups[0]
        return group

    def _check_group(self, group: Mapping[str, Any]) -> list[str]:
        """Reject groups whose capacity is not counted in instances; return notes about suspended processes."""
        capacity_type = group.get("DesiredCapacityType")
        if capacity_type not in (None, "units"):
            raise AwsConfigurationError(
                f"{self.resource} counts its desired capacity in {capacity_type}, but this backend counts "
                "instances; set DesiredCapacityType to units."
            )
        overrides = ((group.get("MixedInstancesPolicy") or {}).get("LaunchTemplate") or {}).get("Overrides") or []
        weights = sorted({str(item["WeightedCapacity"]) for item in overrides if item.get("WeightedCapacity")})
        if any(weight != "1" for weight in weights):
            raise AwsConfigurationError(
                f"{self.resource} gives instance types the weights {weights}, but this backend counts each "
                "instance as one unit of capacity; remove WeightedCapacity from the overrides, and use "
                "processes_per_instance for instances that run several processes."
            )
        suspended = sorted(
            item["ProcessName"]
            for item in group.get("SuspendedProcesses") or []
            if item.get("ProcessName") in ("Launch", "Terminate")
        )
        if suspended:
            return [
                f"The {self.resource} has the scaling processes {suspended} suspended, so capacity changes do not "
                "take effect until they are resumed."
            ]
        return []

    def _instance_details(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Return EC2's description of each instance. Ids are filtered, so an instance that is gone is skipped."""
        details: dict[str, dict[str, Any]] = {}
        for batch in chunks(ids, DESCRIBE_BATCH):
            token: str | None = None
            while True:
                params: dict[str, Any] = {"Filters": [{"Name": "instance-id", "Values": batch}]}
                if token:
                    params["NextToken"] = token
                response = self.ec2.call("describe_instances", f"the instances of {self.resource}", **params)
                for reservation in response.get("Reservations") or []:
                    for instance in reservation.get("Instances") or []:
                        details[instance["InstanceId"]] = instance
                token = response.get("NextToken")
                if not token:
                    break
        return details

    def _members(self, group: Mapping[str, Any]) -> list[Member]:
        counted = [item for item in group.get("Instances") or [] if item.get("LifecycleState") in COUNTED_STATES]
        details = self._instance_details([item["InstanceId"] for item in counted])
        members = []
        for item in counted:
            instance_id = item["InstanceId"]
            detail = details.get(instance_id, {})
            hostnames = [instance_id]
            for name in (detail.get("PrivateDnsName"), _ip_hostname(detail.get("PrivateIpAddress"))):
                if name:
                    hostnames.append(name.lower())
            launched = detail.get("LaunchTime")
            members.append(
                Member(
                    id=instance_id,
                    label_ids=(instance_id,),
                    state=str(item.get("LifecycleState")),
                    ready=item.get("LifecycleState") == "InService",
                    protected=bool(item.get("ProtectedFromScaleIn")),
                    zone=item.get("AvailabilityZone"),
                    launched_at=epoch_seconds(launched),
                    hostnames=tuple(dict.fromkeys(hostnames)),
                )
            )
        return members

    def read(
        self,
        processes: Iterable[ProcessState],
        redis_client: Any,
        namespace_prefix: str = "",
        now: float | None = None,
    ) -> ScalingReading:
        """Read the group, its instances and the leaving and protection records, and match the pool's live processes.

        `processes` are the pool's processes (those with the pool's tag). Raises an AwsError subclass, or a
        RedisAccessError subclass when the leaving record cannot be read.
        """
        group = self.describe_group()
        notes = self._check_group(group)
        members = self._members(group)
        with redis_errors():
            entries, invalid = load_leaving(redis_client, self.key(namespace_prefix))
            recorded_protection = load_protection(redis_client, self.protection_key(namespace_prefix))
        if invalid:
            notes.append(f"Ignored unreadable leaving records for {', '.join(invalid)}.")
        views, match_notes, stale = build_views(members, processes, entries, INSTANCE_LABEL)
        return ScalingReading(
            backend=BACKEND,
            target=self.resource,
            unit=self.unit,
            capacity=int(group["DesiredCapacity"]),
            min_capacity=int(group["MinSize"]),
            max_capacity=int(group["MaxSize"]),
            per_member=self.per_member,
            members=views,
            exact_removal=True,
            stop_budget=self.stop_budget,
            records_protection=True,
            recorded_protection=recorded_protection,
            stale_records=tuple(sorted(set(stale) | set(invalid))),
            notes=tuple(notes + match_notes),
            now=time.time() if now is None else now,
        )

    def plan(self, reading: ScalingReading, desired_processes: int) -> ScalingPlan:
        """Plan the run for the policy's desired process count; pure, so check mode can return it as it is."""
        return plan_scaling(reading, desired_processes)

    def _protect(self, ids: Sequence[str], enabled: bool) -> None:
        for batch in chunks(ids, PROTECTION_BATCH):
            self.autoscaling.call(
                "set_instance_protection",
                f"instances {', '.join(batch)} of {self.resource}",
                AutoScalingGroupName=self.group_name,
                InstanceIds=batch,
                ProtectedFromScaleIn=enabled,
            )

    def _remove(self, removal: Removal, redis_client: Any, key: str) -> str:
        """Terminate a drained instance by id, lowering the desired capacity with it unless MinSize forbids."""
        self.autoscaling.call(
            "terminate_instance_in_auto_scaling_group",
            f"instance {removal.member_id} of {self.resource}",
            InstanceId=removal.member_id,
            ShouldDecrementDesiredCapacity=removal.decrement,
        )
        with redis_errors():
            forget_leaving(redis_client, key, [removal.member_id])
        outcome = "lowering the desired capacity" if removal.decrement else "to be replaced"
        return f"Terminated {removal.member_id}, {outcome}."

    def _set_capacity(self, capacity: int) -> str:
        self.autoscaling.call(
            "set_desired_capacity",
            self.resource,
            AutoScalingGroupName=self.group_name,
            DesiredCapacity=capacity,
            HonorCooldown=False,
        )
        return f"Set the desired capacity of the {self.resource} to {capacity}."
