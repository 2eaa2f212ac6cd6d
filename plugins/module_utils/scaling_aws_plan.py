"""The AWS backends' common core: members, their Sidekiq processes, and the plan of one run. Pure, no I/O.

A member is what the platform starts and stops: an EC2 instance of an Auto Scaling group, or a task of an ECS
service. Each member runs `per_member` Sidekiq processes of the pool (one by default).

Processes are matched to members in this order:

1. A Sidekiq label ``instance-id=<id>`` (EC2) or ``task-id=<id>`` (ECS, the last part of the task ARN, or the
   whole ARN). Set it in sidekiq.yml (``:labels: ["instance-id=<%= ENV['EC2_INSTANCE_ID'] %>"]``) or in app code.
2. The process's hostname, which Sidekiq 6.4 takes from ``Socket.gethostname`` (or ``DYNO``) and writes into
   its identity. It matches an instance's private DNS name, that name's first label (``ip-10-0-1-23``), or the
   instance id (resource-name hostnames). It matches a task's network interface name or ``ip-a-b-c-d`` address
   name (awsvpc), or the first 12 characters of its container id (bridge mode). A hostname that fits several
   members matches none of them, so tasks that share a host's network need labels.

`plan_scaling` turns a reading and the policy's desired process count into a plan. Chosen members leave in two
runs or more, so that no job is lost: a run records them as leaving, protects them from scale-in and quiets
their processes; a later run removes those that are drained. A member is drained when every process matched
to it reports quiet with no busy thread. A process that is missing from the reading (its heartbeat stopped, its
tag changed, or it restarted) may still be running jobs, so a member that lacks processes is drained only once
they have been missing for longer than the pool's stop budget plus Sidekiq's 60 s heartbeat expiry. Protection
rules and the order of the API calls are in the module ``scaling_aws``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.pools import DEFAULT_SHUTDOWN_MARGIN, DEFAULT_TIMEOUT
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    STALE_AFTER_SECONDS,
    ProcessState,
)

INSTANCE_LABEL = "instance-id"
TASK_LABEL = "task-id"


@dataclass(frozen=True)
class Member:
    """One EC2 instance or ECS task that the group or service counts.

    Attributes:
        id: the instance id, or the task ARN.
        label_ids: the values a Sidekiq label may carry to name this member (instance id; task id and ARN).
        state: the lifecycle state (EC2) or last status (ECS), for messages.
        ready: in service (EC2) or running (ECS): it can be protected, chosen to leave and removed.
        protected: whether scale-in protection is on.
        protection_expires: epoch seconds when ECS task protection lapses; None when off or without expiry.
        zone: availability zone, used to keep zones balanced when members are chosen to leave.
        launched_at: epoch seconds of the launch, used to choose the newest of equally busy members.
        hostnames: lowercase hostnames that a Sidekiq process on this member may report.
    """

    id: str
    label_ids: tuple[str, ...]
    state: str
    ready: bool
    protected: bool
    protection_expires: float | None = None
    zone: str | None = None
    launched_at: float | None = None
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True)
class LeavingEntry:
    """The record that a member was chosen to leave, kept in Redis between runs.

    Attributes:
        since: epoch seconds when the member was chosen.
        removed: ECS only: the service's desired count was already lowered for this task.
        gone_since: epoch seconds of the first reading that showed fewer live processes on the member than it
            runs; None while all of them are seen. Entries written before this field existed load as None.
    """

    since: float
    removed: bool = False
    gone_since: float | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"since": self.since, "removed": self.removed}
        if self.gone_since is not None:
            data["gone_since"] = self.gone_since
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> LeavingEntry | None:
        """Load an entry; None when the text is not an entry, so the caller drops it."""
        try:
            data = json.loads(text)
            gone_since = data.get("gone_since")
            return cls(
                since=float(data["since"]),
                removed=bool(data.get("removed", False)),
                gone_since=None if gone_since is None else float(gone_since),
            )
        except (TypeError, ValueError, KeyError, AttributeError):
            return None


def process_busy(process: ProcessState) -> int:
    """Return the busy threads of a process: the larger of its heartbeat count and its work hash."""
    return max(process.busy, sum(process.busy_by_queue.values()))


@dataclass(frozen=True)
class MemberView:
    """A member with the live Sidekiq processes matched to it and its leaving record."""

    member: Member
    processes: tuple[ProcessState, ...] = ()
    leaving: LeavingEntry | None = None

    @property
    def busy(self) -> int:
        return sum(process_busy(process) for process in self.processes)

    @property
    def quiet(self) -> bool:
        """Whether the member runs processes and every one of them is quiet."""
        return bool(self.processes) and all(process.quiet for process in self.processes)

    @property
    def quiet_and_idle(self) -> bool:
        """True when every matched process reports quiet with no busy thread, and when none is matched.

        Sidekiq 6.4 acts on a remote signal at the end of a heartbeat and writes ``quiet`` and ``busy`` together in
        the next one. A fetch that returns after the quiet signal puts its job back, so a process that reports
        quiet with no busy thread runs no job.
        """
        return all(process.quiet and process_busy(process) == 0 for process in self.processes)

    @property
    def unquieted(self) -> tuple[str, ...]:
        """Identities of the member's processes that are not quiet yet."""
        return tuple(process.identity for process in self.processes if not process.quiet)


