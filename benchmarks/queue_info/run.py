"""Benchmark the queue_info reader against Sidekiq's own Ruby API on the same Redis.

    .venv/bin/python benchmarks/queue_info/run.py [--sizes 10,100,1000,10000] [--processes 200]

Starts its own redis-server on a free loopback port in a temporary directory and stops it by PID at the end.
For each number of queues it writes a fleet shaped as Sidekiq 6.4 writes it: 3 jobs per queue, the given
number of processes with 5 busy threads each, 1,000 scheduled and 1,000 retry entries (half of them due)
and 100 dead. Then it times both readers inside their own processes, start-up excluded, and counts their
round trips and the Redis commands they cause. Prints a Markdown table and writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / ".collections"))

import redis

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state

RUBY_READER = Path(__file__).resolve().parent / "sidekiq_api_read.rb"
JOBS_PER_QUEUE = 3
BUSY_PER_PROCESS = 5
SCHEDULED = 1_000
RETRIES = 1_000
DEAD = 100


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def job(queue: str, index: int, enqueued_at: float | None) -> str:
    item: dict[str, Any] = {
        "retry": True,
        "queue": queue,
        "class": "FastJob",
        "args": [index],
        "jid": f"{random.getrandbits(96):024x}",
        "created_at": enqueued_at or time.time(),
    }
    if enqueued_at is not None:
        item["enqueued_at"] = enqueued_at
    return json.dumps(item)


def write_fleet(client: redis.Redis, queues: int, processes: int) -> None:
    """Write the keys Sidekiq 6.4 writes for the given fleet, after emptying the database."""
    client.flushdb()
    now = time.time()
    names = [f"queue-{index}" for index in range(queues)]
    pipeline = client.pipeline(transaction=False)
    for position, name in enumerate(names):
        pipeline.sadd("queues", name)
        for index in range(JOBS_PER_QUEUE):
            pipeline.lpush(f"queue:{name}", job(name, index, now - 300 + position % 300 + index))
        if position % 1000 == 999:
            pipeline.execute()
    for index in range(SCHEDULED):
        pipeline.zadd("schedule", {job(names[index % queues], index, None): now + (-60 if index % 2 else 600)})
    for index in range(RETRIES):
        pipeline.zadd("retry", {job(names[index % queues], index, now - 900): now + (-30 if index % 2 else 300)})
    for index in range(DEAD):
        pipeline.zadd("dead", {job(names[index % queues], index, now - 9000): now - 3600})
    for index in range(processes):
        identity = f"bench-{index}.example.com:{10_000 + index}:{index:012x}"
        served = [names[(index + offset) % queues] for offset in range(5)]
        info = {
            "hostname": f"bench-{index}.example.com",
            "started_at": now - 3600,
            "pid": 10_000 + index,
            "tag": "bench",
            "concurrency": 10,
            "queues": served,
            "labels": [],
            "identity": identity,
        }
        pipeline.sadd("processes", identity)
        pipeline.hset(
            identity,
            mapping={
                "info": json.dumps(info),
                "busy": BUSY_PER_PROCESS,
                "beat": now,
                "rtt_us": 400,
                "quiet": "false",
                "rss": 150_000,
            },
        )
        for thread in range(BUSY_PER_PROCESS):
            work = {
                "queue": served[thread % 5],
                "payload": job(served[thread % 5], thread, now - 5),
                "run_at": int(now),
            }
            pipeline.hset(f"{identity}:workers", f"tid-{thread}", json.dumps(work))
    pipeline.execute()


def command_totals(client: redis.Redis) -> tuple[int, int]:
    """Return (calls of all commands but INFO, microseconds spent in top-level commands) from INFO commandstats.

    Redis counts the time of the commands that a Lua script runs twice: on their own lines and inside the
    script's EVALSHA. So the time sums only commands that clients sent. For the reader that is EVALSHA or
    EVAL, for the Ruby API every command, because it sends no scripts.
    """
    stats = client.info("commandstats")
    calls = sum(int(values["calls"]) for name, values in stats.items() if name != "cmdstat_info")
    scripts = [values for name, values in stats.items() if name in ("cmdstat_evalsha", "cmdstat_eval")]
    if scripts:
        usec = sum(int(values["usec"]) for values in scripts)
    else:
        usec = sum(int(values["usec"]) for name, values in stats.items() if name != "cmdstat_info")
    return calls, usec


def measure_ours(url: str, repeats: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url, protocol=2)
    state = read_state(client)  # warm-up: connection and script cache

    connection = client.connection_pool.get_connection()
    client.connection_pool.release(connection)
    sends = 0
    original_send: Any = connection.send_packed_command

    def counting_send(command: Any, check_health: bool = True) -> None:
        nonlocal sends
        sends += 1
        original_send(command, check_health)

    connection.send_packed_command = counting_send  # type: ignore[method-assign]

    calls_before, usec_before = command_totals(client)
    sends = 0
    state = read_state(client)
    round_trips = sends
    calls_after, usec_after = command_totals(client)

    seconds = []
    for _repeat in range(repeats):
        started = time.perf_counter()
        read_state(client)
        seconds.append(time.perf_counter() - started)
    return {
        "seconds": seconds,
        "round_trips": round_trips,
        "reported_round_trips": state.round_trips,
        "commands": calls_after - calls_before,
        "redis_usec": usec_after - usec_before,
        "queues": len(state.queues),
        "processes": len(state.processes),
        "busy": state.busy,
    }


def measure_ruby(url: str, repeats: int, client: redis.Redis) -> dict[str, Any]:
    client.config_resetstat()
    output = subprocess.run(
        ["ruby", str(RUBY_READER), str(repeats)],
        env={**os.environ, "REDIS_URL": url},
        capture_output=True,
        check=True,
        text=True,
        timeout=3600,
    )
    return dict(json.loads(output.stdout))


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[2]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{memory_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_server": redis_version.removeprefix("v="),
        "ruby": subprocess.run(["ruby", "-e", "print RUBY_VERSION"], capture_output=True, text=True, check=True).stdout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000,10000", help="numbers of queues, comma-separated")
    parser.add_argument("--processes", type=int, default=200, help="Sidekiq processes in the fleet")
    parser.add_argument("--repeats", type=int, default=15, help="timed reads of the Python reader per size")
    parser.add_argument("--ruby-repeats", type=int, default=5, help="timed reads of the Ruby API per size")
    parser.add_argument("--output", type=Path, help="write the raw figures as JSON to this file")
    arguments = parser.parse_args()
    random.seed(1)

    directory = Path(tempfile.mkdtemp(prefix="queue-info-bench-"))
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    results: list[dict[str, Any]] = []
    try:
        client = redis.Redis.from_url(url, protocol=2)
        for _attempt in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        for size in (int(text) for text in arguments.sizes.split(",")):
            write_fleet(client, size, arguments.processes)
            ours = measure_ours(url, arguments.repeats)
            ruby = measure_ruby(url, arguments.ruby_repeats, client)
            for field in ("queues", "processes", "busy"):
                if ours[field] != ruby[field]:
                    raise SystemExit(f"{size} queues: the readers disagree on {field}: {ours[field]} != {ruby[field]}")
            results.append({"queues": size, "processes": arguments.processes, "ours": ours, "ruby": ruby})
            print(f"measured {size} queues", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)

    report = {"machine": machine(), "command": " ".join(sys.argv), "results": results}
    if arguments.output:
        arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    print(
        "| queues | processes | ours: median ms | Ruby API: median ms | time ratio ours/Ruby | ours: round trips "
        "| Ruby: round trips | ours: Redis commands | Ruby: Redis commands | ours: Redis busy ms "
        "| Ruby: Redis busy ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in report["results"]:
        ours, ruby = row["ours"], row["ruby"]
        ours_ms = statistics.median(ours["seconds"]) * 1000
        ruby_ms = statistics.median(ruby["seconds"]) * 1000
        print(
            f"| {row['queues']:,} | {row['processes']} | {ours_ms:.1f} | {ruby_ms:.1f} | {ours_ms / ruby_ms:.3f} "
            f"| {ours['round_trips']} | {ruby['round_trips']:,} | {ours['commands']:,} | {ruby['commands']:,} "
            f"| {ours['redis_usec'] / 1000:.1f} | {ruby['redis_usec'] / 1000:.1f} |"
        )
    machine_info = report["machine"]
    print(
        f"\nMachine: {machine_info['nproc']} CPUs ({machine_info['cpu']}), {machine_info['ram']} RAM; "
        f"Python {machine_info['python']}, redis-py {machine_info['redis_py']}, redis-server "
        f"{machine_info['redis_server']}, Ruby {machine_info['ruby']}."
    )


if __name__ == "__main__":
    main()
