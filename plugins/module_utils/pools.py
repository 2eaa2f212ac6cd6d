"""The pool model: validation of pool definitions and every value derived from them.

A pool is a dict as users write it in group_vars::

    {"name": "default", "queues": [["default", 3], ["low", 1]], "concurrency": 10, "timeout": 25,
     "processes": {"min": 1, "max": 8}, "autoscale": {"target_latency": 10}}

Each derived value (stop budget, Redis connections, the rendered sidekiq.yml, instance counts per host) is
computed here once, and the roles reach it through the filters in plugins/filter/pools.py.
This module is pure Python and imports nothing from Ansible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeGuard
from urllib.parse import quote

DEFAULT_CONCURRENCY = 10
DEFAULT_TIMEOUT = 25
# Seconds added to Sidekiq's own timeout before a supervisor may kill the process. Sidekiq needs a moment after
# its timeout to push unfinished jobs back to Redis, so anything below 5 s risks losing them.
DEFAULT_SHUTDOWN_MARGIN = 10
MIN_SHUTDOWN_MARGIN = 5

# Pool names become systemd unit names (sidekiq-<pool>@.service) and Kubernetes object names (sidekiq-<pool>),
# so they must be DNS labels short enough to leave room for the prefixes and suffixes we add.
POOL_NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
POOL_NAME_MAX_LENGTH = 40
QUEUE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")

# Minimum Redis server version per Sidekiq major version, from each release's own requirements.
MIN_REDIS_VERSION = {6: (4, 0), 7: (6, 2), 8: (7, 0)}
POOL_KEYS = {"name", "queues", "concurrency", "timeout", "processes", "autoscale", "env", "tag"}


class PoolError(ValueError):
    """A pool definition that cannot be deployed; the message names the value and the fix."""


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def queue_entries(pool: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """Return the pool's queues as (name, weight) pairs; weight is None for a plain (strict order) queue."""
    entries: list[tuple[str, int | None]] = []
    for entry in pool.get("queues") or []:
        if isinstance(entry, str):
            entries.append((entry, None))
        elif isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], str):
            entries.append((entry[0], entry[1]))
        else:
            entries.append((str(entry), None))
    return entries


def queue_names(pool: Mapping[str, Any]) -> list[str]:
    """Return the names of the queues a pool serves, in the order given."""
    return [name for name, _weight in queue_entries(pool)]


def processes(pool: Mapping[str, Any]) -> tuple[int, int]:
    """Return (min, max) processes of a pool; a pool without `processes` runs exactly one process."""
    spec = pool.get("processes") or {}
    minimum = spec.get("min", 1)
    maximum = spec.get("max", max(minimum, 1) if _is_int(minimum) else 1)
    return int(minimum), int(maximum)


def stop_budget(pool: Mapping[str, Any], margin: int = DEFAULT_SHUTDOWN_MARGIN) -> int:
    """Return the seconds a supervisor must allow a process to stop: Sidekiq's timeout plus the margin."""
    return int(pool.get("timeout", DEFAULT_TIMEOUT)) + int(margin)


def redis_connections_per_process(concurrency: int, sidekiq_major: int = 6) -> int:
    """Return the Redis connections one Sidekiq server process opens.

    Sidekiq 6 opens concurrency + 5; Sidekiq 7 and 8 keep an internal pool of 10 plus one pool sized to the
    concurrency of each capsule (one capsule here).
    """
    if sidekiq_major >= 7:
        return concurrency + 10
    return concurrency + 5


def redis_clients(pools: Iterable[Mapping[str, Any]], sidekiq_major: int = 6) -> int:
    """Return the Redis connections all pools need at their maximum size."""
    total = 0
    for pool in pools:
        _minimum, maximum = processes(pool)
        concurrency = int(pool.get("concurrency", DEFAULT_CONCURRENCY))
        total += maximum * redis_connections_per_process(concurrency, sidekiq_major)
    return total


def sidekiq_config(pool: Mapping[str, Any]) -> dict[str, Any]:
    """Return the content of a pool's sidekiq.yml as data, so integers stay integers when rendered."""
    queues: list[Any] = []
    for name, weight in queue_entries(pool):
        queues.append(name if weight is None else [name, int(weight)])
    return {
        "concurrency": int(pool.get("concurrency", DEFAULT_CONCURRENCY)),
        "timeout": int(pool.get("timeout", DEFAULT_TIMEOUT)),
        "tag": str(pool.get("tag", pool["name"])),
        "queues": queues,
    }


def database_pool_size(pool: Mapping[str, Any]) -> int:
    """Return the database connection pool size the app must allow: one per thread plus a spare."""
    return int(pool.get("concurrency", DEFAULT_CONCURRENCY)) + 1


def instance_counts(total: int, hosts: Sequence[str]) -> dict[str, int]:
    """Spread `total` processes over hosts as evenly as possible, earlier hosts taking the remainder."""
    if not hosts:
        return {}
    base, remainder = divmod(max(total, 0), len(hosts))
    return {host: base + (1 if index < remainder else 0) for index, host in enumerate(hosts)}


