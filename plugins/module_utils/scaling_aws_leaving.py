"""The Redis side of the AWS backends: the records of leaving and protected members, and the quiet signal.

Both records are hashes, under the app's namespace prefix when it uses redis-namespace, and each expires
LEAVING_TTL seconds after its last write:

- ``sidekiq-ops:autoscale:aws:<backend>:<target>:leaving``, one field per member (instance id or task ARN), each
  a JSON ``LeavingEntry``;
- ``sidekiq-ops:autoscale:aws:<backend>:<target>:protected``, one field per member whose scale-in protection the
  backend turned on, with the epoch seconds of that run. Only ``aws_asg`` writes it, because EC2 protection never
  expires and the backend must take off what it set, and only what it set.

The record, not Sidekiq's quiet flag, decides which members may be removed: a deploy also quiets processes
(the sidekiq role's handlers send TSTP before a restart), and such a member must stay.

Quieting uses Sidekiq's remote control, as ``Sidekiq::Process#quiet!`` does in Sidekiq 6.4: ``LPUSH
<identity>-signals TSTP`` and ``EXPIRE`` 60 s in one transaction. Each process pops its signal list on its next
heartbeat (every 5 s in 6.x, 10 s from 7.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import translate_redis_error
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_plan import LeavingEntry

KEY_ROOT = "sidekiq-ops:autoscale:aws"
# Seconds the record lives after its last write: a week, like the autoscaler's own state.
LEAVING_TTL = 7 * 24 * 3600
# The expiry Sidekiq 6.4 itself gives a signal list (Sidekiq::Process#signal), so that no signal outlives its process.
SIGNAL_TTL = 60
QUIET_SIGNAL = "TSTP"


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn a redis-py error inside the block into the matching RedisAccessError subclass."""
    try:
        yield
    except Exception as error:
        if type(error).__module__.split(".", maxsplit=1)[0] != "redis":
            raise
        raise translate_redis_error(error) from error


def leaving_key(backend: str, target: str, namespace_prefix: str = "") -> str:
    """Return the key of a group's or service's leaving record (target: group name, or cluster/service)."""
    return f"{namespace_prefix}{KEY_ROOT}:{backend}:{target}:leaving"


def protection_key(backend: str, target: str, namespace_prefix: str = "") -> str:
    """Return the key of the record of members that the backend protected (target as for `leaving_key`)."""
    return f"{namespace_prefix}{KEY_ROOT}:{backend}:{target}:protected"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_leaving(client: Any, key: str) -> tuple[dict[str, LeavingEntry], list[str]]:
    """Read the leaving record; return the entries by member id and the fields that could not be read."""
    entries: dict[str, LeavingEntry] = {}
    invalid: list[str] = []
    for raw_name, raw_value in (client.hgetall(key) or {}).items():
        name = _text(raw_name)
        entry = LeavingEntry.from_json(raw_value)
        if entry is None:
            invalid.append(name)
        else:
            entries[name] = entry
    return entries, invalid


def save_leaving(client: Any, key: str, entries: Mapping[str, LeavingEntry]) -> None:
    """Write entries into the record (one HSET) and refresh its expiry."""
    if not entries:
        return
    pipeline = client.pipeline(transaction=True)
    pipeline.hset(key, mapping={member: entry.to_json() for member, entry in entries.items()})
    pipeline.expire(key, LEAVING_TTL)
    pipeline.execute()


def forget_leaving(client: Any, key: str, members: Iterable[str]) -> None:
    """Delete members from a record: the leaving record or the protection record."""
    names = list(members)
    if names:
        client.hdel(key, *names)


def load_protection(client: Any, key: str) -> tuple[str, ...]:
    """Read the protection record; return the member ids in it, sorted."""
    return tuple(sorted(_text(name) for name in (client.hgetall(key) or {})))


def save_protection(client: Any, key: str, members: Iterable[str], now: float) -> None:
    """Add members to the protection record with the time `now`, and refresh its expiry."""
    names = list(dict.fromkeys(members))
    if not names:
        return
    pipeline = client.pipeline(transaction=True)
    pipeline.hset(key, mapping=dict.fromkeys(names, str(now)))
    pipeline.expire(key, LEAVING_TTL)
    pipeline.execute()


def quiet_processes(client: Any, identities: Iterable[str], namespace_prefix: str = "") -> list[str]:
    """Send TSTP to each Sidekiq process through its signal list; return the identities signalled."""
    sent = list(dict.fromkeys(identities))
    if not sent:
        return sent
    pipeline = client.pipeline(transaction=True)
    for identity in sent:
        signals = f"{namespace_prefix}{identity}-signals"
        pipeline.lpush(signals, QUIET_SIGNAL)
        pipeline.expire(signals, SIGNAL_TTL)
    pipeline.execute()
    return sent
