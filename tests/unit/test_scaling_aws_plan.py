"""Tests of the AWS backends' pure core: matching processes to members, and the plan of one run."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from process_states import process_state  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import (
    INSTANCE_LABEL,
    TASK_LABEL,
    LeavingEntry,
    Member,
    MemberView,
    ScalingReading,
    build_views,
    choose_leavers,
    is_drained,
    match_processes,
    plan_scaling,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

NOW = 1_800_000_000.0


def process(
    identity: str,
    busy: int = 0,
    quiet: bool = False,
    labels: tuple[str, ...] = (),
    live: bool = True,
    hostname: str | None = None,
) -> ProcessState:
    host = hostname if hostname is not None else identity.split(":")[0]
    return process_state(
        host,
        beat=NOW,
        identity=identity,
        pid=int(identity.split(":")[1]),
        busy=busy,
        quiet=quiet,
        live=live,
        concurrency=5,
        labels=labels,
    )


def instance(instance_id: str, ready: bool = True, protected: bool = False, **options: Any) -> Member:
    return Member(
        id=instance_id,
        label_ids=(instance_id,),
        state="InService" if ready else "Pending",
        ready=ready,
        protected=protected,
        hostnames=options.pop("hostnames", (f"ip-{instance_id}.ec2.internal",)),
        **options,
    )


def view(
    member: Member, busy: int | None = 0, quiet: bool = False, leaving: LeavingEntry | None = None, pid: int = 100
) -> MemberView:
    """A member with one process of `busy` threads, or with none when busy is None."""
    processes = () if busy is None else (process(f"ip-{member.id}:{pid}:abc", busy=busy, quiet=quiet),)
    return MemberView(member=member, processes=processes, leaving=leaving)


def asg_reading(
    views: list[MemberView], capacity: int, minimum: int = 0, maximum: int = 10, **fields: Any
) -> ScalingReading:
    return ScalingReading(
        backend="aws_asg",
        target="Auto Scaling group 'sidekiq-default'",
        unit="instance",
        capacity=capacity,
        min_capacity=minimum,
        max_capacity=maximum,
        per_member=fields.pop("per_member", 1),
        members=tuple(views),
        exact_removal=True,
        now=NOW,
        **fields,
    )


def ecs_reading(views: list[MemberView], capacity: int, steady: bool = True, **fields: Any) -> ScalingReading:
    return ScalingReading(
        backend="aws_ecs",
        target="ECS service 'sidekiq-default' in cluster 'shop'",
        unit="task",
        capacity=capacity,
        min_capacity=0,
        max_capacity=None,
        per_member=1,
        members=tuple(views),
        steady=steady,
        unsteady_reason=None if steady else "a deployment is in progress (2 deployments).",
        exact_removal=False,
        protection_minutes=10,
        now=NOW,
        **fields,
    )


LEAVING = LeavingEntry(since=NOW - 60)


# Matching


def test_match_label_wins_over_hostname() -> None:
    members = [instance("i-a", hostnames=("shared",)), instance("i-b", hostnames=("shared",))]
    labelled = process("shared:1:x", labels=("env=prod", f"{INSTANCE_LABEL}=i-b"))

    matched, notes = match_processes(members, [labelled], INSTANCE_LABEL)

    assert matched == {"i-a": [], "i-b": [labelled]}
    assert notes == []


def test_match_hostname_full_and_short() -> None:
    members = [instance("i-a", hostnames=("ip-10-0-0-1.ec2.internal",)), instance("i-b", hostnames=("ip-10-0-0-2",))]
    short = process("ip-10-0-0-1:1:x")
    full = process("IP-10-0-0-2.eu-west-1.compute.internal:2:y")

    matched, notes = match_processes(members, [short, full], INSTANCE_LABEL)

    assert matched["i-a"] == [short]
    assert matched["i-b"] == [full]
    assert notes == []


def test_match_ambiguous_hostname_matches_nothing() -> None:
    members = [instance("i-a", hostnames=("host-1",)), instance("i-b", hostnames=("host-1",))]

    matched, notes = match_processes(members, [process("host-1:7:z")], INSTANCE_LABEL)

    assert matched == {"i-a": [], "i-b": []}
    assert len(notes) == 1
    assert "several members" in notes[0]
    assert "host-1:7:z" in notes[0]


def test_match_skips_stale_and_reports_strangers() -> None:
    members = [instance("i-a")]
    stale = process("ip-i-a:1:old", live=False)
    stranger = process("elsewhere:2:x")
    wrong_label = process("ip-i-a:3:y", labels=(f"{INSTANCE_LABEL}=i-unknown",))

    matched, notes = match_processes(members, [stale, stranger, wrong_label], INSTANCE_LABEL)

    assert matched == {"i-a": []}
    assert len(notes) == 1
    assert "2 live processes of the pool belong to no member" in notes[0]


def test_match_task_label_accepts_id_and_arn() -> None:
    arn = "arn:aws:ecs:eu-west-1:123456789012:task/shop/0123456789abcdef0123456789abcdef"
    task = Member(id=arn, label_ids=(arn.rsplit("/", 1)[-1], arn), state="RUNNING", ready=True, protected=False)
    by_id = process("c0ffee:1:a", labels=(f"{TASK_LABEL}=0123456789abcdef0123456789abcdef",))
    by_arn = process("c0ffee:2:b", labels=(f"{TASK_LABEL}={arn}",))

    matched, _ = match_processes([task], [by_id, by_arn], TASK_LABEL)

    assert matched[arn] == [by_id, by_arn]


def test_build_views_reports_stale_and_silent() -> None:
    members = [instance("i-a"), instance("i-b")]
    leaving = {"i-a": LEAVING, "i-gone": LEAVING}

    views, notes, gone = build_views(members, [process("ip-i-a.ec2.internal:1:x")], leaving, INSTANCE_LABEL)

    assert [item.leaving for item in views] == [LEAVING, None]
    assert gone == ("i-gone",)
    assert any("1 member runs no live Sidekiq process" in note and "i-b" in note for note in notes)


def test_leaving_entry_json_round_trip() -> None:
    entry = LeavingEntry(since=NOW, removed=True)

    assert LeavingEntry.from_json(entry.to_json()) == entry
    assert LeavingEntry.from_json(b'{"since": 5}') == LeavingEntry(since=5.0)
    assert LeavingEntry.from_json("not json") is None
    assert LeavingEntry.from_json('{"removed": true}') is None


# Member views


def test_drained_needs_quiet_and_idle_in_same_beat() -> None:
    member = instance("i-a")
    reading = asg_reading([], capacity=1)

    assert is_drained(view(member, busy=0, quiet=True, leaving=LEAVING), reading)
    assert not is_drained(view(member, busy=1, quiet=True, leaving=LEAVING), reading)
    assert not is_drained(view(member, busy=0, quiet=False, leaving=LEAVING), reading)
    assert not is_drained(view(member, busy=0, quiet=True, leaving=None), reading)
    assert not is_drained(view(member, busy=None, leaving=LEAVING), reading)


def test_busy_counts_work_hash_when_heartbeat_lags() -> None:
    lagging = replace(process("h:1:x"), busy=0, busy_by_queue={"default": 2})

    assert MemberView(member=instance("i-a"), processes=(lagging,)).busy == 2


# Scale-out


def test_asg_scale_out_sets_capacity() -> None:
    reading = asg_reading([view(instance("i-a"), busy=5)], capacity=1, maximum=4)

    plan = plan_scaling(reading, 3)

    assert plan.capacity_after == 3
    assert plan.set_capacity
    assert plan.requested_before == 1
    assert plan.requested_after == 3
    assert plan.leave == ()
    assert plan.protect == ()
    assert "goes from 1 to 3 instances" in " ".join(plan.notes)


def test_asg_scale_out_clamps_to_max() -> None:
    reading = asg_reading([view(instance("i-a"))], capacity=1, maximum=4)

    plan = plan_scaling(reading, 9)

    assert plan.capacity_after == 4
    assert any("above the maximum of 4" in note for note in plan.notes)


def test_asg_processes_per_instance_round_up() -> None:
    reading = asg_reading([view(instance("i-a"))], capacity=1, per_member=4)

    plan = plan_scaling(reading, 9)

    assert plan.capacity_after == 3
    assert plan.requested_after == 12


def test_scale_out_while_leaving_keeps_leavers() -> None:
    leaving = view(instance("i-a", protected=True), busy=2, quiet=True, leaving=LEAVING)
    reading = asg_reading([leaving, view(instance("i-b"))], capacity=2, maximum=3)

    plan = plan_scaling(reading, 3)

    assert reading.requested_processes == 1
    assert plan.capacity_after == 3
    assert plan.remove == ()
    assert any("follow once the leaving ones are gone" in note for note in plan.notes)


# Scale-in on EC2


def test_asg_scale_in_quiets_least_busy() -> None:
    views = [view(instance("i-a"), busy=3), view(instance("i-b"), busy=0, pid=2), view(instance("i-c"), busy=1, pid=3)]
    reading = asg_reading(views, capacity=3)

    plan = plan_scaling(reading, 1)

    assert plan.leave == ("i-b", "i-c")
    assert [member for member, _ in plan.record] == ["i-b", "i-c"]
    assert plan.capacity_after == 3
    assert not plan.set_capacity
    assert plan.remove == ()
    assert dict(plan.quiet) == {"i-b": ("ip-i-b:2:abc",), "i-c": ("ip-i-c:3:abc",)}
    assert set(plan.protect) == {"i-a", "i-b", "i-c"}
    assert plan.requested_after == 1


def test_asg_scale_in_respects_min() -> None:
    views = [view(instance("i-a")), view(instance("i-b"), pid=2)]
    reading = asg_reading(views, capacity=2, minimum=2)

    plan = plan_scaling(reading, 0)

    assert plan.leave == ()
    assert not plan.changed
    assert any("below the minimum of 2" in note for note in plan.notes)


def test_asg_removes_drained_leaver() -> None:
    drained = view(instance("i-b", protected=True), busy=0, quiet=True, leaving=LEAVING, pid=2)
    reading = asg_reading([view(instance("i-a", protected=True), busy=2), drained], capacity=2)

    plan = plan_scaling(reading, 1)

    assert [(removal.member_id, removal.decrement) for removal in plan.remove] == [("i-b", True)]
    assert plan.unprotect == ("i-b",)
    assert plan.capacity_after == 1
    assert not plan.set_capacity
    assert plan.protect == ()
    assert plan.record == ()


def test_asg_waits_for_busy_leaver() -> None:
    busy_leaver = view(instance("i-b", protected=True), busy=2, quiet=True, leaving=LEAVING, pid=2)
    reading = asg_reading([view(instance("i-a")), busy_leaver], capacity=2)

    plan = plan_scaling(reading, 1)

    assert plan.remove == ()
    assert plan.unprotect == ()
    assert plan.protect == ()
    assert plan.quiet == ()
    assert any("Waiting for i-b to finish 2 running jobs" in note for note in plan.notes)


def test_asg_requiets_restarted_process() -> None:
    member = instance("i-b", protected=True)
    restarted = MemberView(member=member, processes=(process("ip-i-b:9:new", busy=0),), leaving=LEAVING)
    reading = asg_reading([view(instance("i-a")), restarted], capacity=2)

    plan = plan_scaling(reading, 1)

    assert plan.quiet == (("i-b", ("ip-i-b:9:new",)),)
    assert plan.remove == ()


def test_asg_replaces_drained_below_min() -> None:
    drained = view(instance("i-b"), busy=0, quiet=True, leaving=LEAVING, pid=2)
    reading = asg_reading([view(instance("i-a")), drained], capacity=2, minimum=2)

    plan = plan_scaling(reading, 2)

    assert [(removal.member_id, removal.decrement) for removal in plan.remove] == [("i-b", False)]
    assert plan.capacity_after == 2
    assert not plan.set_capacity
    assert any("replaced instead of removed" in note for note in plan.notes)


def test_never_chooses_unmatched_or_pending() -> None:
    views = [view(instance("i-a"), busy=4), view(instance("i-b"), busy=None), view(instance("i-c", ready=False))]
    reading = asg_reading(views, capacity=3)

    plan = plan_scaling(reading, 1)

    assert plan.leave == ("i-a",)
    assert any("Only 1 of 2 instances" in note for note in plan.notes)


def test_choose_leavers_quiet_zone_then_newest() -> None:
    views = [
        view(instance("i-a", zone="a", launched_at=1.0), busy=0),
        view(instance("i-b", zone="a", launched_at=2.0), busy=0, pid=2),
        view(instance("i-c", zone="b", launched_at=3.0), busy=0, pid=3),
        view(instance("i-d", zone="b", launched_at=0.0), busy=1, quiet=True, pid=4),
    ]

    chosen = choose_leavers(views, 3)

    assert [item.member.id for item in chosen] == ["i-d", "i-b", "i-c"]


def test_plan_rejects_negative_desired() -> None:
    with pytest.raises(ValueError, match="desired_processes -1 is invalid"):
        plan_scaling(asg_reading([], capacity=0), -1)


# Scale-in on ECS


def test_ecs_removal_protects_keepers_and_lowers_count() -> None:
    keeper = view(instance("t-a"), busy=0)
    busy_keeper = view(instance("t-b", protected=True, protection_expires=NOW + 540), busy=3, pid=2)
    drained = view(instance("t-c", protected=True, protection_expires=NOW + 300), quiet=True, leaving=LEAVING, pid=3)
    reading = ecs_reading([keeper, busy_keeper, drained], capacity=3)

    plan = plan_scaling(reading, 2)

    assert plan.capacity_after == 2
    assert plan.set_capacity
    assert plan.protect == ("t-a",)
    assert plan.unprotect == ("t-c",)
    assert plan.remove[0].member_id == "t-c"
    assert plan.record == (("t-c", LeavingEntry(since=LEAVING.since, removed=True)),)


def test_ecs_renews_protection_past_half() -> None:
    old = view(instance("t-b", protected=True, protection_expires=NOW + 240), busy=1, quiet=True, leaving=LEAVING)
    fresh = view(instance("t-c", protected=True, protection_expires=NOW + 500), busy=1, quiet=True, leaving=LEAVING)
    reading = ecs_reading([view(instance("t-a"), pid=9), old, fresh], capacity=3)

    plan = plan_scaling(reading, 1)

    assert plan.protect == ("t-b",)
    assert plan.remove == ()


def test_ecs_unsteady_holds_scale_in() -> None:
    drained = view(instance("t-c", protected=True), quiet=True, leaving=LEAVING, pid=3)
    reading = ecs_reading([view(instance("t-a")), view(instance("t-b"), pid=2), drained], capacity=3, steady=False)

    plan = plan_scaling(reading, 1)

    assert plan.leave == ()
    assert plan.remove == ()
    assert not plan.set_capacity
    assert any("Not removing t-c yet: a deployment is in progress" in note for note in plan.notes)
    assert any("Not choosing tasks to leave" in note for note in plan.notes)


def test_ecs_unsteady_still_scales_out() -> None:
    reading = ecs_reading([view(instance("t-a"))], capacity=1, steady=False)

    plan = plan_scaling(reading, 3)

    assert plan.capacity_after == 3
    assert plan.set_capacity


def test_ecs_removed_task_not_counted_twice() -> None:
    removed = view(instance("t-c"), quiet=True, leaving=LeavingEntry(since=NOW - 60, removed=True), pid=3)
    reading = ecs_reading([view(instance("t-a")), view(instance("t-b"), pid=2), removed], capacity=2, steady=False)

    plan = plan_scaling(reading, 2)

    assert reading.requested_processes == 2
    assert not plan.changed


def test_ecs_kept_removed_task_counts_again() -> None:
    zombie = view(instance("t-c", protected=True), busy=1, quiet=True, leaving=LeavingEntry(since=NOW, removed=True))
    reading = ecs_reading([view(instance("t-a")), zombie], capacity=2)

    plan = plan_scaling(reading, 1)

    assert plan.reset == ("t-c",)
    assert plan.record == (("t-c", LeavingEntry(since=NOW, removed=False)),)
    assert plan.capacity_after == 2
    assert not plan.set_capacity
    assert any("ECS kept t-c" in note for note in plan.notes)


def test_forget_stale_records() -> None:
    reading = asg_reading([view(instance("i-a"))], capacity=1, stale_records=("i-old",))

    plan = plan_scaling(reading, 1)

    assert plan.forget == ("i-old",)
    assert plan.changed
