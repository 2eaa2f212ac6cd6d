"""Scale-in safety of the AWS backends: members whose processes vanished, ECS deployments, and EC2 protection.

The plan tests build readings by hand. The multi-run tests drive AsgBackend through in-memory fakes of the Auto
Scaling, EC2 and Redis clients that keep their state between calls, as the real services do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from process_states import process_state  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_asg import AsgBackend
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_client import AwsApi, AwsSettings
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_leaving import (
    leaving_key,
    protection_key,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import (
    LeavingEntry,
    Member,
    MemberView,
    ScalingReading,
    is_drained,
    plan_scaling,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

NOW = 1_800_000_000.0
GROUP = "sidekiq-default"
LEAVING_KEY = leaving_key("aws_asg", GROUP)
PROTECTION_KEY = protection_key("aws_asg", GROUP)
# The default stop budget (timeout 25 s + margin 10 s) plus Sidekiq's 60 s heartbeat expiry.
DEFAULT_MISSING_LIMIT = 95.0


def process(hostname: str, busy: int = 0, quiet: bool = False, pid: int = 1) -> ProcessState:
    return process_state(hostname, beat=NOW, pid=pid, busy=busy, quiet=quiet)


def member(member_id: str, protected: bool = False, expires: float | None = None) -> Member:
    return Member(
        id=member_id,
        label_ids=(member_id,),
        state="RUNNING",
        ready=True,
        protected=protected,
        protection_expires=expires,
        hostnames=(f"ip-{member_id}",),
    )


def member_view(
    item: Member, busy: int | None = 0, quiet: bool = False, leaving: LeavingEntry | None = None
) -> MemberView:
    """A member with one process of `busy` threads, or with none when busy is None."""
    processes = () if busy is None else (process(f"ip-{item.id}", busy=busy, quiet=quiet),)
    return MemberView(member=item, processes=processes, leaving=leaving)


def asg_reading(views: Sequence[MemberView], capacity: int, **fields: Any) -> ScalingReading:
    values: dict[str, Any] = {
        "backend": "aws_asg",
        "target": f"Auto Scaling group '{GROUP}'",
        "unit": "instance",
        "capacity": capacity,
        "min_capacity": 0,
        "max_capacity": 10,
        "per_member": 1,
        "members": tuple(views),
        "exact_removal": True,
        "records_protection": True,
        "now": NOW,
    }
    values.update(fields)
    return ScalingReading(**values)


def ecs_reading(views: Sequence[MemberView], capacity: int, steady: bool = True, **fields: Any) -> ScalingReading:
    values: dict[str, Any] = {
        "backend": "aws_ecs",
        "target": "ECS service 'sidekiq-default' in cluster 'shop'",
        "unit": "task",
        "capacity": capacity,
        "min_capacity": 0,
        "max_capacity": None,
        "per_member": 1,
        "members": tuple(views),
        "steady": steady,
        "unsteady_reason": None if steady else "a deployment is in progress (2 deployments).",
        "exact_removal": False,
        "protection_minutes": 10,
        "now": NOW,
    }
    values.update(fields)
    return ScalingReading(**values)


def notes_text(notes: Sequence[str]) -> str:
    return " ".join(notes)


# --- A leaving member whose processes are missing from the reading -------------------------------------------------


def test_leaving_member_without_process_not_removed() -> None:
    quieted = member_view(member("i-b", protected=True), busy=None, leaving=LeavingEntry(since=NOW - 40))
    reading = asg_reading([member_view(member("i-a"), busy=2), quieted], capacity=2)

    plan = plan_scaling(reading, 1)

    assert plan.remove == ()
    assert "i-b" not in plan.unprotect
    assert plan.record == (("i-b", LeavingEntry(since=NOW - 40, gone_since=NOW)),)
    assert "Waiting for i-b: its Sidekiq process has been missing from Redis for 0 s." in notes_text(plan.notes)
    assert "counts as drained only after 95 s (stop budget 35 s plus the 60 s heartbeat expiry)" in notes_text(
        plan.notes
    )


def test_missing_process_waits_until_limit() -> None:
    entry = LeavingEntry(since=NOW - 300, gone_since=NOW - DEFAULT_MISSING_LIMIT)
    quieted = member_view(member("i-b", protected=True), busy=None, leaving=entry)
    reading = asg_reading([member_view(member("i-a")), quieted], capacity=2)

    plan = plan_scaling(reading, 1)

    assert not is_drained(quieted, reading)
    assert plan.remove == ()
    assert plan.record == ()
    assert "missing from Redis for 95 s" in notes_text(plan.notes)


def test_missing_process_removed_after_limit() -> None:
    entry = LeavingEntry(since=NOW - 300, gone_since=NOW - DEFAULT_MISSING_LIMIT - 1)
    quieted = member_view(member("i-b", protected=True), busy=None, leaving=entry)
    reading = asg_reading([member_view(member("i-a")), quieted], capacity=2)

    plan = plan_scaling(reading, 1)

    assert is_drained(quieted, reading)
    assert [removal.member_id for removal in plan.remove] == ["i-b"]
    assert plan.unprotect == ("i-b",)
    assert plan.capacity_after == 1
    assert "Removing i-b: the Sidekiq processes missing from Redis have been gone for more than 95 s" in notes_text(
        plan.notes
    )


def test_missing_limit_follows_stop_budget() -> None:
    entry = LeavingEntry(since=NOW - 600, gone_since=NOW - 100)
    quieted = member_view(member("i-b", protected=True), busy=None, leaving=entry)
    reading = asg_reading([member_view(member("i-a")), quieted], capacity=2, stop_budget=130)

    plan = plan_scaling(reading, 1)

    assert reading.missing_limit == 190
    assert plan.remove == ()
    assert "counts as drained only after 190 s (stop budget 130 s" in notes_text(plan.notes)


def test_returned_process_clears_gone_since() -> None:
    entry = LeavingEntry(since=NOW - 300, gone_since=NOW - 200)
    back = member_view(member("i-b", protected=True), busy=3, quiet=True, leaving=entry)
    reading = asg_reading([member_view(member("i-a")), back], capacity=2)

    plan = plan_scaling(reading, 1)

    assert plan.remove == ()
    assert plan.record == (("i-b", LeavingEntry(since=NOW - 300)),)
    assert "Waiting for i-b to finish 3 running jobs" in notes_text(plan.notes)


def test_one_of_two_processes_missing_waits() -> None:
    item = member("i-b", protected=True)
    half = MemberView(member=item, processes=(process("ip-i-b", quiet=True),), leaving=LeavingEntry(since=NOW - 60))
    reading = asg_reading([member_view(member("i-a")), half], capacity=2, per_member=2)

    plan = plan_scaling(reading, 2)

    assert not is_drained(half, reading)
    assert plan.remove == ()
    assert plan.record == (("i-b", LeavingEntry(since=NOW - 60, gone_since=NOW)),)
    assert "Waiting for i-b: 1 of its 2 Sidekiq processes have been missing" in notes_text(plan.notes)


def test_quiet_idle_leaver_removed_at_once() -> None:
    drained = member_view(member("i-b", protected=True), quiet=True, leaving=LeavingEntry(since=NOW - 10))
    reading = asg_reading([member_view(member("i-a")), drained], capacity=2)

    plan = plan_scaling(reading, 1)

    assert [removal.member_id for removal in plan.remove] == ["i-b"]
    assert "Removing i-b: quiet and idle." in plan.notes


def test_entry_without_gone_since_loads() -> None:
    stored = json.dumps({"since": NOW - 30, "removed": False})

    assert LeavingEntry.from_json(stored) == LeavingEntry(since=NOW - 30)
    assert LeavingEntry.from_json('{"since": 1, "gone_since": 2}') == LeavingEntry(since=1.0, gone_since=2.0)
    assert LeavingEntry.from_json('{"since": 1, "gone_since": "soon"}') is None
    assert LeavingEntry.from_json("[1, 2]") is None


def test_entry_json_keeps_gone_since() -> None:
    entry = LeavingEntry(since=NOW, removed=True, gone_since=NOW + 5)

    assert LeavingEntry.from_json(entry.to_json()) == entry
    assert "gone_since" not in json.loads(LeavingEntry(since=NOW).to_json())


def test_ecs_missing_process_waits() -> None:
    quieted = member_view(member("t-b", protected=True, expires=NOW + 500), busy=None, leaving=LeavingEntry(NOW - 90))
    reading = ecs_reading([member_view(member("t-a")), quieted], capacity=2, stop_budget=12)

    plan = plan_scaling(reading, 1)

    assert plan.remove == ()
    assert not plan.set_capacity
    assert plan.record == (("t-b", LeavingEntry(since=NOW - 90, gone_since=NOW)),)


def test_ecs_missing_process_removed_late() -> None:
    entry = LeavingEntry(since=NOW - 300, gone_since=NOW - 73)
    quieted = member_view(member("t-b", protected=True, expires=NOW + 500), busy=None, leaving=entry)
    reading = ecs_reading([member_view(member("t-a")), quieted], capacity=2, stop_budget=12)

    plan = plan_scaling(reading, 1)

    assert [removal.member_id for removal in plan.remove] == ["t-b"]
    assert plan.capacity_after == 1
    assert plan.protect == ("t-a",)
    assert plan.unprotect == ("t-b",)
    assert plan.record == (("t-b", LeavingEntry(since=NOW - 300, removed=True, gone_since=NOW - 73)),)


# --- ECS while the service is not steady ---------------------------------------------------------------------------


def test_ecs_deployment_lets_drained_task_go() -> None:
    drained = member_view(
        member("t-c", protected=True, expires=NOW + 120), quiet=True, leaving=LeavingEntry(since=NOW - 600)
    )
    reading = ecs_reading(
        [member_view(member("t-a")), member_view(member("t-b"), busy=2), drained], capacity=3, steady=False
    )

    plan = plan_scaling(reading, 2)

    assert "t-c" not in plan.protect
    assert plan.unprotect == ("t-c",)
    assert plan.remove == ()
    assert not plan.set_capacity
    assert plan.record == ()
    assert (
        "Not removing t-c yet: a deployment is in progress (2 deployments). Their scale-in protection is taken off"
        in notes_text(plan.notes)
    )


def test_ecs_unsteady_renews_no_protection() -> None:
    aging = member("t-b", protected=True, expires=NOW + 60)
    busy_leaver = member_view(aging, busy=2, quiet=True, leaving=LeavingEntry(since=NOW - 600))
    busy_keeper = member_view(member("t-a"), busy=4)
    reading = ecs_reading([busy_keeper, busy_leaver], capacity=2, steady=False)

    plan = plan_scaling(reading, 1)

    assert plan.protect == ()
    assert plan.unprotect == ()
    assert plan.remove == ()
    assert "Not protecting t-b, t-a and not renewing their protection: a deployment is in progress" in notes_text(
        plan.notes
    )


def test_ecs_steady_still_renews_protection() -> None:
    aging = member("t-b", protected=True, expires=NOW + 60)
    busy_leaver = member_view(aging, busy=2, quiet=True, leaving=LeavingEntry(since=NOW - 600))
    reading = ecs_reading([member_view(member("t-a"), busy=4), busy_leaver], capacity=2)

    plan = plan_scaling(reading, 1)

    assert plan.protect == ("t-b", "t-a")
    assert plan.unprotect == ()


def test_ecs_unsteady_unprotected_drained_kept() -> None:
    drained = member_view(member("t-c"), quiet=True, leaving=LeavingEntry(since=NOW - 600))
    reading = ecs_reading([member_view(member("t-a")), drained], capacity=2, steady=False)

    plan = plan_scaling(reading, 1)

    assert plan.unprotect == ()
    assert plan.protect == ()
    assert "Not removing t-c yet: a deployment is in progress (2 deployments)." in plan.notes


def test_ecs_records_no_protection() -> None:
    reading = ecs_reading(
        [member_view(member("t-a"), busy=3), member_view(member("t-b"))], capacity=2, recorded_protection=()
    )

    plan = plan_scaling(reading, 1)

    assert plan.leave == ("t-b",)
    assert set(plan.protect) == {"t-a", "t-b"}
    assert plan.record_protection == ()
    assert plan.forget_protection == ()


# --- EC2 protection that the backend set ---------------------------------------------------------------------------


def test_asg_records_what_it_protects() -> None:
    user_protected = member_view(member("i-c", protected=True), busy=5)
    views = [member_view(member("i-a"), busy=3), member_view(member("i-b")), user_protected]
    reading = asg_reading(views, capacity=3)

    plan = plan_scaling(reading, 2)

    assert plan.leave == ("i-b",)
    assert plan.protect == ("i-b", "i-a")
    assert plan.record_protection == ("i-b", "i-a")
    assert plan.unprotect == ()


def test_asg_release_waits_for_leavers() -> None:
    leaver = member_view(member("i-b", protected=True), busy=1, quiet=True, leaving=LeavingEntry(since=NOW - 60))
    keeper = member_view(member("i-a", protected=True), busy=3)
    reading = asg_reading([keeper, leaver], capacity=2, recorded_protection=("i-a", "i-b"))

    plan = plan_scaling(reading, 1)

    assert plan.unprotect == ()
    assert plan.forget_protection == ()


def test_asg_releases_recorded_only() -> None:
    ours = member_view(member("i-a", protected=True), busy=1)
    users = member_view(member("i-c", protected=True), busy=1)
    reading = asg_reading([ours, users], capacity=2, recorded_protection=("i-a", "i-gone"))

    plan = plan_scaling(reading, 2)

    assert plan.unprotect == ("i-a",)
    assert plan.forget_protection == ("i-a", "i-gone")
    assert plan.changed
    assert "Removing the scale-in protection that this backend set on i-a: no instance is leaving any more." in (
        plan.notes
    )


def test_asg_forgets_protection_removed_by_others() -> None:
    unprotected = member_view(member("i-a"), busy=1)
    reading = asg_reading([unprotected], capacity=1, recorded_protection=("i-a",))

    plan = plan_scaling(reading, 1)

    assert plan.unprotect == ()
    assert plan.forget_protection == ("i-a",)


def test_asg_reprotected_member_stays_recorded() -> None:
    # i-a is in the record but lost its protection. The new scale-in protects it again and keeps it recorded.
    keeper = member_view(member("i-a"), busy=3)
    reading = asg_reading([keeper, member_view(member("i-b"))], capacity=2, recorded_protection=("i-a",))

    plan = plan_scaling(reading, 1)

    assert plan.leave == ("i-b",)
    assert "i-a" in plan.protect
    assert "i-a" in plan.record_protection
    assert plan.forget_protection == ()


def test_drained_leaver_leaves_protection_record() -> None:
    drained = member_view(member("i-b", protected=True), quiet=True, leaving=LeavingEntry(since=NOW - 60))
    keeper = member_view(member("i-a", protected=True), busy=2)
    reading = asg_reading([keeper, drained], capacity=2, recorded_protection=("i-a", "i-b"))

    plan = plan_scaling(reading, 1)

    assert plan.unprotect == ("i-b",)
    assert plan.forget_protection == ("i-b",)
    assert [removal.member_id for removal in plan.remove] == ["i-b"]


# --- An Auto Scaling group over several runs ----------------------------------------------------------------------


class FakeRedis:
    """The Redis commands the backends send: hashes for the records, lists for Sidekiq's signals."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.lists: dict[str, list[str]] = {}

    def hgetall(self, key: str) -> dict[str, str]:
        return dict(self.hashes.get(key, {}))

    def hset(self, key: str, mapping: Mapping[str, str]) -> None:
        self.hashes.setdefault(key, {}).update(mapping)

    def hdel(self, key: str, *fields: str) -> None:
        for name in fields:
            self.hashes.get(key, {}).pop(name, None)

    def lpush(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).insert(0, value)

    def expire(self, key: str, seconds: int) -> None:
        pass

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    def leaving(self) -> dict[str, dict[str, Any]]:
        return {name: json.loads(value) for name, value in self.hgetall(LEAVING_KEY).items()}

    def recorded_protection(self) -> list[str]:
        return sorted(self.hgetall(PROTECTION_KEY))


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> None:
            self.commands.append((name, args, kwargs))

        return queue

    def execute(self) -> list[Any]:
        return [getattr(self.redis, name)(*args, **kwargs) for name, args, kwargs in self.commands]


