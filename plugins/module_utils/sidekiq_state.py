"""Read a Sidekiq fleet's state from Redis as Sidekiq's own API reports it, in a fixed number of round trips.

``read_state()`` runs one server-side script (see ``sidekiq_state_script``) that gathers queue sizes and
latencies, scheduled, retry and dead counts with the due and upcoming entries per queue, processes with
their heartbeats, busy threads and the start time of their oldest job per queue, and the processed/failed
counters. The script takes one round trip, or two
right after Redis lost its script cache, whatever the number of queues and processes.

Layouts of Sidekiq 6, 7 and 8 are read alike: enqueued_at in seconds or milliseconds, concurrency in the
info JSON or in its own hash field, work hashes named ``:workers`` or ``:work``, and an optional
redis-namespace prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    RedisAccessError,
    RedisCommandError,
    RedisSettings,
    translate_redis_error,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    STALE_AFTER_SECONDS,
    JobSetState,
    MalformedEntries,
    PoolState,
    ProcessState,
    QueueState,
    SidekiqState,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_parsing import parse_reply
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_pools import (
    PoolSpec,
    PoolSpecError,
    aggregate_pools,
    parse_pool_specs,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_script import (
    DEFAULT_UPCOMING_WINDOW,
    run_read_script,
)

__all__ = [
    "DEFAULT_DUE_SCAN_LIMIT",
    "STALE_AFTER_SECONDS",
    "JobSetState",
    "MalformedEntries",
    "PoolSpec",
    "PoolSpecError",
    "PoolState",
    "ProcessState",
    "QueueState",
    "SidekiqState",
    "SidekiqStateError",
    "parse_pool_specs",
    "read_state",
]

# Maximum due entries decoded per job set (schedule, retry) to find their queues. Redis serves no other client
# while the script runs, and decoding 10,000 retry entries of 260 bytes took 20 to 40 ms with redis-server 7.0.15
# on a shared 2-CPU machine. Beyond the limit, per-queue due counts are scaled estimates.
DEFAULT_DUE_SCAN_LIMIT = 10_000


class SidekiqStateError(RedisAccessError):
    """The read script failed on the server for a reason other than access."""


def read_state(
    client: Any,
    *,
    namespace_prefix: str = "",
    pools: Iterable[Mapping[str, Any]] | None = None,
    due_scan_limit: int = DEFAULT_DUE_SCAN_LIMIT,
    settings: RedisSettings | None = None,
    upcoming_window: int = DEFAULT_UPCOMING_WINDOW,
) -> SidekiqState:
    """Read the whole state through ``client`` (redis-py) and aggregate it per pool.

    ``namespace_prefix`` is the prefix of every key (``"myapp:"`` with redis-namespace, ``""`` without).
    ``settings``, when given, names the target in error messages. Pools are validated before Redis is touched.
    Scheduled and retry jobs that come due within ``upcoming_window`` seconds count as upcoming.
    Raises PoolSpecError for invalid pools, ValueError for a due_scan_limit below 0, and a RedisAccessError
    subclass when Redis fails or denies the read.
    """
    specs = parse_pool_specs(pools)
    if due_scan_limit < 0:
        raise ValueError(f"due_scan_limit must be 0 or more, got {due_scan_limit}.")
    if upcoming_window < 0:
        raise ValueError(f"upcoming_window must be 0 or more seconds, got {upcoming_window}.")

    try:
        from redis.exceptions import RedisError
    except ImportError as error:  # pragma: no cover - connect() reports the missing package first
        raise RedisAccessError("The Python package 'redis' is not installed.") from error

    try:
        result = run_read_script(client, namespace_prefix, due_scan_limit, upcoming_window)
    except RedisError as error:
        translated = translate_redis_error(error, settings)
        if isinstance(translated, RedisCommandError):
            raise SidekiqStateError(f"The Sidekiq read script failed: {translated}") from error
        raise translated from error
    except ValueError as error:
        raise SidekiqStateError(f"The Sidekiq read script returned a reply that is not JSON: {error}") from error

    state = parse_reply(result.reply, namespace_prefix)
    return replace(state, pools=aggregate_pools(state, specs), round_trips=result.round_trips)
