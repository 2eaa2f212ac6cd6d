"""The one-task autoscale run when Redis fails or the lock expires after a backend has changed.

The backends are doubles that always reach their target, and Redis is a small double of the commands the lock and
state scripts send, so each test can fail Redis at one exact step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from redis import exceptions as redis_exceptions

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_api, autoscale_store
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_backends import BackendOutcome, BackendReading
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_plan import (
    AutoscaleError,
    PoolOutcome,
    count_diff,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import settings_from_pool
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import RedisUnreachableError
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_kubernetes import KubernetesUnreachableError
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    JobSetState,
    PoolState,
    ProcessState,
    SidekiqState,
)

NOW = 1_800_000_000.0
POOLS = [
    {"name": name, "queues": [name], "concurrency": 10, "processes": {"min": 1, "max": 4}}
    for name in ("first", "second")
]


class ScaledBackend:
    """A backend that is set to one process and reaches every target it is given."""

    resource = "deployments/scale shop/sidekiq-pool"

    def read(self, own: Sequence[ProcessState], redis_client: Any, namespace_prefix: str, now: float) -> BackendReading:
        return BackendReading(requested=1, details={})

    def scale(
        self,
        reading: BackendReading,
        target: int,
        own: Sequence[ProcessState],
        redis_client: Any,
        namespace_prefix: str,
        check_mode: bool,
    ) -> BackendOutcome:
        return BackendOutcome(reached=target, changed=True, actions=[f"Scaled to {target}."])


class ScriptedRedis:
    """The lock and state commands of autoscale_store, with a failure at a chosen step.

    `fail_write` makes the nth state write (1-based) drop the connection; `expire_at_extend` makes the nth lock
    extension find the lock gone.
    """

    def __init__(self, fail_write: int = 0, expire_at_extend: int = 0) -> None:
        self.fail_write = fail_write
        self.expire_at_extend = expire_at_extend
        self.writes: list[dict[str, str]] = []
        self.extends = 0

    def set(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def register_script(self, script: str) -> Any:
        def run(keys: Sequence[str], args: Sequence[str]) -> int:
            if script == autoscale_store.EXTEND_LUA:
                self.extends += 1
                return 0 if self.extends == self.expire_at_extend else 1
            if len(self.writes) + 1 == self.fail_write:
                raise redis_exceptions.ConnectionError("Connection closed by server.")
            pairs = list(args[3:])
            self.writes.append(dict(zip(pairs[::2], pairs[1::2], strict=True)))
            return 1

        return run


def busy_pool_state(name: str) -> PoolState:
    return PoolState(
        name=name,
        queues=(name,),
        queued=500,
        scheduled_due=0,
        retry_due=0,
        backlog=500,
        latency=60.0,
        busy=0,
        capacity=10,
        processes=1,
        quiet_processes=0,
        due_estimated=False,
    )


def backlog_state() -> SidekiqState:
    """Return a reading with 500 jobs waiting in each pool's queue, which makes the policy scale every pool out."""
    no_jobs = JobSetState("schedule", 0, 0, {}, 0)
    return SidekiqState(
        now=NOW,
        processed=0,
        failed=0,
        queues={},
        scheduled=no_jobs,
        retries=JobSetState("retry", 0, 0, {}, 0),
        dead=0,
        processes=(),
        malformed=(),
        sidekiq_data_found=True,
        pools={str(item["name"]): busy_pool_state(str(item["name"])) for item in POOLS},
    )


@pytest.fixture
def request_for_two_pools(monkeypatch: pytest.MonkeyPatch) -> autoscale_api.ApiRequest:
    monkeypatch.setattr(autoscale_api, "read_state", lambda client, **_: backlog_state())
    monkeypatch.setattr(autoscale_api, "load_state", lambda client, keys: {"fleet": None, "pools": {}, "invalid": []})
    return autoscale_api.ApiRequest(
        backend="kubernetes",
        pools=POOLS,
        settings={str(pool["name"]): settings_from_pool(pool) for pool in POOLS},
        selected=["first", "second"],
        fleet="shop",
        backends={"first": ScaledBackend(), "second": ScaledBackend()},
    )


def test_redis_failure_names_changed_backends(request_for_two_pools: autoscale_api.ApiRequest) -> None:
    redis = ScriptedRedis(fail_write=2)

    with pytest.raises(AutoscaleError) as raised:
        autoscale_api.run_api(redis, request_for_two_pools)

    message = str(raised.value)
    assert "Connection closed by server." in message
    assert "Backends already changed: first (to 4), second (to 4)" in message
    assert isinstance(raised.value.__cause__, RedisUnreachableError)


def test_scaled_pool_state_survives_lock_loss(request_for_two_pools: autoscale_api.ApiRequest) -> None:
    redis = ScriptedRedis(expire_at_extend=2)

    with pytest.raises(AutoscaleError) as raised:
        autoscale_api.run_api(redis, request_for_two_pools)

    assert "expired before pool second was scaled" in str(raised.value)
    assert "Backends already changed: first (to 4)" in str(raised.value)
    (stored,) = redis.writes[:1]
    first = json.loads(stored["pool:first"])
    assert first["last_action"] == "scale_out"
    assert first["last_action_at"] == NOW


def test_store_translates_redis_errors() -> None:
    keys = autoscale_store.FleetKeys.for_fleet("shop")

    with pytest.raises(RedisUnreachableError, match="Connection closed by server"):
        autoscale_store.write_state(ScriptedRedis(fail_write=1), keys, "token", {"fleet": "{}"})


def test_diff_says_unknown_for_unread_pool() -> None:
    outcome = PoolOutcome(name="default", status="failed", action="hold", reason="Reading failed.")

    diff = count_diff([outcome])

    assert diff["before"] == "default: unknown (the backend could not be read)\n"
    assert diff["after"] == "default: unknown (the backend could not be read)\n"


class UnreachableBackend:
    """A backend whose API server refuses every connection; counts the reads."""

    resource = "deployments/scale shop/sidekiq-pool"

    def __init__(self) -> None:
        self.reads = 0

    def read(self, own: Sequence[ProcessState], redis_client: Any, namespace_prefix: str, now: float) -> BackendReading:
        self.reads += 1
        raise KubernetesUnreachableError("Could not connect to the Kubernetes API server: connection refused.")

    def scale(self, *args: Any) -> BackendOutcome:
        raise AssertionError("scale() must not run after a failed read")


def test_unreachable_api_tried_once(request_for_two_pools: autoscale_api.ApiRequest) -> None:
    backend = UnreachableBackend()
    request = replace(request_for_two_pools, backends={"first": backend, "second": backend})

    result = autoscale_api.run_api(ScriptedRedis(), request)

    assert backend.reads == 1
    assert result["pools"]["first"]["error"].startswith("Could not connect to the Kubernetes API server")
    assert result["pools"]["second"]["error"] == (
        "not tried, because the API failed for pool first in the same way (see there)."
    )
    assert len(result["problems"]) == 2
