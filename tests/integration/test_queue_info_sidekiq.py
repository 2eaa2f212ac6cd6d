"""The reader against the real Sidekiq 6.4.1: every number must match what Sidekiq's own Ruby API reports.

Each test builds a state with real Sidekiq processes from examples/demo-app and Sidekiq's Ruby client,
reads it with the reader and with sidekiq_api_dump.rb, and compares field by field. Latencies may differ
only by the time between the two reads.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sidekiq_fixtures import (  # type: ignore[import-not-found]
    RedisServer,
    SidekiqWorker,
    ruby_api_dump,
    ruby_enqueue,
    ruby_eval,
    ruby_seed_random,
    running_redis,
    sidekiq_launcher,
    wait_for,
)

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import connect
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import SidekiqState, read_state

pytestmark = pytest.mark.sidekiq

POOLS: list[dict[str, Any]] = [
    {"name": "default", "queues": [["default", 2], ["low", 1]]},
    {"name": "slow", "queues": ["slow"]},
    {"name": "critical", "queues": ["critical"]},
]

# Floats travel through JSON on both sides; allow for rounding in the last digits only.
FLOAT_SLACK = 1e-6


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def sidekiq_workers(tmp_path: Path) -> Iterator[Callable[..., SidekiqWorker]]:
    with sidekiq_launcher(tmp_path / "sidekiq") as start:
        yield start


def read(server: RedisServer, pools: list[dict[str, Any]] | None = None) -> SidekiqState:
    return read_state(connect({"redis_url": server.url}), pools=POOLS if pools is None else pools)


def heartbeat_signature(state: SidekiqState) -> Any:
    """Everything that a heartbeat or a finished job can change between two reads."""
    processes = tuple(
        (
            process.identity,
            process.beat,
            process.busy,
            process.quiet,
            process.rss_kb,
            tuple(process.busy_by_queue.items()),
        )
        for process in state.processes
    )
    queues = tuple((name, queue.size, queue.oldest_enqueued_at) for name, queue in state.queues.items())
    job_sets = (state.scheduled.size, state.scheduled.due, state.retries.size, state.retries.due, state.dead)
    return processes, queues, job_sets, state.processed, state.failed


def read_with_ruby(
    server: RedisServer, pools: list[dict[str, Any]] | None = None
) -> tuple[SidekiqState, dict[str, Any]]:
    """Read with the reader, then with Sidekiq's Ruby API, then with the reader again.

    When a heartbeat or a job changed the data between the two reader calls, the Ruby read may have seen
    either version, so the triple is repeated.
    """
    for _attempt in range(6):
        before = read(server, pools)
        ruby = ruby_api_dump(server.url)
        after = read(server, pools)
        if heartbeat_signature(before) == heartbeat_signature(after):
            return before, ruby
    raise AssertionError("the Sidekiq data kept changing during six read attempts")


def assert_latency_matches(ours: float, ruby_latency: float, state: SidekiqState, ruby: dict[str, Any]) -> None:
    """Ruby computed its latency at some moment between read_started_at and read_finished_at."""
    earliest = ruby["read_started_at"] - state.now - FLOAT_SLACK
    latest = ruby["read_finished_at"] - state.now + FLOAT_SLACK
    assert earliest <= ruby_latency - ours <= latest, (ours, ruby_latency, earliest, latest)


def assert_matches_ruby(state: SidekiqState, ruby: dict[str, Any]) -> None:
    stats = ruby["stats"]
    assert state.processed == stats["processed"]
    assert state.failed == stats["failed"]
    assert state.scheduled.size == stats["scheduled_size"]
    assert state.retries.size == stats["retry_size"]
    assert state.dead == stats["dead_size"]
    assert state.dead == ruby["dead_size"]
    assert len(state.processes) == stats["processes_size"]
    assert state.enqueued == stats["enqueued"]
    assert sum(process.busy for process in state.processes) == stats["workers_size"]

    assert sorted(state.queues) == sorted(ruby["queues"])
    for name, expected in ruby["queues"].items():
        queue = state.queues[name]
        assert queue.size == expected["size"], name
        if expected["size"] == 0:
            assert queue.latency == 0.0
            assert expected["latency"] == 0
        else:
            assert_latency_matches(queue.latency, expected["latency"], state, ruby)

    # Sidekiq::ProcessSet skips members whose heartbeat hash is gone; the reader keeps them as stale.
    with_heartbeat = {process.identity: process for process in state.processes if process.beat is not None}
    assert sorted(with_heartbeat) == sorted(process["identity"] for process in ruby["processes"])
    for expected in ruby["processes"]:
        process = with_heartbeat[expected["identity"]]
        assert process.hostname == expected["hostname"]
        assert process.pid == expected["pid"]
        assert process.tag == expected["tag"]
        assert list(process.labels) == expected["labels"]
        assert process.concurrency == expected["concurrency"]
        assert list(process.queues) == expected["queues"]
        assert process.busy == expected["busy"]
        assert process.quiet == expected["quiet"]
        assert process.beat == expected["beat"]
        assert process.rss_kb == expected["rss"]

    expected_work = Counter((work["process"], work["queue"]) for work in ruby["workers"])
    our_work = Counter(
        {
            (process.identity, queue): count
            for process in with_heartbeat.values()
            for queue, count in process.busy_by_queue.items()
        }
    )
    assert our_work == expected_work

    for ours, expected in ((state.scheduled, ruby["scheduled"]), (state.retries, ruby["retries"])):
        assert ours.size == expected["size"], ours.name
        assert ours.due == expected["due"], ours.name
        assert ours.due_by_queue == expected["due_by_queue"], ours.name
        assert ours.due_truncated is False


def assert_pools_match_ruby(state: SidekiqState, ruby: dict[str, Any], pools: list[dict[str, Any]]) -> None:
    """Recompute every pool signal from Sidekiq's Ruby API output and compare."""
    assert sorted(state.pools) == sorted(pool["name"] for pool in pools)
    for pool in pools:
        names = [queue if isinstance(queue, str) else queue[0] for queue in pool["queues"]]
        ours = state.pools[pool["name"]]
        queued = sum(ruby["queues"].get(name, {"size": 0})["size"] for name in names)
        scheduled_due = sum(ruby["scheduled"]["due_by_queue"].get(name, 0) for name in names)
        retry_due = sum(ruby["retries"]["due_by_queue"].get(name, 0) for name in names)
        serving = [process for process in ruby["processes"] if set(process["queues"]) & set(names)]
        active = [process for process in serving if not process["quiet"]]

        assert ours.queued == queued, pool["name"]
        assert ours.scheduled_due == scheduled_due, pool["name"]
        assert ours.retry_due == retry_due, pool["name"]
        assert ours.backlog == queued + scheduled_due + retry_due, pool["name"]
        assert ours.busy == sum(1 for work in ruby["workers"] if work["queue"] in names), pool["name"]
        assert ours.capacity == sum(process["concurrency"] for process in active), pool["name"]
        assert ours.processes == len(active), pool["name"]
        assert ours.quiet_processes == len(serving) - len(active), pool["name"]
        latencies = [ruby["queues"][name]["latency"] for name in names if ruby["queues"].get(name, {"size": 0})["size"]]
        if latencies:
            assert_latency_matches(ours.latency, max(latencies), state, ruby)
        else:
            assert ours.latency == 0.0