def _validate_name(pool: Mapping[str, Any], label: str) -> list[str]:
    name = pool.get("name")
    if not isinstance(name, str) or not name:
        return [f"{label}: missing 'name'; give each pool a name such as 'default'"]
    if len(name) > POOL_NAME_MAX_LENGTH or not POOL_NAME_PATTERN.match(name):
        return [
            f"{label}: invalid name {name!r}; use lowercase letters, digits and '-', starting and ending with a "
            f"letter or digit, at most {POOL_NAME_MAX_LENGTH} characters (it becomes the unit sidekiq-<name>@.service "
            "and Kubernetes object names)"
        ]
    return []


def _validate_queues(pool: Mapping[str, Any], label: str) -> list[str]:
    raw = pool.get("queues")
    if not isinstance(raw, list) or not raw:
        return [f"{label}: 'queues' must be a non-empty list of queue names or [name, weight] pairs, got {raw!r}"]
    errors: list[str] = []
    weighted = 0
    seen: set[str] = set()
    for entry in raw:
        if isinstance(entry, str):
            name, weight = entry, None
        elif isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
            name, weight = entry
            weighted += 1
            if not _is_int(weight) or weight < 1:
                errors.append(f"{label}: queue {name!r} has weight {weight!r}; a weight must be an integer >= 1")
        else:
            errors.append(f"{label}: invalid queue entry {entry!r}; write a name ('default') or a pair ['default', 3]")
            continue
        if not QUEUE_NAME_PATTERN.match(name):
            errors.append(f"{label}: invalid queue name {name!r}; use letters, digits, '_', '.', ':' and '-' only")
        if name in seen:
            errors.append(
                f"{label}: queue {name!r} is listed twice; list it once, because Sidekiq aborts at boot on a duplicate"
            )
        seen.add(name)
    if 0 < weighted < len(raw):
        errors.append(
            f"{label}: queues {raw!r} mix weighted and plain entries; give every queue a weight (weighted random "
            "fetch) or none (strict priority in the listed order)"
        )
    return errors


def _validate_numbers(pool: Mapping[str, Any], label: str, margin: int, stop_budget_cap: int | None) -> list[str]:
    errors: list[str] = []
    for key, default in (("concurrency", DEFAULT_CONCURRENCY), ("timeout", DEFAULT_TIMEOUT)):
        value = pool.get(key, default)
        if not _is_int(value) or value < 1:
            errors.append(f"{label}: {key} {value!r} is invalid; it must be a positive integer (not a quoted string)")
    spec = pool.get("processes", {"min": 1, "max": 1})
    if not isinstance(spec, Mapping):
        errors.append(f"{label}: 'processes' must be a mapping such as {{min: 1, max: 4}}, got {spec!r}")
        return errors
    minimum: Any = spec.get("min")
    maximum: Any = spec.get("max")
    if not _is_int(minimum) or minimum < 0:
        errors.append(f"{label}: processes.min {minimum!r} is invalid; it must be an integer >= 0")
    if not _is_int(maximum) or maximum < 1:
        errors.append(f"{label}: processes.max {maximum!r} is invalid; it must be an integer >= 1")
    if _is_int(minimum) and _is_int(maximum) and minimum > maximum:
        errors.append(f"{label}: processes.min {minimum} is above processes.max {maximum}; lower min or raise max")
    timeout = pool.get("timeout", DEFAULT_TIMEOUT)
    if stop_budget_cap is not None and _is_int(timeout) and timeout + margin > stop_budget_cap:
        if stop_budget_cap - margin >= 1:
            fix = f"lower the pool's timeout to at most {stop_budget_cap - margin}"
        else:
            fix = "no timeout of 1 s or more fits, so lower the shutdown margin or use a platform with a larger cap"
        errors.append(
            f"{label}: stop budget {timeout + margin} s (timeout {timeout} + margin {margin}) exceeds the platform's "
            f"cap of {stop_budget_cap} s; {fix}"
        )
    return errors


def validate_pools(
    pools: Any,
    app_queues: Sequence[str] | None = None,
    singleton_queues: Sequence[str] | None = None,
    margin: int = DEFAULT_SHUTDOWN_MARGIN,
    stop_budget_cap: int | None = None,
) -> list[str]:
    """Return every problem in a list of pools as a message naming the value and the fix; empty when valid."""
    if not isinstance(pools, list) or not pools:
        return [f"sidekiq_pools must be a non-empty list of pools, got {pools!r}"]
    if not _is_int(margin):
        return [f"shutdown margin {margin!r} is invalid; it must be an integer number of seconds (not a quoted string)"]
    if margin < MIN_SHUTDOWN_MARGIN:
        return [
            f"shutdown margin {margin!r} is too small; it must be an integer >= {MIN_SHUTDOWN_MARGIN} seconds so "
            "Sidekiq can push unfinished jobs back before it is killed"
        ]
    errors: list[str] = []
    names: set[str] = set()
    served: set[str] = set()
    for index, pool in enumerate(pools):
        if not isinstance(pool, Mapping):
            errors.append(f"pool #{index + 1}: must be a mapping with name, queues and processes, got {pool!r}")
            continue
        label = f"pool {pool.get('name', '#' + str(index + 1))!r}"
        unknown = sorted(set(pool) - POOL_KEYS)
        if unknown:
            errors.append(f"{label}: unknown keys {unknown}; known keys are {sorted(POOL_KEYS)}")
        errors.extend(_validate_name(pool, label))
        if pool.get("name") in names:
            errors.append(f"{label}: the name is used by more than one pool; give each pool a unique name")
        names.add(str(pool.get("name")))
        queue_errors = _validate_queues(pool, label)
        errors.extend(queue_errors)
        errors.extend(_validate_numbers(pool, label, margin, stop_budget_cap))
        if queue_errors:
            continue
        served.update(queue_names(pool))
        spec = pool.get("processes") or {}
        maximum = spec.get("max", 1) if isinstance(spec, Mapping) else 1
        for queue in queue_names(pool):
            if singleton_queues and queue in singleton_queues and _is_int(maximum) and maximum > 1:
                errors.append(
                    f"{label}: serves singleton queue {queue!r} with up to {maximum} processes; a singleton queue "
                    "must run in a pool with processes.max 1"
                )
    for queue in app_queues or []:
        if queue not in served:
            errors.append(f"queue {queue!r} is used by the app but served by no pool; add it to a pool's queues")
    return errors