def _hostname_keys(hostname: str) -> tuple[str, ...]:
    name = hostname.strip().lower().rstrip(".")
    short = name.split(".", 1)[0]
    return (name, short) if short != name else (name,)


def _label_values(process: ProcessState, key: str) -> list[str]:
    prefix = f"{key}="
    return [label[len(prefix) :].strip() for label in process.labels if label.startswith(prefix)]


def match_processes(
    members: Sequence[Member], processes: Iterable[ProcessState], label_key: str
) -> tuple[dict[str, list[ProcessState]], list[str]]:
    """Match the pool's live processes to members by label, then by hostname; return the matches and notes."""
    by_label: dict[str, str] = {}
    by_hostname: dict[str, set[str]] = {}
    for member in members:
        for value in member.label_ids:
            by_label[value] = member.id
        for hostname in member.hostnames:
            for key in _hostname_keys(hostname):
                by_hostname.setdefault(key, set()).add(member.id)

    matched: dict[str, list[ProcessState]] = {member.id: [] for member in members}
    unmatched: list[str] = []
    ambiguous: list[str] = []
    for process in processes:
        if not process.live:
            continue
        labelled = _label_values(process, label_key)
        if labelled:
            owner = next((by_label[value] for value in labelled if value in by_label), None)
            if owner is None:
                unmatched.append(process.identity)
            else:
                matched[owner].append(process)
            continue
        owners: set[str] = set()
        for key in _hostname_keys(process.hostname or ""):
            owners |= by_hostname.get(key, set())
        if len(owners) == 1:
            matched[owners.pop()].append(process)
        elif owners:
            ambiguous.append(process.identity)
        else:
            unmatched.append(process.identity)

    notes: list[str] = []
    if ambiguous:
        notes.append(
            f"{len(ambiguous)} live processes have a hostname that fits several members ({_sample(ambiguous)}); "
            f"give them a '{label_key}=<id>' label so they can be matched."
        )
    if unmatched:
        notes.append(
            f"{len(unmatched)} live processes of the pool belong to no member ({_sample(unmatched)}); they are "
            f"never quieted by this backend. Check their '{label_key}' label or hostname."
        )
    return matched, notes


def _sample(items: Sequence[str], limit: int = 3) -> str:
    listed = ", ".join(items[:limit])
    return listed + (f" and {len(items) - limit} more" if len(items) > limit else "")