class FakeAutoscaling:
    """An Auto Scaling group whose instances keep their scale-in protection between calls, as EC2 does."""

    def __init__(self, instance_ids: Sequence[str], protected: Sequence[str] = ()) -> None:
        self.capacity = len(instance_ids)
        self.protected = {instance_id: instance_id in protected for instance_id in instance_ids}
        self.terminated: list[str] = []

    def describe_auto_scaling_groups(self, AutoScalingGroupNames: list[str]) -> dict[str, Any]:
        instances = [
            {
                "InstanceId": instance_id,
                "LifecycleState": "InService",
                "ProtectedFromScaleIn": protected,
                "AvailabilityZone": "eu-west-1a",
            }
            for instance_id, protected in self.protected.items()
        ]
        group = {"DesiredCapacity": self.capacity, "MinSize": 0, "MaxSize": 10, "Instances": instances}
        return {"AutoScalingGroups": [group]}

    def set_instance_protection(self, InstanceIds: list[str], ProtectedFromScaleIn: bool, **_: Any) -> dict[str, Any]:
        for instance_id in InstanceIds:
            self.protected[instance_id] = ProtectedFromScaleIn
        return {}

    def terminate_instance_in_auto_scaling_group(
        self, InstanceId: str, ShouldDecrementDesiredCapacity: bool
    ) -> dict[str, Any]:
        del self.protected[InstanceId]
        self.terminated.append(InstanceId)
        if ShouldDecrementDesiredCapacity:
            self.capacity -= 1
        return {}

    def set_desired_capacity(self, DesiredCapacity: int, **_: Any) -> dict[str, Any]:
        self.capacity = DesiredCapacity
        return {}