def test_queued_jobs_match_ruby(redis_server: RedisServer) -> None:
    ruby_enqueue(redis_server.url, "--fast", "30", "--queues", "default,low,critical", "--slow", "4")
    time.sleep(0.3)
    ruby_enqueue(redis_server.url, "--fast", "5", "--queues", "low,other")

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    assert {name: queue.size for name, queue in state.queues.items()} == {
        "critical": 10,
        "default": 10,
        "low": 13,
        "other": 2,
        "slow": 4,
    }
    assert state.queues["default"].latency > 0.3
    assert state.pools["default"].backlog == 23
    assert state.processes == ()
    assert state.malformed == ()
    assert state.round_trips in (1, 2)


def test_scheduled_and_due_jobs_match_ruby(redis_server: RedisServer) -> None:
    ruby_enqueue(redis_server.url, "--fast", "6", "--queues", "default,slow", "--in", "300")
    ruby_eval(
        redis_server.url,
        '3.times { |i| Sidekiq::Client.push("class" => "FastJob", "queue" => "default", "args" => [i], '
        '"at" => Time.now.to_f - 30) }; '
        '2.times { |i| Sidekiq::Client.push("class" => "SlowJob", "queue" => "slow", "args" => [1], '
        '"at" => Time.now.to_f - 45) }',
    )

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    assert state.scheduled.size == 11
    assert state.scheduled.due == 5
    assert state.scheduled.due_by_queue == {"default": 3, "slow": 2}
    # Scheduled jobs are not in any queue yet, but due ones are backlog.
    assert state.enqueued == 0
    assert state.pools["default"].backlog == 3
    assert state.pools["slow"].backlog == 2


def test_retries_and_dead_jobs_match_ruby(
    redis_server: RedisServer, sidekiq_workers: Callable[..., SidekiqWorker]
) -> None:
    worker = sidekiq_workers(redis_server.url, ("default",), concurrency=2)
    worker.identity(redis_server.client())
    ruby_enqueue(redis_server.url, "--failing", "3")
    wait_for(lambda: read(redis_server).retries.size == 3, timeout=30, description="3 jobs in the retry set")

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    assert state.retries.due == 0

    # Move the retries back to their queue with Sidekiq's API; their second failure uses up retry: 1.
    ruby_eval(redis_server.url, "Sidekiq::RetrySet.new.each(&:add_to_queue)")

    def retries_exhausted() -> bool:
        state = read(redis_server)
        return state.dead == 3 and state.retries.size == 0 and state.failed == 6

    wait_for(retries_exhausted, timeout=40, description="3 dead jobs and 6 failures flushed by a heartbeat")

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    assert state.dead == 3
    assert state.processed == 6
    assert state.failed == 6