def build_views(
    members: Sequence[Member],
    processes: Iterable[ProcessState],
    leaving: Mapping[str, LeavingEntry],
    label_key: str,
) -> tuple[tuple[MemberView, ...], list[str], tuple[str, ...]]:
    """Join members, processes and leaving records; return the views, notes, and the records of missing members."""
    matched, notes = match_processes(members, processes, label_key)
    views = tuple(
        MemberView(member=member, processes=tuple(matched[member.id]), leaving=leaving.get(member.id))
        for member in members
    )
    silent = [view.member.id for view in views if view.member.ready and not view.processes and not view.leaving]
    if silent:
        notes.append(
            f"{len(silent)} {'member runs' if len(silent) == 1 else 'members run'} no live Sidekiq process of the "
            f"pool ({_sample(silent)}): still booting, or the '{label_key}' label or hostname does not match. Such "
            "members are never chosen to leave."
        )
    present = {member.id for member in members}
    stale = tuple(sorted(member_id for member_id in leaving if member_id not in present))
    return views, notes, stale


@dataclass(frozen=True)
class ScalingReading:
    """The reading of one run: an Auto Scaling group or ECS service, its members and their processes.

    Attributes:
        backend: ``aws_asg`` or ``aws_ecs``.
        target: the resource in words, for messages (``Auto Scaling group 'sidekiq-default'``).
        unit: what a member is called in messages (``instance`` or ``task``).
        capacity: the group's desired capacity or the service's desired count, in members.
        min_capacity, max_capacity: the group's MinSize and MaxSize; 0 and None for a service.
        per_member: Sidekiq processes per member.
        members: the counted members, with processes and leaving records.
        steady: whether members may be chosen to leave and removed now (ECS: no deployment in progress, and
            every task counted by the desired count is running).
        unsteady_reason: why not, as a sentence.
        exact_removal: True when the platform removes a named member (EC2 TerminateInstanceInAutoScalingGroup);
            False when the platform chooses among unprotected members (ECS lowers the desired count).
        protection_minutes: ECS task protection lasts this long and is renewed at half; None for EC2, whose
            protection does not expire.
        stop_budget: seconds the pool's processes may take to stop (timeout plus shutdown margin). A leaving
            member whose processes are missing from the reading counts as drained only after this plus the
            heartbeat expiry.
        records_protection: True when the backend records the members it protects and takes that protection off
            once no member is leaving (EC2, whose protection never expires).
        recorded_protection: ids of the members in that record, loaded from Redis.
        stale_records: leaving records of members that no longer exist, to delete.
        notes: sentences about matching and configuration.
        now: epoch seconds of the reading.
    """

    backend: str
    target: str
    unit: str
    capacity: int
    min_capacity: int
    max_capacity: int | None
    per_member: int
    members: tuple[MemberView, ...]
    steady: bool = True
    unsteady_reason: str | None = None
    exact_removal: bool = True
    protection_minutes: int | None = None
    stop_budget: int = DEFAULT_TIMEOUT + DEFAULT_SHUTDOWN_MARGIN
    records_protection: bool = False
    recorded_protection: tuple[str, ...] = ()
    stale_records: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    now: float = 0.0

    @property
    def missing_limit(self) -> float:
        """Seconds a leaving member's processes must be missing before it counts as drained without them.

        Sidekiq 6.4 deletes a process's heartbeat hash 60 s after its last beat, so a process drops out of the
        reading up to 60 s after it stopped beating, and it may have begun its stop budget only then.
        """
        return self.stop_budget + STALE_AFTER_SECONDS

    @property
    def leaving(self) -> tuple[MemberView, ...]:
        """Members chosen to leave that still count in the capacity."""
        return tuple(view for view in self.members if view.leaving and not view.leaving.removed)

    @property
    def requested_processes(self) -> int:
        """The process count the backend is set to, without leaving members: the policy's `requested` signal."""
        return max(self.capacity - len(self.leaving), 0) * self.per_member

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "target": self.target,
            "capacity": self.capacity,
            "min_capacity": self.min_capacity,
            "max_capacity": self.max_capacity,
            "per_member": self.per_member,
            "requested_processes": self.requested_processes,
            "steady": self.steady,
            "stop_budget": self.stop_budget,
            "members": [
                {
                    "id": view.member.id,
                    "state": view.member.state,
                    "protected": view.member.protected,
                    "processes": [process.identity for process in view.processes],
                    "busy": view.busy,
                    "quiet": view.quiet,
                    "leaving": view.leaving is not None,
                    "gone_since": view.leaving.gone_since if view.leaving else None,
                }
                for view in self.members
            ],
            "recorded_protection": list(self.recorded_protection),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Removal:
    """A drained member to remove. `decrement` lowers the desired capacity with it (EC2); False replaces it."""

    member_id: str
    decrement: bool = True