class FakeEc2:
    def describe_instances(self, Filters: list[dict[str, Any]], **_: Any) -> dict[str, Any]:
        ids = Filters[0]["Values"]
        return {"Reservations": [{"Instances": [{"InstanceId": instance_id} for instance_id in ids]}]}


def asg_backend(autoscaling: FakeAutoscaling, pool: Mapping[str, Any] | None = None) -> AsgBackend:
    settings = AwsSettings(region="eu-west-1")
    return AsgBackend(
        settings,
        GROUP,
        autoscaling=AwsApi(autoscaling, settings, "aws_asg", ()),
        ec2=AwsApi(FakeEc2(), settings, "aws_asg", ()),
        pool=pool,
        margin=10,
    )


def test_asg_scale_in_releases_keeper_protection() -> None:
    autoscaling = FakeAutoscaling(["i-a", "i-b", "i-c"])
    scaler = asg_backend(autoscaling)
    redis = FakeRedis()

    # Run 1 chooses the idle i-b to leave and protects it and the busy i-a and i-c.
    reading = scaler.read([process("i-a", busy=3), process("i-b"), process("i-c", busy=2)], redis, now=NOW)
    scaler.apply(scaler.plan(reading, 2), redis)
    assert autoscaling.protected == {"i-a": True, "i-b": True, "i-c": True}
    assert redis.recorded_protection() == ["i-a", "i-b", "i-c"]

    # Run 2 finds i-b quiet and idle and terminates it. i-a and i-c stay protected for one more run.
    processes = [process("i-a", busy=3), process("i-b", quiet=True), process("i-c", busy=2)]
    scaler.apply(scaler.plan(scaler.read(processes, redis, now=NOW + 60), 2), redis)
    assert autoscaling.terminated == ["i-b"]
    assert redis.recorded_protection() == ["i-a", "i-c"]

    # Run 3 finds nothing leaving and takes the protection off.
    plan = scaler.plan(scaler.read([process("i-a", busy=1), process("i-c", busy=1)], redis, now=NOW + 120), 2)
    result = scaler.apply(plan, redis)

    assert autoscaling.protected == {"i-a": False, "i-c": False}
    assert redis.recorded_protection() == []
    assert result.actions == ("Removed scale-in protection from i-a, i-c.",)

    # Run 4 has nothing left to do.
    last = scaler.plan(scaler.read([process("i-a", busy=1), process("i-c", busy=1)], redis, now=NOW + 180), 2)
    assert not last.changed


