"""The autoscaler's own keys in Redis: the per-fleet lock and the state that runs keep between them.

Keys, under the app's namespace prefix when it uses redis-namespace:

- ``sidekiq-ops:autoscale:<fleet>:lock``: a string set with ``SET NX PX``. Its value starts with a random token
  and also names the control host and the start time, so ``redis-cli GET`` shows who holds it. Only the run
  that knows the whole value extends or deletes it (compare-and-set in Lua), so a run whose lock expired can
  never release the lock of the next run.
- ``sidekiq-ops:autoscale:<fleet>:state``: a hash with one field ``pool:<name>`` per pool, holding the policy
  state as JSON (``PolicyState.to_dict``), and one field ``fleet`` holding the throughput reading of the previous
  run. Writes go through a Lua script that checks the lock first, so only the lock holder writes. The hash
  expires STATE_TTL seconds after the last write, so the state of a fleet that is no longer scaled goes away.

The Redis user needs GET, SET, PEXPIRE, PTTL, DEL, HGETALL, HSET, EXPIRE, EVAL, EVALSHA and SCRIPT LOAD on these
keys; the sidekiq role's Redis user (``~* +@all -@admin ...``) has them. Every function here raises the
RedisAccessError subclasses of redis_connection, never redis-py's own errors.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import translate_redis_error

_P = ParamSpec("_P")
_R = TypeVar("_R")

KEY_ROOT = "sidekiq-ops:autoscale"
FLEET_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
FLEET_FIELD = "fleet"
POOL_FIELD_PREFIX = "pool:"
STATE_TTL = 7 * 24 * 3600
FLEET_RECORD_VERSION = 1

# KEYS[1] lock, ARGV[1] lock value, ARGV[2] milliseconds: extend the lock when this run still holds it, never
# shortening it. Returns 1 when the lock is held by this run, else 0.
EXTEND_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local minimum = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < minimum then
  redis.call('PEXPIRE', KEYS[1], minimum)
end
return 1
"""

# KEYS[1] lock, KEYS[2] state hash. ARGV[1] lock value, ARGV[2] "release" or "keep", ARGV[3] seconds until the
# state expires, then field/value pairs. Writes the fields and optionally deletes the lock, but only while this
# run holds the lock. Returns 1 when it did, 0 when the lock is gone or held by another run.
WRITE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if #ARGV > 3 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 4))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
if ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
end
return 1
"""


class FleetNameError(ValueError):
    """The fleet name cannot be used in a Redis key."""


def validate_fleet(fleet: str) -> str:
    """Return the fleet name when it is usable in keys; raise FleetNameError naming the value and the fix."""
    if not isinstance(fleet, str) or not FLEET_PATTERN.match(fleet):
        raise FleetNameError(
            f"fleet {fleet!r} is invalid; use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit (for example the app name)"
        )
    return fleet


@dataclass(frozen=True)
class FleetKeys:
    """The Redis keys of one fleet."""

    lock: str
    state: str

    @classmethod
    def for_fleet(cls, fleet: str, namespace_prefix: str = "") -> FleetKeys:
        base = f"{namespace_prefix}{KEY_ROOT}:{validate_fleet(fleet)}"
        return cls(lock=f"{base}:lock", state=f"{base}:state")


@dataclass(frozen=True)
class LockHolder:
    """The holder of a lock that this run could not take, and the time left until the lock expires."""

    value: str
    expires_in: float | None

    def describe(self) -> str:
        details = self.value.split(" ", 1)[1] if " " in self.value else "an unknown run"
        expiry = f"; it expires in {self.expires_in:.0f} s" if self.expires_in is not None else ""
        return f"held by {details}{expiry}"


def new_lock_value(now: float | None = None) -> str:
    """Return a lock value: a random token, then the control host and the start time in UTC, for operators."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    return f"{secrets.token_hex(16)} host={socket.gethostname()} since={started}"


