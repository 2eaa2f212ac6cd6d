"""Tests of the autoscaler's lock and state keys against a real redis-server on a free loopback port."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_store as store
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import FleetKeys, FleetRecord


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Start a redis-server for this module on a free loopback port; stop it by its PID afterwards."""
    directory = tmp_path_factory.mktemp("autoscale-store-redis")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--logfile", str(directory / "redis.log")],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.exceptions.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(
                    f"redis-server on port {port} did not start; see {directory / 'redis.log'}"
                ) from None
            time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def client(redis_port: int) -> Iterator[redis.Redis]:
    connection = redis.Redis(port=redis_port)
    connection.flushdb()
    yield connection
    connection.close()


KEYS = FleetKeys.for_fleet("shop")


def test_keys_under_namespace() -> None:
    keys = FleetKeys.for_fleet("shop", "myapp:")

    assert keys.lock == "myapp:sidekiq-ops:autoscale:shop:lock"
    assert keys.state == "myapp:sidekiq-ops:autoscale:shop:state"


@pytest.mark.parametrize("fleet", ["", "has space", "a:b", "-lead", "x" * 64])
def test_invalid_fleet_name_rejected(fleet: str) -> None:
    with pytest.raises(store.FleetNameError, match=r"fleet .* is invalid; use 1 to 63 letters"):
        FleetKeys.for_fleet(fleet)


def test_lock_taken_by_one_run_only(client: redis.Redis) -> None:
    first = store.new_lock_value()
    second = store.new_lock_value()

    assert store.acquire_lock(client, KEYS, first, 60)
    assert not store.acquire_lock(client, KEYS, second, 60)
    assert client.get(KEYS.lock) == first.encode()
    assert 59_000 < client.pttl(KEYS.lock) <= 60_000


def test_lock_value_names_host_and_time() -> None:
    value = store.new_lock_value(now=1_700_000_000.0)

    token, host, since = value.split(" ")
    assert len(token) == 32
    assert host == f"host={socket.gethostname()}"
    assert since == "since=2023-11-14T22:13:20Z"
    assert store.new_lock_value() != store.new_lock_value()


def test_lock_holder_described(client: redis.Redis) -> None:
    value = store.new_lock_value(now=1_700_000_000.0)
    store.acquire_lock(client, KEYS, value, 30)

    holder = store.lock_holder(client, KEYS)

    assert holder.value == value
    assert holder.expires_in is not None
    assert 29 < holder.expires_in <= 30
    assert holder.describe().startswith(
        f"held by host={socket.gethostname()} since=2023-11-14T22:13:20Z; it expires in "
    )


def test_release_needs_the_whole_value(client: redis.Redis) -> None:
    value = store.new_lock_value()
    store.acquire_lock(client, KEYS, value, 60)

    assert not store.release_lock(client, KEYS, value.split(" ")[0])
    assert client.exists(KEYS.lock)
    assert store.release_lock(client, KEYS, value)
    assert not client.exists(KEYS.lock)
    assert not store.release_lock(client, KEYS, value)


def test_expired_lock_is_free_again(client: redis.Redis) -> None:
    assert store.acquire_lock(client, KEYS, store.new_lock_value(), 0.05)
    time.sleep(0.1)

    assert store.acquire_lock(client, KEYS, store.new_lock_value(), 60)


def test_extend_never_shortens(client: redis.Redis) -> None:
    value = store.new_lock_value()
    store.acquire_lock(client, KEYS, value, 100)

    assert store.extend_lock(client, KEYS, value, 10)
    assert client.pttl(KEYS.lock) > 90_000
    assert store.extend_lock(client, KEYS, value, 500)
    assert client.pttl(KEYS.lock) > 490_000
    assert not store.extend_lock(client, KEYS, "someone else", 900)
    assert client.pttl(KEYS.lock) <= 500_000


def test_state_written_only_under_the_lock(client: redis.Redis) -> None:
    value = store.new_lock_value()
    store.acquire_lock(client, KEYS, value, 60)

    assert not store.write_state(client, KEYS, "another run", {"pool:bulk": "{}"})
    assert not client.exists(KEYS.state)
    assert store.write_state(client, KEYS, value, {"pool:bulk": '{"version": 1}', "fleet": '{"version": 1}'})
    assert client.hgetall(KEYS.state) == {b"pool:bulk": b'{"version": 1}', b"fleet": b'{"version": 1}'}
    assert 0 < client.ttl(KEYS.state) <= store.STATE_TTL
    assert client.exists(KEYS.lock)


def test_write_and_release_together(client: redis.Redis) -> None:
    value = store.new_lock_value()
    store.acquire_lock(client, KEYS, value, 60)

    assert store.write_state(client, KEYS, value, {"pool:bulk": "{}"}, release=True)
    assert client.hget(KEYS.state, "pool:bulk") == b"{}"
    assert not client.exists(KEYS.lock)
    # The lock is gone now, so a late write from the same run is refused.
    assert not store.write_state(client, KEYS, value, {"pool:bulk": '{"late": true}'})
    assert client.hget(KEYS.state, "pool:bulk") == b"{}"


def test_load_state_decodes_and_lists_invalid_fields(client: redis.Redis) -> None:
    client.hset(
        KEYS.state,
        mapping={"pool:bulk": '{"version": 1}', "pool:slow": "not json", "pool:list": "[1]", "fleet": '{"version": 1}'},
    )

    loaded = store.load_state(client, KEYS)

    assert loaded["pools"] == {"bulk": {"version": 1}}
    assert loaded["fleet"] == {"version": 1}
    assert sorted(loaded["invalid"]) == ["pool:list", "pool:slow"]


def test_load_state_of_a_new_fleet(client: redis.Redis) -> None:
    assert store.load_state(client, KEYS) == {"fleet": None, "pools": {}, "invalid": []}


def test_fleet_record_round_trip() -> None:
    record = FleetRecord(processed=12345, at=1_700_000_000.25, busy={"bulk": 3, "critical": 0})

    assert FleetRecord.from_dict(json.loads(record.to_json())) == record


@pytest.mark.parametrize("data", [None, {}, {"version": 2, "processed": 1, "at": 1.0}, {"version": 1, "at": 1.0}])
def test_fleet_record_unusable_gives_none(data: dict[str, object] | None) -> None:
    assert FleetRecord.from_dict(data) is None


def test_keys_do_not_touch_sidekiq_data(client: redis.Redis) -> None:
    client.sadd("queues", "default")
    value = store.new_lock_value()
    store.acquire_lock(client, KEYS, value, 60)
    store.write_state(client, KEYS, value, {"fleet": "{}"}, release=True)

    assert sorted(client.keys()) == [b"queues", b"sidekiq-ops:autoscale:shop:state"]
