"""The reader on Redis data written by hand: Sidekiq 7 and 8 layouts, a namespace, malformed entries, scale.

Sidekiq 7 and 8 cannot run on Debian 12, so their keys are written here as their source writes them
(7.x launcher: ":work" hashes, float-second timestamps; 8.0: integer-millisecond enqueued_at; 8.1.2:
"concurrency" as its own hash field). Expected values are worked out by hand from the written data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sidekiq_fixtures import RedisServer, running_redis  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import SidekiqState, read_state


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


def compact(value: Any) -> str:
    """Encode JSON without spaces, as Ruby's JSON.generate does."""
    return json.dumps(value, separators=(",", ":"))


def job(queue: str, **fields: Any) -> str:
    return compact({"class": "HardJob", "queue": queue, "args": [1], "jid": "b4a577edbccf1d805744efa9", **fields})


def write_process(
    client: redis.Redis,
    identity: str,
    info: dict[str, Any],
    beat: float,
    *,
    prefix: str = "",
    busy: int = 0,
    quiet: str = "false",
    extra: dict[str, Any] | None = None,
    work_key: str = "work",
    work: dict[str, str] | None = None,
) -> None:
    client.sadd(prefix + "processes", identity)
    fields: dict[Any, Any] = {"info": json.dumps(info), "busy": busy, "beat": repr(beat), "quiet": quiet, "rss": 204800}
    fields.update(extra or {})
    client.hset(prefix + identity, mapping=fields)
    client.expire(prefix + identity, 60)
    if work:
        work_fields: dict[Any, Any] = dict(work)
        client.hset(f"{prefix}{identity}:{work_key}", mapping=work_fields)


def test_sidekiq_7_layout(client: redis.Redis) -> None:
    now = time.time()
    client.sadd("queues", "default", "mailers")
    # Sidekiq pushes on the left, so the oldest job is at the right end (index -1).
    client.lpush("queue:default", job("default", created_at=now - 90.25, enqueued_at=now - 90.25))
    client.lpush("queue:default", job("default", enqueued_at=now - 5.0, created_at=now - 5.0))
    client.lpush("queue:mailers", job("mailers", enqueued_at=now - 1.5, created_at=now - 1.5))
    client.set("stat:processed", 1500)
    client.set("stat:failed", 12)
    info = {
        "hostname": "app-1",
        "started_at": now - 3600,
        "pid": 4711,
        "tag": "shop",
        "concurrency": 5,
        "queues": ["default", "mailers"],
        "weights": [{"default": 0, "mailers": 0}],
        "labels": ["blue"],
        "identity": "app-1:4711:7f3a9c",
        "version": "7.2.4",
        "embedded": False,
    }
    work = {
        "tid-1": compact({"queue": "default", "payload": job("default"), "run_at": int(now) - 3}),
        # Keys in another order than Sidekiq writes them: the reader decodes the whole entry.
        "tid-2": json.dumps({"run_at": int(now) - 1, "payload": job("mailers"), "queue": "mailers"}),
        "tid-3": compact({"queue": 'say "hi"', "payload": job('say "hi"'), "run_at": int(now)}),
    }
    write_process(client, "app-1:4711:7f3a9c", info, now - 2.0, busy=3, work=work)

    state = read_state(client, pools=[{"name": "default", "queues": ["default", "mailers"]}])

    assert state.processed == 1500
    assert state.failed == 12
    default = state.queues["default"]
    assert default.size == 2
    assert default.oldest_enqueued_at == now - 90.25
    assert default.latency == pytest.approx(state.now - (now - 90.25), abs=1e-6)
    assert 90.25 <= default.latency < 95
    assert state.queues["mailers"].latency == pytest.approx(state.now - (now - 1.5), abs=1e-6)
    (process,) = state.processes
    assert process.version == "7.2.4"
    assert process.concurrency == 5
    assert process.busy_by_queue == {"default": 1, "mailers": 1, 'say "hi"': 1}
    assert process.live is True
    assert process.seconds_since_beat == pytest.approx(state.now - (now - 2.0), abs=1e-6)
    pool = state.pools["default"]
    assert (pool.queued, pool.busy, pool.capacity, pool.processes) == (3, 2, 5, 1)
    assert state.busy == 3
    assert pool.latency == default.latency
    assert state.malformed == ()