def _redis_errors_translated(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wrap a function that calls Redis so that redis-py's errors become RedisAccessError subclasses."""

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            # By class name, so that this file imports without redis-py.
            if not any(cls.__name__ == "RedisError" for cls in type(error).__mro__):
                raise
            raise translate_redis_error(error) from error

    return wrapper


@_redis_errors_translated
def acquire_lock(client: Any, keys: FleetKeys, value: str, ttl_seconds: float) -> bool:
    """Take the fleet's lock with SET NX PX; return False when another run holds it."""
    return bool(client.set(keys.lock, value, nx=True, px=max(1, int(ttl_seconds * 1000))))


@_redis_errors_translated
def lock_holder(client: Any, keys: FleetKeys) -> LockHolder:
    """Read the value and remaining time of a held lock; both in one round trip."""
    pipeline = client.pipeline(transaction=False)
    pipeline.get(keys.lock)
    pipeline.pttl(keys.lock)
    raw, pttl = pipeline.execute()
    value = raw.decode() if isinstance(raw, bytes) else str(raw or "")
    return LockHolder(value=value, expires_in=pttl / 1000.0 if isinstance(pttl, int) and pttl >= 0 else None)


@_redis_errors_translated
def extend_lock(client: Any, keys: FleetKeys, value: str, ttl_seconds: float) -> bool:
    """Make the lock last at least `ttl_seconds` more while this run holds it; return whether it still does."""
    script = client.register_script(EXTEND_LUA)
    return bool(script(keys=[keys.lock], args=[value, max(1, int(ttl_seconds * 1000))]))


@_redis_errors_translated
def write_state(client: Any, keys: FleetKeys, value: str, fields: Mapping[str, str], release: bool = False) -> bool:
    """Write state fields (and release the lock) only while this run holds the lock; return whether it did."""
    arguments: list[str] = [value, "release" if release else "keep", str(STATE_TTL)]
    for name, text in fields.items():
        arguments += [name, text]
    script = client.register_script(WRITE_LUA)
    return bool(script(keys=[keys.lock, keys.state], args=arguments))


def release_lock(client: Any, keys: FleetKeys, value: str) -> bool:
    """Delete the lock when this run holds it (compare-and-delete); return whether it did."""
    return write_state(client, keys, value, {}, release=True)


def pool_field(pool: str) -> str:
    return f"{POOL_FIELD_PREFIX}{pool}"


@_redis_errors_translated
def load_state(client: Any, keys: FleetKeys) -> dict[str, Any]:
    """Read the state hash and decode its JSON fields.

    Returns ``{"fleet": <dict or None>, "pools": {name: <dict>}, "invalid": [field, ...]}``. A field that is not
    a JSON object is listed under "invalid" and left out, so the caller starts that pool from a fresh state.
    """
    raw = client.hgetall(keys.state) or {}
    pools: dict[str, Any] = {}
    fleet: dict[str, Any] | None = None
    invalid: list[str] = []
    for raw_name, raw_value in raw.items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        try:
            data = json.loads(raw_value)
        except (TypeError, ValueError):
            invalid.append(name)
            continue
        if not isinstance(data, dict):
            invalid.append(name)
        elif name == FLEET_FIELD:
            fleet = data
        elif name.startswith(POOL_FIELD_PREFIX):
            pools[name[len(POOL_FIELD_PREFIX) :]] = data
    return {"fleet": fleet, "pools": pools, "invalid": invalid}


@dataclass(frozen=True)
class FleetRecord:
    """The fleet-wide reading of one run, kept for the next run to derive throughput.

    Attributes:
        processed: Sidekiq's ``stat:processed`` counter (every process of the app).
        at: Redis server time of the reading, epoch seconds.
        busy: busy threads per pool (by process tag) at that reading.
    """

    processed: int
    at: float
    busy: dict[str, int]

    def to_json(self) -> str:
        return json.dumps(
            {"version": FLEET_RECORD_VERSION, "processed": self.processed, "at": self.at, "busy": self.busy},
            sort_keys=True,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FleetRecord | None:
        """Load a record written by `to_json`; None for a missing, older or malformed record."""
        if not data or data.get("version") != FLEET_RECORD_VERSION:
            return None
        try:
            busy = {str(name): int(count) for name, count in dict(data.get("busy") or {}).items()}
            return cls(processed=int(data["processed"]), at=float(data["at"]), busy=busy)
        except (KeyError, TypeError, ValueError):
            return None