def parse_version(text: str) -> tuple[int, ...]:
    """Parse '7.0.15' (or 'Redis server v=7.0.15 sha=...') into (7, 0, 15)."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.groups() if part is not None)


def redis_version_errors(sidekiq_major: int, redis_version: str) -> list[str]:
    """Return a message when the Redis server is too old for the Sidekiq major version; empty when compatible."""
    if sidekiq_major not in MIN_REDIS_VERSION:
        return [f"Sidekiq major version {sidekiq_major!r} is not supported; use one of {sorted(MIN_REDIS_VERSION)}"]
    try:
        found = parse_version(redis_version)
    except ValueError as error:
        return [f"{error}; give the Redis version as major.minor.patch, for example '7.0.15'"]
    wanted = MIN_REDIS_VERSION[sidekiq_major]
    if found[:2] < wanted:
        wanted_text = ".".join(str(part) for part in wanted)
        return [
            f"Redis {redis_version} is too old for Sidekiq {sidekiq_major}, which needs Redis >= {wanted_text}; "
            "upgrade Redis before deploying these workers"
        ]
    return []


def redis_url(
    host: str,
    port: int = 6379,
    db: int = 0,
    username: str | None = None,
    password: str | None = None,
    tls: bool = False,
) -> str:
    """Build the REDIS_URL that Sidekiq reads, with the username and password percent-encoded.

    Every reserved character is encoded (a '/' or '@' in a password would otherwise end the userinfo part).
    """
    scheme = "rediss" if tls else "redis"
    userinfo = ""
    if password:
        userinfo = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
    elif username:
        userinfo = f"{quote(username, safe='')}@"
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{userinfo}{bracketed}:{int(port)}/{int(db)}"


def target_instances(pool_name: str, services: Mapping[str, Any], share: int) -> dict[str, list[str]]:
    """Plan the instances of one pool on one host from ansible's service_facts.

    Returns the running units and the units that must run: every running instance stays (an autoscaler may have
    raised the count, and a deploy never shrinks a pool), and the lowest free instance numbers are added until
    the host runs at least its share of processes.min.
    """
    pattern = re.compile(rf"^sidekiq-{re.escape(pool_name)}@(\d+)\.service$")
    running: list[int] = []
    for unit, state in services.items():
        match = pattern.match(unit)
        if match and isinstance(state, Mapping) and state.get("state") == "running":
            running.append(int(match.group(1)))
    wanted = set(running)
    candidate = 1
    while len(wanted) < share:
        if candidate not in wanted:
            wanted.add(candidate)
        candidate += 1
    return {
        "running": [f"sidekiq-{pool_name}@{number}.service" for number in sorted(running)],
        "target": [f"sidekiq-{pool_name}@{number}.service" for number in sorted(wanted)],
    }


def instance_plan(
    services: Mapping[str, Any], pools: Sequence[Mapping[str, Any]], hosts: Sequence[str], host: str
) -> dict[str, dict[str, list[str]]]:
    """Plan every pool's instances on one host: its share of processes.min, never fewer than are running."""
    plan = {}
    for pool in pools:
        minimum, _maximum = processes(pool)
        share = instance_counts(minimum, hosts).get(host, 0)
        plan[str(pool["name"])] = target_instances(str(pool["name"]), services, share)
    return plan


def restart_items(
    plan: Mapping[str, Mapping[str, Sequence[str]]],
    pools: Sequence[Mapping[str, Any]],
    changed_pools: Sequence[str],
    host: str,
) -> list[dict[str, Any]]:
    """List the running instances on one host whose pool changed, with what a drain-and-restart needs."""
    items = []
    for pool in pools:
        name = str(pool["name"])
        if name not in changed_pools:
            continue
        for unit in plan.get(name, {}).get("running", []):
            items.append(
                {"host": host, "pool": name, "unit": unit, "timeout": int(pool.get("timeout", DEFAULT_TIMEOUT))}
            )
    return items