@dataclass(frozen=True)
class ScalingPlan:
    """The changes of one run, in the order `apply` makes them, with the sentences that explain them.

    Attributes:
        capacity_after: the desired capacity or count once the run's changes are made.
        set_capacity: whether a SetDesiredCapacity or UpdateService call is needed for it (EC2 removals lower
            the capacity by themselves).
        leave: members newly chosen to leave.
        record: leaving entries to write before anything else: the new leavers, and on ECS the tasks whose
            removal this run makes (removed) or undoes (reset).
        protect, unprotect: members whose scale-in protection is turned on (or renewed) or off.
        record_protection: members to add to the protection record before their protection is turned on.
        forget_protection: members to delete from the protection record: unprotected by this run, gone, or
            found without protection.
        quiet: (member id, process identities) to send TSTP to.
        remove: drained members to remove.
        reset: ECS tasks recorded as removed that are still counted by the service (ECS stopped another task),
            to count as leaving again.
        forget: leaving records to delete because the member is gone.
    """

    backend: str
    target: str
    unit: str
    desired_processes: int
    capacity_before: int
    capacity_after: int
    set_capacity: bool
    requested_before: int
    requested_after: int
    leave: tuple[str, ...] = ()
    record: tuple[tuple[str, LeavingEntry], ...] = ()
    protect: tuple[str, ...] = ()
    unprotect: tuple[str, ...] = ()
    record_protection: tuple[str, ...] = ()
    forget_protection: tuple[str, ...] = ()
    quiet: tuple[tuple[str, tuple[str, ...]], ...] = ()
    remove: tuple[Removal, ...] = ()
    reset: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether applying the plan changes anything in AWS or Redis."""
        return bool(
            self.set_capacity
            or self.leave
            or self.record
            or self.protect
            or self.unprotect
            or self.record_protection
            or self.forget_protection
            or self.quiet
            or self.remove
            or self.reset
            or self.forget
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "target": self.target,
            "desired_processes": self.desired_processes,
            "capacity_before": self.capacity_before,
            "capacity_after": self.capacity_after,
            "requested_before": self.requested_before,
            "requested_after": self.requested_after,
            "leave": list(self.leave),
            "record": {
                member: {"since": entry.since, "removed": entry.removed, "gone_since": entry.gone_since}
                for member, entry in self.record
            },
            "protect": list(self.protect),
            "unprotect": list(self.unprotect),
            "record_protection": list(self.record_protection),
            "forget_protection": list(self.forget_protection),
            "quiet": {member: list(identities) for member, identities in self.quiet},
            "remove": [{"id": removal.member_id, "decrement": removal.decrement} for removal in self.remove],
            "reset": list(self.reset),
            "forget": list(self.forget),
            "changed": self.changed,
            "notes": list(self.notes),
        }


def members_for(processes: int, per_member: int) -> int:
    """Return the members that run `processes` processes, rounding up."""
    return math.ceil(max(processes, 0) / per_member)


def choose_leavers(candidates: Sequence[MemberView], count: int) -> list[MemberView]:
    """Choose `count` members to leave, one at a time: quiet ones first, then the least busy.

    Among equally busy members the one in the zone with the most remaining candidates goes first, so zones stay
    balanced, then the newest, then the lowest id, so that the choice is stable from run to run.
    """
    remaining: dict[str | None, int] = {}
    for view in candidates:
        remaining[view.member.zone] = remaining.get(view.member.zone, 0) + 1
    pool = list(candidates)
    chosen: list[MemberView] = []

    def order(view: MemberView) -> tuple[Any, ...]:
        launched = view.member.launched_at if view.member.launched_at is not None else 0.0
        return (not view.quiet, view.busy, -remaining[view.member.zone], -launched, view.member.id)

    while pool and len(chosen) < count:
        best = min(pool, key=order)
        pool.remove(best)
        remaining[best.member.zone] -= 1
        chosen.append(best)
    return chosen


def _needs_protection(view: MemberView, reading: ScalingReading) -> bool:
    """Whether a ready member must get protection now: it has none, or ECS protection passed half its term."""
    member = view.member
    if not member.ready:
        return False
    if not member.protected:
        return True
    if reading.protection_minutes is None or member.protection_expires is None:
        return False
    return member.protection_expires - reading.now < reading.protection_minutes * 60 / 2


def _ids(views: Iterable[MemberView]) -> str:
    return ", ".join(view.member.id for view in views)


def _leaving_views(reading: ScalingReading, notes: list[str]) -> tuple[list[MemberView], list[MemberView]]:
    """Return the leaving members that still count in the capacity, and the ECS tasks counted again among them.

    ECS may stop another task than the drained one when the desired count is lowered. The drained task then
    stays counted while the service is steady, so it counts as leaving again and is removed once more.
    """
    reset: list[MemberView] = []
    if not reading.exact_removal and reading.steady:
        reset = [view for view in reading.members if view.leaving is not None and view.leaving.removed]
    if reset:
        notes.append(
            f"ECS kept {_ids(reset)} after the desired count was lowered for it, so it counts as leaving again."
        )
    leaving = [
        view for view in reading.members if view.leaving is not None and (not view.leaving.removed or view in reset)
    ]
    return leaving, reset


def _target_members(reading: ScalingReading, desired_processes: int, notes: list[str]) -> int:
    """Return the members that should run the desired processes, within the group's MinSize and MaxSize."""
    unit = reading.unit
    target = members_for(desired_processes, reading.per_member)
    if target < reading.min_capacity:
        notes.append(
            f"{desired_processes} processes need {target} {unit}s, below the minimum of {reading.min_capacity} "
            f"of the {reading.target}, so {reading.min_capacity} are kept."
        )
        return reading.min_capacity
    if reading.max_capacity is not None and target > reading.max_capacity:
        notes.append(
            f"{desired_processes} processes need {target} {unit}s, above the maximum of {reading.max_capacity} "
            f"of the {reading.target}, so it is held at {reading.max_capacity}."
        )
        return reading.max_capacity
    return target


