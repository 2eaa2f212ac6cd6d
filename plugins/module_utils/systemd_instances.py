"""Quiet, drain, restart and stop Sidekiq processes that run as systemd instances (sidekiq-<pool>@<n>.service).

Every stop goes the same way so that no job is lost: send TSTP (quiet: the process takes no new jobs), wait until
its busy threads reach zero or the pool's timeout passes, then let systemd stop it. systemd sends TERM, and Sidekiq
pushes any job still running back to its queue before it exits, well within TimeoutStopSec (the stop budget).

Busy threads are read from the process hash that Sidekiq keeps in Redis (field `busy`, refreshed on every
heartbeat). When Redis cannot be reached, the wait for idle is skipped and the stop relies on Sidekiq's own TERM
handling alone; the result reports it in its messages.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SYSTEMCTL = "systemctl"
POLL_INTERVAL = 1.0


class InstanceError(RuntimeError):
    """A systemctl call failed; the message names the unit and the output."""


@dataclass
class UnitState:
    """State of one unit as systemd reports it."""

    active_state: str
    sub_state: str
    main_pid: int
    unit_file_state: str

    @property
    def running(self) -> bool:
        return self.active_state in ("active", "reloading", "activating") and self.main_pid > 0


@dataclass
class DrainResult:
    """Outcome of quieting one instance: its identity, busy threads and the time spent waiting."""

    identity: str | None = None
    busy_before: int | None = None
    busy_at_stop: int | None = None
    waited_seconds: float = 0.0
    timed_out: bool = False
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_systemctl(*args: str) -> str:
    """Run systemctl and return its standard output; raise InstanceError when it fails."""
    completed = subprocess.run([SYSTEMCTL, *args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()
        raise InstanceError(f"'systemctl {' '.join(args)}' failed with exit code {completed.returncode}: {output}")
    return completed.stdout


def unit_state(unit: str) -> UnitState:
    """Read ActiveState, SubState, MainPID and UnitFileState of a unit."""
    output = run_systemctl("show", unit, "--property=ActiveState,SubState,MainPID,UnitFileState")
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return UnitState(
        active_state=values.get("ActiveState", "unknown"),
        sub_state=values.get("SubState", "unknown"),
        main_pid=int(values.get("MainPID", "0") or 0),
        unit_file_state=values.get("UnitFileState", ""),
    )


def read_environment_file(path: str) -> dict[str, str]:
    """Parse the KEY="value" lines of a systemd EnvironmentFile as rendered by the sidekiq role."""
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            values[key.strip()] = value
    return values


def find_identity(client: Any, pid: int, hostname: str | None = None) -> str | None:
    """Return the Sidekiq identity (host:pid:nonce) of the process with this pid on this host, if registered."""
    host = hostname or socket.gethostname()
    for raw in client.smembers("processes"):
        identity = raw.decode() if isinstance(raw, bytes) else str(raw)
        parts = identity.rsplit(":", 2)
        if len(parts) == 3 and parts[0] == host and parts[1] == str(pid):
            return identity
    return None


def busy_threads(client: Any, identity: str) -> int | None:
    """Return the busy thread count Sidekiq last reported for a process, or None when its hash is gone."""
    value = client.hget(identity, "busy")
    if value is None:
        return None
    return int(value)


def drain(
    unit: str,
    timeout: float,
    client: Any | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DrainResult:
    """Quiet a running instance and wait until it is idle or `timeout` seconds have passed."""
    result = DrainResult()
    state = unit_state(unit)
    if not state.running:
        result.messages.append(f"{unit} is not running; nothing to quiet")
        return result

    run_systemctl("kill", "--kill-who=main", "--signal=TSTP", unit)
    if client is None:
        result.messages.append(f"{unit}: quieted; Redis not reachable, so the stop relies on Sidekiq's TERM handling")
        return result

    started = clock()
    try:
        identity = find_identity(client, state.main_pid)
        result.identity = identity
        if identity is None:
            result.messages.append(f"{unit}: pid {state.main_pid} is not registered in Redis; not waiting for idle")
            return result
        busy = busy_threads(client, identity)
        result.busy_before = busy
        while busy and clock() - started < timeout:
            sleep(POLL_INTERVAL)
            busy = busy_threads(client, identity)
        result.busy_at_stop = busy
    except Exception as error:
        result.messages.append(f"{unit}: reading busy threads from Redis failed ({error}); stopping anyway")
    result.waited_seconds = round(clock() - started, 2)
    result.timed_out = bool(result.busy_at_stop)
    if result.timed_out:
        result.messages.append(
            f"{unit}: still {result.busy_at_stop} busy after {timeout:g} s; Sidekiq pushes those jobs back on stop"
        )
    return result


def restart(unit: str, timeout: float, client: Any | None) -> DrainResult:
    """Quiet and drain an instance, then restart it; systemctl returns once Sidekiq reports READY=1."""
    result = drain(unit, timeout, client)
    run_systemctl("restart", unit)
    state = unit_state(unit)
    if state.active_state != "active":
        raise InstanceError(
            f"{unit} did not become active after restart (state {state.active_state}/{state.sub_state})"
        )
    return result


def stop(unit: str, timeout: float, client: Any | None, disable: bool = True) -> DrainResult:
    """Quiet and drain an instance, then stop it (and disable it, so a reboot does not bring it back)."""
    result = drain(unit, timeout, client)
    run_systemctl("stop", unit)
    if disable:
        run_systemctl("disable", unit)
    return result
