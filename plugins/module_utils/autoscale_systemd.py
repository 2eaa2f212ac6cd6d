"""The systemd backend of the autoscaler: read instance units, match them to Sidekiq processes, plan unit changes.

A pool runs as instances ``sidekiq-<pool>@<n>.service`` spread over the worker hosts, with instance numbers
counted per host (the sidekiq role starts ``@1``, ``@2``, ... on each host). The autoscale module cannot reach
the worker hosts, so the playbook reads the units on every host first (one ``systemctl show`` per host) and
passes the registered results in. This module turns them into readings, matches each running unit to its
Sidekiq process in Redis by hostname and PID (``MainPID``), and plans which units to start and which to stop.

Everything here is pure: no I/O, no clock, no Ansible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

UNIT_PATTERN = re.compile(r"^sidekiq-(?P<pool>[a-z0-9][-a-z0-9]*)@(?P<number>[0-9]+)\.service$")
# The shell command of the playbook's first play: the host's node name, which Sidekiq puts into its identity,
# then every loaded instance of every pool.
READ_COMMAND = "uname -n && systemctl show --no-pager --property=Id,ActiveState,SubState,MainPID 'sidekiq-*@*.service'"
# States in which a unit counts as a running process of its pool: booting (activating) included.
COUNTED_STATES = frozenset({"active", "activating", "reloading"})
# States in which a unit number is free to start again.
FREE_STATES = frozenset({"inactive", "failed"})
# Maximum length of the error text kept from a registered result, because an unreachable host's message repeats a
# whole shell command.
MAX_ERROR_LENGTH = 300


@dataclass(frozen=True)
class UnitReading:
    """One loaded instance unit as ``systemctl show`` reported it."""

    host: str
    pool: str
    number: int
    active_state: str
    sub_state: str
    main_pid: int

    @property
    def unit(self) -> str:
        return unit_name(self.pool, self.number)

    @property
    def counted(self) -> bool:
        """Whether the unit is a process of its pool: running, or booting towards running."""
        return self.active_state in COUNTED_STATES


@dataclass(frozen=True)
class HostReading:
    """The reading of one worker host by the playbook's first play.

    Attributes:
        host: the inventory name, which the playbook's later plays act on.
        hostname: the node name (``uname -n``) that Sidekiq writes into its process identity; None when unread.
        error: why the host could not be read (unreachable, command failed); None when it was read.
        units: the instances of the known pools, in the order systemd listed them.
    """

    host: str
    hostname: str | None
    error: str | None
    units: tuple[UnitReading, ...] = ()

    @property
    def reachable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Instance:
    """A counted unit of a pool and the Sidekiq process matched to it, if any.

    Attributes:
        busy: busy threads of the matched process; None when no live process matched (booting, or a hostname
            or PID that does not match Redis).
        quiet: whether the matched process is quiet (it fetches no new jobs).
    """

    host: str
    pool: str
    number: int
    active_state: str
    main_pid: int
    identity: str | None = None
    busy: int | None = None
    quiet: bool = False

    @property
    def unit(self) -> str:
        return unit_name(self.pool, self.number)


@dataclass(frozen=True)
class UnitAction:
    """A unit to start or stop. `busy` and `identity` describe the process of a unit to stop."""

    host: str
    pool: str
    number: int
    busy: int | None = None
    identity: str | None = None

    @property
    def unit(self) -> str:
        return unit_name(self.pool, self.number)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "unit": self.unit, "pool": self.pool, "busy": self.busy, "identity": self.identity}


@dataclass(frozen=True)
class PoolPlan:
    """The unit changes that take a pool from its running count to the desired count.

    Attributes:
        target: the count the plan reaches, which differs from the desired count when the busy floor keeps
            processes or no reachable host can take a new one.
        notes: plain sentences about why the plan differs from the desired count.
    """

    starts: tuple[UnitAction, ...]
    stops: tuple[UnitAction, ...]
    target: int
    notes: tuple[str, ...] = ()


def unit_name(pool: str, number: int) -> str:
    return f"sidekiq-{pool}@{number}.service"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 3] + "..."


def _registered_error(registered: Mapping[str, Any]) -> str | None:
    """Return why a registered command result contains no reading, or None when it contains one."""
    message = str(registered.get("msg") or "").strip()
    if registered.get("unreachable"):
        return _shorten(f"unreachable: {message}" if message else "unreachable")
    if registered.get("skipped"):
        return "the reading was skipped on this host"
    if registered.get("failed") or registered.get("rc") not in (0, None):
        detail = str(registered.get("stderr") or message or f"exit code {registered.get('rc')}").strip()
        return _shorten(f"reading the units failed: {detail}")
    if not isinstance(registered.get("stdout"), str):
        return "no reading: the host was not part of the play that reads the units (for example under --limit)"
    return None


def parse_show_output(host: str, output: str, pools: Iterable[str]) -> tuple[str | None, tuple[UnitReading, ...]]:
    """Parse the output of READ_COMMAND into the node name and the instances of the given pools.

    ``systemctl show`` prints one block of ``Key=value`` lines per unit, blocks separated by a blank line, with
    the properties in its own order. Units of other pools and blocks without a valid instance name are skipped.
    """
    known = set(pools)
    lines = output.splitlines()
    hostname = lines[0].strip() if lines and "=" not in lines[0] else None
    body = lines[1:] if hostname is not None else lines
    units: list[UnitReading] = []
    for block in "\n".join(body).split("\n\n"):
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        match = UNIT_PATTERN.match(values.get("Id", ""))
        if not match or match.group("pool") not in known:
            continue
        try:
            main_pid = int(values.get("MainPID") or 0)
        except ValueError:
            main_pid = 0
        units.append(
            UnitReading(
                host=host,
                pool=match.group("pool"),
                number=int(match.group("number")),
                active_state=values.get("ActiveState", "unknown"),
                sub_state=values.get("SubState", "unknown"),
                main_pid=main_pid,
            )
        )
    return hostname or None, tuple(units)


def parse_host_readings(instances: Mapping[str, Any], pools: Iterable[str]) -> list[HostReading]:
    """Turn the playbook's registered results, keyed by inventory host, into readings in the same host order.

    Raises ValueError when an entry is not a registered result (a mapping).
    """
    names = list(pools)
    readings: list[HostReading] = []
    for host, registered in instances.items():
        if not isinstance(registered, Mapping):
            raise ValueError(
                f"instances[{host!r}] is {type(registered).__name__}; pass the result that the playbook registered "
                "for the unit reading on that host"
            )
        error = _registered_error(registered)
        if error is not None:
            readings.append(HostReading(host=str(host), hostname=None, error=error))
            continue
        hostname, units = parse_show_output(str(host), str(registered["stdout"]), names)
        readings.append(HostReading(host=str(host), hostname=hostname or str(host), error=None, units=units))
    return readings


def match_instances(readings: Sequence[HostReading], processes: Iterable[ProcessState]) -> dict[str, list[Instance]]:
    """Match every counted unit on a reachable host to the live Sidekiq process with its hostname and MainPID."""
    by_host_pid: dict[tuple[str, int], ProcessState] = {}
    for candidate in processes:
        if candidate.live and candidate.hostname is not None and candidate.pid is not None:
            by_host_pid[(candidate.hostname, candidate.pid)] = candidate
    matched: dict[str, list[Instance]] = {}
    for reading in readings:
        if not reading.reachable:
            continue
        for unit in reading.units:
            if not unit.counted:
                continue
            process: ProcessState | None = None
            if unit.main_pid:
                process = by_host_pid.get((reading.hostname or reading.host, unit.main_pid))
            matched.setdefault(unit.pool, []).append(
                Instance(
                    host=reading.host,
                    pool=unit.pool,
                    number=unit.number,
                    active_state=unit.active_state,
                    main_pid=unit.main_pid,
                    identity=process.identity if process else None,
                    busy=process.busy if process else None,
                    quiet=process.quiet if process else False,
                )
            )
    return matched


def occupied_numbers(readings: Sequence[HostReading], pool: str) -> dict[str, set[int]]:
    """Return, per reachable host, the instance numbers of a pool that are not free to start."""
    occupied: dict[str, set[int]] = {}
    for reading in readings:
        if reading.reachable:
            occupied[reading.host] = {
                unit.number for unit in reading.units if unit.pool == pool and unit.active_state not in FREE_STATES
            }
    return occupied


def plan_starts(
    pool: str, instances: Sequence[Instance], occupied: Mapping[str, set[int]], count: int
) -> list[UnitAction]:
    """Place `count` new processes one at a time on the host that runs the fewest of the pool.

    Ties go to the host listed first. Each new unit takes the lowest instance number not occupied on its host.
    `occupied` lists the reachable hosts in inventory order; an empty mapping places nothing.
    """
    running = {host: 0 for host in occupied}
    for instance in instances:
        if instance.host in running:
            running[instance.host] += 1
    used_numbers = {host: set(numbers) for host, numbers in occupied.items()}
    order = list(occupied)
    starts: list[UnitAction] = []
    for _placed in range(count):
        if not order:
            break
        host = min(order, key=lambda name: (running[name], order.index(name)))
        number = 1
        while number in used_numbers[host]:
            number += 1
        used_numbers[host].add(number)
        running[host] += 1
        starts.append(UnitAction(host=host, pool=pool, number=number))
    return starts


def _stop_order(instance: Instance, remaining: Mapping[str, int], hosts: Sequence[str]) -> tuple[Any, ...]:
    """Sort key of a stop candidate: quiet first, then least busy, then the fullest host, then the newest unit.

    A booting unit has no process yet and counts as idle. A running unit whose process was not found in Redis
    counts as the busiest, because its jobs cannot be seen.
    """
    if instance.busy is not None:
        busy: float = instance.busy
    elif instance.active_state == "activating":
        busy = 0
    else:
        busy = math.inf
    host_index = hosts.index(instance.host) if instance.host in hosts else len(hosts)
    return (not instance.quiet, busy, -remaining.get(instance.host, 0), -instance.number, host_index)


def plan_stops(pool: str, instances: Sequence[Instance], count: int, hosts: Sequence[str]) -> list[UnitAction]:
    """Choose `count` units to stop, one at a time: quiet ones first, then the least busy.

    Among equally busy units the one on the host that runs the most of the pool goes first, so hosts stay
    balanced, and on one host the highest instance number goes first.
    """
    remaining: dict[str, int] = {}
    for instance in instances:
        remaining[instance.host] = remaining.get(instance.host, 0) + 1
    candidates = list(instances)
    stops: list[UnitAction] = []
    for _stopped in range(min(count, len(candidates))):
        chosen = min(candidates, key=lambda instance: _stop_order(instance, remaining, hosts))
        candidates.remove(chosen)
        remaining[chosen.host] -= 1
        stops.append(
            UnitAction(host=chosen.host, pool=pool, number=chosen.number, busy=chosen.busy, identity=chosen.identity)
        )
    return stops


def busy_floor(busy: int, concurrency: int) -> int:
    """Return the fewest processes whose threads can hold `busy` running jobs."""
    return math.ceil(busy / concurrency) if busy > 0 else 0


def plan_pool(
    pool: str,
    instances: Sequence[Instance],
    readings: Sequence[HostReading],
    desired: int,
    busy: int,
    concurrency: int,
) -> PoolPlan:
    """Plan the unit starts or stops that take a pool from its counted units to `desired` processes.

    A scale-in never goes below the busy floor: the processes left must have threads for every busy thread of
    the pool. A scale-out places units only on reachable hosts.
    """
    current = len(instances)
    hosts = [reading.host for reading in readings if reading.reachable]
    notes: list[str] = []
    if desired > current:
        starts = plan_starts(pool, instances, occupied_numbers(readings, pool), desired - current)
        if len(starts) < desired - current:
            notes.append(
                f"Only {len(starts)} of {desired - current} new processes can be placed, because no worker host "
                "could be read."
            )
        return PoolPlan(starts=tuple(starts), stops=(), target=current + len(starts), notes=tuple(notes))
    if desired < current:
        floor = busy_floor(busy, concurrency)
        target = max(desired, floor)
        if target > desired:
            notes.append(
                f"Keeping {target} processes instead of {desired}: {busy} threads are busy and each process has "
                f"{concurrency}."
            )
        stops = plan_stops(pool, instances, current - target, hosts) if target < current else []
        return PoolPlan(starts=(), stops=tuple(stops), target=current - len(stops), notes=tuple(notes))
    return PoolPlan(starts=(), stops=(), target=current)