def _removals(reading: ScalingReading, drained: Sequence[MemberView], notes: list[str]) -> tuple[list[Removal], int]:
    """Return the removals of drained members and the capacity once they are made.

    EC2 removes a named instance and lowers the capacity with it, except where that would go below MinSize:
    then the instance is replaced by a fresh one. On ECS the capacity changes only through the desired count.
    """
    removals: list[Removal] = []
    capacity = reading.capacity
    for view in drained:
        decrement = not reading.exact_removal or capacity - 1 >= reading.min_capacity
        if decrement and reading.exact_removal:
            capacity -= 1
        elif not decrement:
            notes.append(
                f"{view.member.id} is replaced instead of removed: lowering the capacity would go below the "
                f"minimum of {reading.min_capacity}."
            )
        removals.append(Removal(member_id=view.member.id, decrement=decrement))
    return removals, capacity


def missing_processes(view: MemberView, reading: ScalingReading) -> int:
    """Return how many of the member's `per_member` processes the reading does not show."""
    return max(reading.per_member - len(view.processes), 0)


def gone_since(view: MemberView, reading: ScalingReading) -> float | None:
    """Return since when a leaving member has been short of processes; None when the reading shows them all.

    The time comes from the leaving record. Without one there (the first reading short of processes, or an entry
    written before the field existed) the clock starts at this reading.
    """
    if view.leaving is None or not missing_processes(view, reading):
        return None
    if view.leaving.gone_since is not None:
        return view.leaving.gone_since
    return reading.now