def test_sidekiq_8_layout(client: redis.Redis) -> None:
    now = time.time()
    enqueued_ms = int(now * 1000) - 12_345
    client.sadd("queues", "default")
    client.lpush("queue:default", job("default", enqueued_at=enqueued_ms, created_at=enqueued_ms))
    client.lpush("queue:default", job("default", enqueued_at=enqueued_ms + 10_000, created_at=enqueued_ms + 10_000))
    # 8.1.2+: concurrency is its own field; the info JSON no longer carries it.
    info = {
        "hostname": "app-2",
        "started_at": now - 60,
        "pid": 99,
        "tag": "",
        "queues": ["default"],
        "weights": [{"default": 0}],
        "labels": [],
        "identity": "app-2:99:0b1c",
        "version": "8.1.2",
        "embedded": False,
    }
    work = {"tid-9": compact({"queue": "default", "payload": job("default"), "run_at": int(now * 1000)})}
    write_process(client, "app-2:99:0b1c", info, now - 1.0, busy=1, extra={"concurrency": 8}, work=work)

    state = read_state(client, pools=[{"name": "default", "queues": [["default", 1]]}])

    default = state.queues["default"]
    assert default.oldest_enqueued_at == pytest.approx(enqueued_ms / 1000, abs=1e-9)
    assert default.latency == pytest.approx(state.now - enqueued_ms / 1000, abs=1e-6)
    assert 12.345 <= default.latency < 20
    (process,) = state.processes
    assert process.concurrency == 8
    assert process.version == "8.1.2"
    assert process.busy_by_queue == {"default": 1}
    assert state.pools["default"].capacity == 8
    assert state.pools["default"].backlog == 2


def test_enqueued_at_found_in_any_key_order(client: redis.Redis) -> None:
    # Sidekiq's client writes enqueued_at last, and the reader takes that number as written. Every other form
    # is decoded, so a nested "enqueued_at" (ActiveJob wrappers carry one) never replaces the top-level one.
    jobs = {
        "last": '{"class":"X","queue":"last","args":[{"enqueued_at":1}],"enqueued_at":1700000100.125}',
        "first": '{"enqueued_at":1700000100.125,"class":"X","queue":"first","args":[{"enqueued_at":1}]}',
        "nested_last": '{"class":"X","queue":"nested_last","enqueued_at":1700000100.125,"wrapped":{"enqueued_at":1}}',
        "spaced": '{"class": "X", "queue": "spaced", "enqueued_at": 1700000100.125}',
        "milliseconds": '{"class":"X","queue":"milliseconds","enqueued_at":1700000100125}',
    }
    for name, raw in jobs.items():
        client.sadd("queues", name)
        client.lpush(f"queue:{name}", raw)

    state = read_state(client)

    for name in jobs:
        assert state.queues[name].oldest_enqueued_at == pytest.approx(1_700_000_100.125, abs=1e-9), name
    assert state.malformed == ()


def test_sidekiq_6_4_workers_hash(client: redis.Redis) -> None:
    now = time.time()
    info = {"hostname": "h", "pid": 1, "tag": "", "concurrency": 10, "queues": ["q"], "identity": "h:1:a"}
    work = {"t": compact({"queue": "q", "payload": job("q"), "run_at": int(now)})}
    write_process(client, "h:1:a", info, now, busy=1, work_key="workers", work=work)

    state = read_state(client)

    assert state.processes[0].busy_by_queue == {"q": 1}
    assert state.busy == 1


def test_namespace_prefix(client: redis.Redis) -> None:
    now = time.time()
    client.sadd("shop:queues", "default")
    client.lpush("shop:queue:default", job("default", enqueued_at=now - 3.0))
    client.lpush("shop:queue:default", job("default", enqueued_at=now - 2.0))
    client.zadd("shop:retry", {job("default", retry_count=0): now - 10})
    client.set("shop:stat:processed", 7)
    info = {"hostname": "h", "pid": 5, "tag": "", "concurrency": 3, "queues": ["default"], "identity": "h:5:n"}
    work = {"t": compact({"queue": "default", "payload": job("default"), "run_at": int(now)})}
    write_process(client, "h:5:n", info, now - 1, prefix="shop:", busy=1, work=work)
    # Keys of another app without the namespace must not leak in.
    client.sadd("queues", "other")
    client.lpush("queue:other", job("other", enqueued_at=now))

    state = read_state(client, namespace_prefix="shop:", pools=[{"name": "p", "queues": ["default"]}])

    assert list(state.queues) == ["default"]
    assert state.queues["default"].size == 2
    assert state.queues["default"].oldest_enqueued_at == now - 3.0
    assert state.processed == 7
    assert state.retries.due_by_queue == {"default": 1}
    (process,) = state.processes
    assert process.identity == "h:5:n"
    assert process.live is True
    assert process.busy_by_queue == {"default": 1}
    assert state.pools["p"].backlog == 3

    plain = read_state(client)
    assert list(plain.queues) == ["other"]
    assert plain.processes == ()