def start_busy_workers(
    server: RedisServer, sidekiq_workers: Callable[..., SidekiqWorker]
) -> tuple[SidekiqWorker, SidekiqWorker]:
    """Start two workers whose every thread runs a 60 s SlowJob, with two more slow jobs left queued."""
    only_slow = sidekiq_workers(server.url, ("slow",), concurrency=2)
    mixed = sidekiq_workers(server.url, ("slow", "default"), concurrency=3, tag="mixed")
    ruby_enqueue(server.url, "--slow", "7", "--slow-seconds", "60")
    wait_for(
        lambda: read(server).busy == 5,
        timeout=30,
        description="5 busy threads in the work hashes (written at the next heartbeat)",
    )
    return only_slow, mixed


def test_busy_workers_match_ruby(redis_server: RedisServer, sidekiq_workers: Callable[..., SidekiqWorker]) -> None:
    only_slow, mixed = start_busy_workers(redis_server, sidekiq_workers)

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    by_pid = {process.pid: process for process in state.processes}
    assert by_pid[only_slow.pid].busy_by_queue == {"slow": 2}
    assert by_pid[mixed.pid].busy_by_queue == {"slow": 3}
    assert by_pid[mixed.pid].tag == "mixed"
    assert all(process.live for process in state.processes)
    assert state.queues["slow"].size == 2
    assert state.queues["slow"].busy == 5
    assert state.queues["slow"].live_processes == 2
    slow = state.pools["slow"]
    assert (slow.backlog, slow.busy, slow.capacity, slow.processes) == (2, 5, 5, 2)
    assert state.pools["default"].capacity == 3


def test_quiet_worker_matches_ruby(redis_server: RedisServer, sidekiq_workers: Callable[..., SidekiqWorker]) -> None:
    only_slow, mixed = start_busy_workers(redis_server, sidekiq_workers)
    mixed.signal(signal.SIGTSTP)
    wait_for(
        lambda: any(process.quiet for process in read(redis_server).processes),
        timeout=30,
        description="the quiet flag at the next heartbeat",
    )

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    by_pid = {process.pid: process for process in state.processes}
    assert by_pid[mixed.pid].quiet is True
    assert by_pid[mixed.pid].live is True
    assert by_pid[only_slow.pid].quiet is False
    # A quiet process still runs its jobs but takes no new ones.
    slow = state.pools["slow"]
    assert (slow.busy, slow.capacity, slow.processes, slow.quiet_processes) == (5, 2, 1, 1)
    assert state.pools["default"].capacity == 0
    assert state.queues["slow"].live_processes == 1


def test_killed_worker_leaves_stale_entry(
    redis_server: RedisServer, sidekiq_workers: Callable[..., SidekiqWorker]
) -> None:
    only_slow, mixed = start_busy_workers(redis_server, sidekiq_workers)
    client = redis_server.client()
    identity = mixed.identity(client)
    mixed.kill_hard()

    # Right after the kill the heartbeat is younger than 60 s: Sidekiq and the reader still list it as live.
    state, ruby = read_with_ruby(redis_server)
    assert_matches_ruby(state, ruby)
    assert {process.identity: process.live for process in state.processes}[identity] is True

    # Sidekiq's heartbeat hash and work hash expire 60 s after the last beat; expire them now instead of waiting.
    client.pexpire(identity, 1)
    client.pexpire(f"{identity}:workers", 1)
    wait_for(lambda: not client.exists(identity), timeout=5, description="the heartbeat hash to expire")

    state, ruby = read_with_ruby(redis_server)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, POOLS)
    stale = {process.identity: process for process in state.processes}[identity]
    assert stale.live is False
    assert stale.stale_reason is not None
    assert stale.stale_reason.startswith("heartbeat hash is gone")
    assert stale.pid == mixed.pid
    assert stale.hostname == identity.split(":")[0]
    assert [process.pid for process in state.live_processes] == [only_slow.pid]
    assert ruby["stats"]["processes_size"] == 2
    assert len(ruby["processes"]) == 1
    slow = state.pools["slow"]
    assert (slow.busy, slow.capacity, slow.processes) == (2, 2, 1)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_mixes_match_ruby(redis_server: RedisServer, seed: int) -> None:
    summary = ruby_seed_random(redis_server.url, seed=seed, queues=40, jobs=300)
    pools: list[dict[str, Any]] = [
        {"name": "first", "queues": [f"q{index}" for index in range(0, 10)]},
        {"name": "weighted", "queues": [[f"q{index}", index % 3 + 1] for index in range(10, 30)]},
        {"name": "rest", "queues": [f"q{index}" for index in range(30, 40)]},
    ]

    state, ruby = read_with_ruby(redis_server, pools)

    assert_matches_ruby(state, ruby)
    assert_pools_match_ruby(state, ruby, pools)
    assert state.enqueued == summary["queued"]
    assert state.scheduled.size == summary["scheduled"]
    assert state.retries.size == summary["retries"]
    assert state.dead == summary["dead"]
    assert sum(pool.queued for pool in state.pools.values()) == summary["queued"]
    assert state.scheduled.due > 0
    assert state.retries.due > 0