def is_drained(view: MemberView, reading: ScalingReading) -> bool:
    """Return whether a leaving member can be removed.

    It must be ready, and every matched process must be quiet and idle. A process it lacks must have been missing
    for longer than `reading.missing_limit`.
    """
    if view.leaving is None or not view.member.ready or not view.quiet_and_idle:
        return False
    since = gone_since(view, reading)
    return since is None or reading.now - since > reading.missing_limit


def _protection(
    reading: ScalingReading,
    leaving_after: Sequence[MemberView],
    drained: Sequence[MemberView],
    kept_drained: Sequence[MemberView],
    keepers: Sequence[MemberView],
    notes: list[str],
) -> tuple[list[str], list[str]]:
    """Return the members to protect (or renew) and to unprotect.

    Leaving members are protected until they are drained. While members leave, busy members that stay are
    protected too. On ECS, when the desired count is lowered, every member that stays is protected, so that ECS
    stops only the drained ones. Drained members lose protection right before they are removed.

    Only an ECS reading can be unsteady, and then a deployment may be replacing tasks. Deployments wait for
    protected tasks, so no protection is turned on or renewed, and the drained tasks kept for the moment
    (`kept_drained`) lose theirs.
    """
    candidates = list(leaving_after)
    if leaving_after or drained:
        candidates += [view for view in keepers if view.busy > 0]
    if drained and not reading.exact_removal:
        candidates += keepers
    protect: list[str] = []
    for view in candidates:
        if view.member.id not in protect and _needs_protection(view, reading):
            protect.append(view.member.id)
    if protect and not reading.steady:
        notes.append(
            f"Not protecting {', '.join(protect)} and not renewing their protection: {reading.unsteady_reason} "
            "Protection that is on lapses at its expiry, so that ECS can replace these tasks."
        )
        protect = []
    unprotect = [view.member.id for view in [*drained, *kept_drained] if view.member.protected]
    return protect, unprotect


def _protection_record(
    reading: ScalingReading,
    protect: Sequence[str],
    unprotect: Sequence[str],
    new_leavers: Sequence[MemberView],
    notes: list[str],
) -> tuple[list[str], list[str], list[str]]:
    """Return the members to unprotect because nothing leaves any more, and the ids to add to and delete from the
    protection record.

    EC2 scale-in protection never expires, and every scale-in skips a protected instance. So a backend that
    records protection takes it off the recorded members at the first run that finds no member leaving. It
    never takes off protection that it did not record, because users protect instances on purpose.

    NOTE: EC2 does not say who turned protection on, so an instance that a user protects while the record lists
    it is released all the same.
    """
    if not reading.records_protection:
        return [], [], []
    members = {view.member.id: view.member for view in reading.members}
    recorded = reading.recorded_protection
    release: list[str] = []
    if reading.steady and not new_leavers and not any(view.leaving for view in reading.members):
        release = [
            member_id
            for member_id in recorded
            if member_id in members and members[member_id].protected and member_id not in unprotect
        ]
    if release:
        notes.append(
            f"Removing the scale-in protection that this backend set on {', '.join(release)}: no {reading.unit} is "
            "leaving any more."
        )
    unprotected = {*unprotect, *release}
    forget = [
        member_id
        for member_id in recorded
        if member_id not in protect
        and (member_id in unprotected or member_id not in members or not members[member_id].protected)
    ]
    return release, list(protect), forget