def test_due_jobs_counted_per_queue(client: redis.Redis) -> None:
    now = time.time()
    for index in range(5):
        client.zadd("schedule", {job("default", args=[index]): now - 100 + index})
    for index in range(3):
        client.zadd("schedule", {job("low", args=[index]): now - 50 + index})
    client.zadd("schedule", {job("default", args=["later"]): now + 300})
    client.zadd("retry", {job("low", args=["r1"], retry_count=1): now - 1})
    client.zadd("retry", {job("low", args=["r2"], retry_count=2): now + 60})
    client.zadd("dead", {job("low", args=["d"]): now - 1000})

    state = read_state(client, pools=[{"name": "all", "queues": ["default", "low"]}])

    assert (state.scheduled.size, state.scheduled.due, state.scheduled.due_scanned) == (9, 8, 8)
    assert state.scheduled.due_by_queue == {"default": 5, "low": 3}
    assert (state.retries.size, state.retries.due) == (2, 1)
    assert state.retries.due_by_queue == {"low": 1}
    assert state.dead == 1
    pool = state.pools["all"]
    assert (pool.queued, pool.scheduled_due, pool.retry_due, pool.backlog) == (0, 8, 1, 9)
    assert pool.due_estimated is False


def test_due_scan_limit_scales_estimate(client: redis.Redis) -> None:
    now = time.time()
    # 30 due entries, oldest first: 10 for "a", then 20 for "b". A limit of 15 decodes all of "a" and 5 of "b".
    for index in range(10):
        client.zadd("retry", {job("a", args=[index]): now - 100 + index})
    for index in range(20):
        client.zadd("retry", {job("b", args=[index]): now - 50 + index})

    state = read_state(
        client, due_scan_limit=15, pools=[{"name": "a", "queues": ["a"]}, {"name": "b", "queues": ["b"]}]
    )

    assert state.retries.due == 30
    assert state.retries.due_scanned == 15
    assert state.retries.due_truncated is True
    assert state.retries.due_by_queue == {"a": 10, "b": 5}
    # Scaled by 30 / 15: the estimate assumes unscanned entries spread like scanned ones.
    assert (state.pools["a"].retry_due, state.pools["a"].due_estimated) == (20, True)
    assert (state.pools["b"].retry_due, state.pools["b"].due_estimated) == (10, True)


def test_malformed_entries_are_counted_not_fatal(client: redis.Redis) -> None:
    now = time.time()
    client.sadd("queues", "broken", "naked", "stringly", "wrongtype", "fine")
    client.lpush("queue:broken", "{this is not json")
    client.lpush("queue:naked", json.dumps({"class": "X", "queue": "naked"}))
    client.lpush("queue:stringly", job("stringly", enqueued_at="yesterday"))
    client.set("queue:wrongtype", "not a list")
    client.lpush("queue:fine", job("fine", enqueued_at=now - 4))
    client.zadd("schedule", {"{broken": now - 5, job("fine"): now - 5, json.dumps({"class": "NoQueue"}): now - 5})
    client.set("stat:failed", "many")
    info = {"hostname": "h", "pid": 1, "tag": "", "concurrency": 2, "queues": ["fine"], "identity": "h:1:a"}
    work = {"t1": "{nope", "t2": compact({"payload": "{}"}), "t3": compact({"queue": "fine", "payload": "{}"})}
    write_process(client, "h:1:a", info, now, busy=3, work=work)
    client.sadd("processes", "h:2:b", "h:3:c", "h:4:d")
    client.set("h:2:b", "a string, not a hash")
    client.hset("h:3:c", mapping={"info": "{oops", "beat": now, "busy": 0})
    client.hset("h:4:d", mapping={"busy": 0, "beat": now})

    state = read_state(client, pools=[{"name": "p", "queues": ["fine", "broken"]}])

    malformed = {(entry.kind, entry.reason): entry.count for entry in state.malformed}
    assert malformed == {
        ("queued job", "invalid JSON"): 1,
        ("queued job", "no enqueued_at"): 1,
        ("queued job", "enqueued_at is not a number"): 1,
        ("queued job", "queue key is not a list"): 1,
        ("scheduled job", "invalid JSON"): 1,
        ("scheduled job", "no queue name"): 1,
        ("counter", "not an integer"): 1,
        ("work entry", "invalid JSON"): 1,
        ("work entry", "no queue name"): 1,
        ("process", "heartbeat key is not a hash"): 1,
        ("process", "info is not valid JSON"): 1,
        ("process", "heartbeat hash has no info field"): 1,
    }
    assert state.malformed_total == 12
    assert state.queues["fine"].latency == pytest.approx(state.now - (now - 4), abs=1e-6)
    assert state.queues["broken"].size == 1
    assert state.queues["broken"].latency == 0.0
    assert state.queues["wrongtype"].size == 0
    assert state.scheduled.due == 3
    assert state.scheduled.due_by_queue == {"fine": 1}
    assert [process.identity for process in state.live_processes] == ["h:1:a"]
    assert state.live_processes[0].busy_by_queue == {"fine": 1}
    assert state.pools["p"].capacity == 2
    assert state.pools["p"].backlog == 3