def test_asg_keeps_user_protection() -> None:
    autoscaling = FakeAutoscaling(["i-a", "i-b", "i-c"], protected=["i-c"])
    scaler = asg_backend(autoscaling)
    redis = FakeRedis()
    runs = [
        [process("i-a", busy=3), process("i-b"), process("i-c", busy=2)],
        [process("i-a", busy=3), process("i-b", quiet=True), process("i-c", busy=2)],
        [process("i-a"), process("i-c")],
    ]

    for number, processes in enumerate(runs):
        scaler.apply(scaler.plan(scaler.read(processes, redis, now=NOW + 60 * number), 2), redis)

    assert autoscaling.terminated == ["i-b"]
    assert autoscaling.protected == {"i-a": False, "i-c": True}
    assert redis.recorded_protection() == []


def test_asg_waits_for_vanished_process() -> None:
    autoscaling = FakeAutoscaling(["i-a", "i-b"])
    scaler = asg_backend(autoscaling, pool={"name": "default", "timeout": 100})
    redis = FakeRedis()
    scaler.apply(scaler.plan(scaler.read([process("i-a", busy=3), process("i-b")], redis, now=NOW), 1), redis)
    assert list(redis.leaving()) == ["i-b"]

    # i-b's heartbeat is gone: it may still run jobs, so it stays until the stop budget (110 s) and the
    # heartbeat expiry (60 s) have passed since the first run that missed it.
    for offset in (60, 120, 229):
        plan = scaler.plan(scaler.read([process("i-a", busy=3)], redis, now=NOW + offset), 1)
        scaler.apply(plan, redis)
        assert plan.remove == ()
        assert autoscaling.terminated == []
        assert autoscaling.protected["i-b"] is True
        assert redis.leaving()["i-b"]["gone_since"] == NOW + 60

    plan = scaler.plan(scaler.read([process("i-a", busy=3)], redis, now=NOW + 231), 1)
    result = scaler.apply(plan, redis)

    assert autoscaling.terminated == ["i-b"]
    assert autoscaling.capacity == 1
    assert redis.leaving() == {}
    assert "Terminated i-b, lowering the desired capacity." in result.actions


def test_asg_returned_process_restarts_clock() -> None:
    autoscaling = FakeAutoscaling(["i-a", "i-b"])
    scaler = asg_backend(autoscaling)
    redis = FakeRedis()
    scaler.apply(scaler.plan(scaler.read([process("i-a"), process("i-b", busy=1)], redis, now=NOW), 1), redis)
    (leaver,) = redis.leaving()
    keeper = "i-a" if leaver == "i-b" else "i-b"

    missing = scaler.plan(scaler.read([process(keeper)], redis, now=NOW + 30), 1)
    result = scaler.apply(missing, redis)
    assert redis.leaving()[leaver]["gone_since"] == NOW + 30
    assert f"Updated the leaving records of {leaver}." in result.actions

    scaler.apply(scaler.plan(scaler.read([process(keeper), process(leaver, busy=2)], redis, now=NOW + 60), 1), redis)
    assert "gone_since" not in redis.leaving()[leaver]

    plan = scaler.plan(scaler.read([process(keeper)], redis, now=NOW + 200), 1)
    scaler.apply(plan, redis)
    assert plan.remove == ()
    assert redis.leaving()[leaver]["gone_since"] == NOW + 200
    assert autoscaling.terminated == []