def _record(
    reading: ScalingReading,
    leaving: Sequence[MemberView],
    new_leavers: Sequence[MemberView],
    drained: Sequence[MemberView],
    reset: Sequence[MemberView],
) -> list[tuple[str, LeavingEntry]]:
    """Return the leaving entries to write: new leavers, changed `gone_since` times, and on ECS the tasks removed
    or counted again. EC2 deletes the entry of a removed instance instead."""
    record: dict[str, LeavingEntry] = {}
    for view in new_leavers:
        missing_now = reading.now if missing_processes(view, reading) else None
        record[view.member.id] = LeavingEntry(since=reading.now, gone_since=missing_now)
    for view in leaving:
        entry = view.leaving
        if entry is None or (reading.exact_removal and view in drained):
            continue
        updated = replace(entry, gone_since=gone_since(view, reading))
        if not reading.exact_removal and view in drained:
            updated = replace(updated, removed=True)
        elif not reading.exact_removal and view in reset:
            updated = replace(updated, removed=False)
        if updated != entry:
            record[view.member.id] = updated
    return list(record.items())


def plan_scaling(reading: ScalingReading, desired_processes: int) -> ScalingPlan:
    """Plan the run that takes the group or service towards `desired_processes` processes of the pool."""
    if isinstance(desired_processes, bool) or not isinstance(desired_processes, int) or desired_processes < 0:
        raise ValueError(f"desired_processes {desired_processes!r} is invalid; it must be an integer >= 0")
    unit = reading.unit
    notes = list(reading.notes)
    leaving, reset = _leaving_views(reading, notes)
    active = [view for view in reading.members if view.leaving is None]
    active_requested = max(reading.capacity - len(leaving), 0)
    target = _target_members(reading, desired_processes, notes)

    # Drained leaving members go now. On ECS only while the service is steady, because ECS picks the tasks it
    # stops itself, and every other task must be running and protected at that moment.
    drained = [view for view in leaving if is_drained(view, reading)]
    kept_drained: list[MemberView] = []
    if drained and not reading.exact_removal and not reading.steady:
        kept_drained, drained = drained, []
        _explain_kept_drained(reading, kept_drained, notes)

    # New leavers, when the policy requests fewer members than the capacity holds without the leaving ones.
    new_leavers: list[MemberView] = []
    active_after = target
    if target < active_requested:
        needed = active_requested - target
        if not reading.steady:
            notes.append(f"Not choosing {unit}s to leave: {reading.unsteady_reason}")
        else:
            candidates = [view for view in active if view.member.ready and view.processes]
            new_leavers = choose_leavers(candidates, needed)
            if len(new_leavers) < needed:
                notes.append(
                    f"Only {len(new_leavers)} of {needed} {unit}s can be chosen to leave, because the others run "
                    "no matched Sidekiq process or are not ready."
                )
        active_after = active_requested - len(new_leavers)

    leaving_after = [view for view in leaving if view not in drained] + new_leavers
    capacity_after = active_after + len(leaving_after)
    if reading.max_capacity is not None and capacity_after > reading.max_capacity:
        notes.append(
            f"The {reading.target} is held at its maximum of {reading.max_capacity}; the remaining "
            f"{capacity_after - reading.max_capacity} {unit}s follow once the leaving ones are gone."
        )
        capacity_after = reading.max_capacity
    capacity_after = max(capacity_after, reading.min_capacity)
    removals, capacity_after_removals = _removals(reading, drained, notes)

    keepers = [view for view in active if view not in new_leavers]
    protect, unprotect = _protection(reading, leaving_after, drained, kept_drained, keepers, notes)
    release, record_protection, forget_protection = _protection_record(reading, protect, unprotect, new_leavers, notes)
    quiet = tuple((view.member.id, view.unquieted) for view in leaving_after if view.unquieted)

    _explain(reading, notes, capacity_after, new_leavers, leaving_after, drained)
    return ScalingPlan(
        backend=reading.backend,
        target=reading.target,
        unit=unit,
        desired_processes=desired_processes,
        capacity_before=reading.capacity,
        capacity_after=capacity_after,
        set_capacity=capacity_after != capacity_after_removals,
        requested_before=active_requested * reading.per_member,
        requested_after=active_after * reading.per_member,
        leave=tuple(view.member.id for view in new_leavers),
        record=tuple(_record(reading, leaving, new_leavers, drained, reset)),
        protect=tuple(protect),
        unprotect=tuple(unprotect + release),
        record_protection=tuple(record_protection),
        forget_protection=tuple(forget_protection),
        quiet=quiet,
        remove=tuple(removals),
        reset=tuple(view.member.id for view in reset),
        forget=reading.stale_records,
        notes=tuple(notes),
    )