def test_wrong_type_for_top_level_keys(client: redis.Redis) -> None:
    client.set("queues", "oops")
    client.set("processes", "oops")
    client.set("retry", "oops")

    state = read_state(client)

    (entry,) = state.malformed
    assert entry.kind == "key"
    assert entry.reason.startswith("WRONGTYPE")
    assert entry.count == 3
    assert sorted(entry.examples) == ["processes", "queues", "retry"]
    assert state.queues == {}
    assert state.processes == ()
    assert state.retries.size == 0


def test_old_beat_with_live_hash_is_stale(client: redis.Redis) -> None:
    now = time.time()
    info = {"hostname": "h", "pid": 1, "tag": "", "concurrency": 4, "queues": ["q"], "identity": "h:1:a"}
    write_process(client, "h:1:a", info, now - 120)

    state = read_state(client, pools=[{"name": "p", "queues": ["q"]}])

    (process,) = state.processes
    assert process.live is False
    assert process.stale_reason is not None
    assert process.stale_reason.startswith("last heartbeat 12")
    assert state.pools["p"].capacity == 0


def build_fleet(client: redis.Redis, queues: int, processes: int) -> None:
    now = time.time()
    pipeline = client.pipeline(transaction=False)
    for index in range(queues):
        name = f"q{index}"
        pipeline.sadd("queues", name)
        pipeline.lpush(f"queue:{name}", job(name, enqueued_at=now - index % 50))
    for index in range(processes):
        identity = f"host{index}:{1000 + index}:n{index}"
        info = {"hostname": f"host{index}", "pid": 1000 + index, "concurrency": 5, "queues": [f"q{index % queues}"]}
        pipeline.sadd("processes", identity)
        pipeline.hset(identity, mapping={"info": json.dumps(info), "busy": 1, "beat": now, "quiet": "false"})
        pipeline.hset(f"{identity}:workers", "t", compact({"queue": f"q{index % queues}", "payload": "{}"}))
    pipeline.execute()


def count_client_commands(client: redis.Redis) -> tuple[SidekiqState, dict[str, int]]:
    """Read once and return the commands the client sent, from Redis's command statistics."""
    read_state(client)
    client.config_resetstat()
    state = read_state(client)
    stats = client.info("commandstats")
    sent = {name: int(values["calls"]) for name, values in stats.items() if name.startswith("cmdstat_eval")}
    return state, sent


@pytest.mark.parametrize(("queues", "processes"), [(10, 5), (2000, 200)])
def test_round_trips_do_not_grow(client: redis.Redis, queues: int, processes: int) -> None:
    build_fleet(client, queues, processes)

    state, sent = count_client_commands(client)

    assert len(state.queues) == queues
    assert len(state.live_processes) == processes
    assert state.busy == processes
    assert state.round_trips == 1
    assert sent == {"cmdstat_evalsha": 1}


def test_first_read_sends_script_body(client: redis.Redis) -> None:
    client.script_flush()

    first = read_state(client)
    second = read_state(client)

    assert first.round_trips == 2
    assert second.round_trips == 1


def test_empty_database_reports_no_sidekiq_data(client: redis.Redis) -> None:
    client.set("unrelated", "value")

    state = read_state(client)

    assert state.sidekiq_data_found is False
    assert state.to_dict()["queues"] == {}
