#!/usr/bin/env python3
"""Drive the demo app on the local test hosts: enqueue jobs, watch them run, check every job by id.

    scripts/local_fleet.py enqueue --fast 900 --slow 100 --slow-seconds 3 > jids.txt
    scripts/local_fleet.py wait jids.txt --timeout 300
    scripts/local_fleet.py status
    scripts/local_fleet.py --redis-container as4-redis status    (hosts made with SIDEKIQ_OPS_HOSTS_PREFIX=as4)

The Redis host is the podman container of inventories/local; its address comes from podman and the password of
the sidekiq user from the local inventory. The demo app (examples/demo-app) records every finished job id in the
Redis set demo:done and counts its runs in the hash demo:runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_APP = ROOT / "examples" / "demo-app"
LOCAL_REDIS_VARS = ROOT / "inventories" / "local" / "group_vars" / "all" / "redis.yml"
REDIS_CONTAINER = "sko-redis"
FAST_QUEUES = "critical,default,low"


def container_address(name: str) -> str:
    """Return the IP address of a podman container on its network."""
    output = subprocess.run(
        ["podman", "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    addresses = output.stdout.split()
    if output.returncode != 0 or not addresses:
        raise SystemExit(f"test host {name} is not running; create the hosts with 'scripts/testhosts.sh up'")
    return addresses[0]


def local_redis_url(container: str = REDIS_CONTAINER) -> str:
    """Build the REDIS_URL of the sidekiq user on a Redis test host (by default the one of inventories/local).

    The password comes from the local inventory, which other sets of test hosts (SIDEKIQ_OPS_HOSTS_PREFIX) copy.
    """
    variables = yaml.safe_load(LOCAL_REDIS_VARS.read_text())
    password = quote(str(variables["redis_sidekiq_password"]), safe="")
    return f"redis://sidekiq:{password}@{container_address(container)}:6379/0"


def enqueue(
    url: str, fast: int, slow: int, slow_seconds: float, queues: str = FAST_QUEUES, slow_queue: str = "slow"
) -> list[str]:
    """Enqueue demo jobs with the demo app's own Ruby client and return their job ids."""
    command = [
        "ruby",
        "enqueue.rb",
        "--fast",
        str(fast),
        "--slow",
        str(slow),
        "--slow-seconds",
        str(slow_seconds),
        "--queues",
        queues,
        "--slow-queue",
        slow_queue,
    ]
    completed = subprocess.run(
        command, cwd=DEMO_APP, env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"enqueue.rb failed with exit code {completed.returncode}: {completed.stderr.strip()}")
    return completed.stdout.split()


@dataclass
class Progress:
    """Progress of a set of jobs, counted by job id."""

    total: int
    done: int
    queued: int
    busy: int
    retries: int
    run_twice: int

    def line(self) -> str:
        return (
            f"done {self.done}/{self.total}  queued {self.queued}  busy {self.busy}  retry {self.retries}  "
            f"ran more than once {self.run_twice}"
        )


def progress(client: redis.Redis, jids: list[str]) -> Progress:
    """Count how many of the jobs have finished, and what is still queued or running across the fleet."""
    pipeline = client.pipeline(transaction=False)
    pipeline.smismember("demo:done", jids)
    pipeline.hmget("demo:runs", jids)
    pipeline.smembers("queues")
    pipeline.smembers("processes")
    pipeline.zcard("retry")
    done_flags, runs, queue_names, processes, retries = pipeline.execute()
    pipeline = client.pipeline(transaction=False)
    for name in queue_names:
        pipeline.llen(b"queue:" + name)
    for identity in processes:
        pipeline.hget(identity, "busy")
    counts = pipeline.execute()
    queued = sum(counts[: len(queue_names)])
    busy = sum(int(value or 0) for value in counts[len(queue_names) :])
    return Progress(
        total=len(jids),
        done=sum(1 for flag in done_flags if flag),
        queued=queued,
        busy=busy,
        retries=int(retries),
        run_twice=sum(1 for value in runs if value is not None and int(value) > 1),
    )


def wait_for(
    client: redis.Redis, jids: list[str], timeout: float, interval: float = 2.0, echo: bool = True
) -> Progress:
    """Wait until every job has finished or the timeout passes; print progress lines when echo is set."""
    deadline = time.monotonic() + timeout
    while True:
        current = progress(client, jids)
        if echo:
            print(f"[{time.strftime('%H:%M:%S')}] {current.line()}", flush=True)
        if current.done == current.total or time.monotonic() >= deadline:
            return current
        time.sleep(interval)


def status(client: redis.Redis) -> dict[str, Any]:
    """Return the queues and the Sidekiq processes as Sidekiq reports them in Redis."""
    queues = {name.decode(): client.llen(b"queue:" + name) for name in sorted(client.smembers("queues"))}
    processes = []
    for identity in sorted(client.smembers("processes")):
        info = json.loads(client.hget(identity, "info") or "{}")
        processes.append(
            {
                "identity": identity.decode(),
                "tag": info.get("tag"),
                "busy": int(client.hget(identity, "busy") or 0),
                "concurrency": info.get("concurrency"),
                "quiet": (client.hget(identity, "quiet") or b"false").decode(),
            }
        )
    return {"queues": queues, "processes": processes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--redis-container",
        default=REDIS_CONTAINER,
        help=f"podman container of the Redis test host (default {REDIS_CONTAINER})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("enqueue", help="enqueue demo jobs and print their job ids")
    add.add_argument("--fast", type=int, default=0, help="number of fast jobs, spread over critical, default, low")
    add.add_argument("--slow", type=int, default=0, help="number of slow jobs on the slow queue")
    add.add_argument("--slow-seconds", type=float, default=3.0, help="run time of each slow job, in seconds")
    wait = commands.add_parser("wait", help="wait until every job id in a file has run")
    wait.add_argument("jids_file", type=Path, help="file with one job id per line (the output of enqueue)")
    wait.add_argument("--timeout", type=float, default=300.0, help="seconds to wait before giving up")
    commands.add_parser("status", help="print queues and processes as JSON")
    commands.add_parser("url", help="print the REDIS_URL of the local Redis test host")
    args = parser.parse_args(argv)

    for name in ("fast", "slow"):
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name} {getattr(args, name)} is invalid; give 0 or more jobs")

    url = local_redis_url(args.redis_container)
    if args.command == "url":
        print(url)
        return 0
    if args.command == "enqueue":
        print("\n".join(enqueue(url, args.fast, args.slow, args.slow_seconds)))
        return 0
    client = redis.Redis.from_url(url)
    if args.command == "status":
        print(json.dumps(status(client), indent=2))
        return 0
    jids = args.jids_file.read_text().split()
    final = wait_for(client, jids, args.timeout)
    if final.done != final.total:
        print(
            f"{final.total - final.done} of {final.total} jobs did not run within {args.timeout:g} s", file=sys.stderr
        )
        return 1
    print(f"all {final.total} jobs ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