def _explain_kept_drained(reading: ScalingReading, kept_drained: Sequence[MemberView], notes: list[str]) -> None:
    """Append why drained ECS tasks stay while the service is not steady, and what happens to them."""
    sentence = f"Not removing {_ids(kept_drained)} yet: {reading.unsteady_reason}"
    if any(view.member.protected for view in kept_drained):
        sentence += (
            " Their scale-in protection is taken off, so that ECS can replace them. Their leaving records are "
            "deleted once they are gone."
        )
    notes.append(sentence)


def _explain_missing(reading: ScalingReading, view: MemberView, since: float) -> str:
    """Return why a leaving member whose processes are missing from Redis is not removed yet."""
    member_id = view.member.id
    elapsed = max(reading.now - since, 0.0)
    if reading.per_member == 1:
        missing = "its Sidekiq process has"
    else:
        missing = f"{missing_processes(view, reading)} of its {reading.per_member} Sidekiq processes have"
    return (
        f"Waiting for {member_id}: {missing} been missing from Redis for {elapsed:.0f} s. A process without a "
        f"heartbeat may still run jobs, so {member_id} counts as drained only after {reading.missing_limit:.0f} s "
        f"(stop budget {reading.stop_budget} s plus the {STALE_AFTER_SECONDS:.0f} s heartbeat expiry)."
    )


def _explain(
    reading: ScalingReading,
    notes: list[str],
    capacity_after: int,
    new_leavers: Sequence[MemberView],
    leaving_after: Sequence[MemberView],
    drained: Sequence[MemberView],
) -> None:
    """Append the sentences that describe the plan's changes and why leaving members wait."""
    noun = "desired capacity" if reading.exact_removal else "desired count"
    if new_leavers:
        notes.append(
            f"Quieting {_ids(new_leavers)}, chosen as the least busy, before removing them; they stay protected "
            "from scale-in until they are idle."
        )
    waiting = [view for view in leaving_after if view not in new_leavers]
    busy = [view for view in waiting if view.busy > 0]
    if busy:
        threads = sum(view.busy for view in busy)
        notes.append(f"Waiting for {_ids(busy)} to finish {threads} running jobs before removing them.")
    not_quiet = [view for view in waiting if view.unquieted]
    if not_quiet:
        notes.append(f"Waiting for {_ids(not_quiet)} to report quiet: TSTP is sent again to their processes.")
    for view in leaving_after:
        since = gone_since(view, reading)
        if since is not None and not is_drained(view, reading):
            notes.append(_explain_missing(reading, view, since))
    seen = [view for view in drained if not missing_processes(view, reading)]
    if seen:
        notes.append(f"Removing {_ids(seen)}: quiet and idle.")
    absent = [view for view in drained if missing_processes(view, reading)]
    if absent:
        notes.append(
            f"Removing {_ids(absent)}: the Sidekiq processes missing from Redis have been gone for more than "
            f"{reading.missing_limit:.0f} s (stop budget {reading.stop_budget} s plus the "
            f"{STALE_AFTER_SECONDS:.0f} s heartbeat expiry)."
        )
    if capacity_after != reading.capacity:
        notes.append(
            f"The {noun} of the {reading.target} goes from {reading.capacity} to {capacity_after} {reading.unit}s."
        )


@dataclass(frozen=True)
class ApplyResult:
    """The steps that `apply` made, one sentence each, in order."""

    actions: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {"changed": self.changed, "actions": list(self.actions)}
