"""Real redis-server and Sidekiq 6.4.1 processes for the queue_info tests, and Sidekiq's Ruby API as the oracle.

Every server and worker is started here on a free loopback port in a temporary directory, and stopped by
its PID. Nothing touches port 6379 or a process these helpers did not start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
DEMO_APP = ROOT / "examples" / "demo-app"
HELPERS = Path(__file__).resolve().parent
RUBY_API_DUMP = HELPERS / "sidekiq_api_dump.rb"
RUBY_SEED_RANDOM = HELPERS / "sidekiq_seed_random.rb"


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], timeout: float, interval: float = 0.1, description: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns a truthy value and return that value, or fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Send TERM to a process this module started, then KILL it if it outlives the grace period."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class RedisServer:
    """A redis-server (or Redis Sentinel) on 127.0.0.1 started for one test."""

    directory: Path
    extra_arguments: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    password: str | None = None
    # Options for the redis-py clients of the helpers, for example TLS settings when the server has only a TLS port.
    client_options: dict[str, Any] = field(default_factory=dict)
    # A sentinel.conf to run Redis Sentinel instead of a data server.
    sentinel_config: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        common = [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.sentinel_config is not None:
            arguments = ["redis-server", str(self.sentinel_config), "--sentinel", *common]
        else:
            arguments = ["redis-server", *common, "--save", "", "--appendonly", "no"]
        arguments += self.extra_arguments
        if self.password:
            arguments += ["--requirepass", self.password]
        self.process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers_ping, timeout=10, description=f"redis-server on port {self.port}")
        return self

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=self.password, protocol=2, **self.client_options
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def _answers_ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.process.returncode}: see {self.directory}/redis.log")
        try:
            return bool(self.client().ping())
        except redis.exceptions.RedisError:
            return False


@dataclass
class SidekiqWorker:
    """One real ``sidekiq -r ./app.rb`` process from examples/demo-app, started for one test."""

    redis_url: str
    directory: Path
    queues: tuple[str, ...]
    concurrency: int = 5
    timeout: int = 2
    tag: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> SidekiqWorker:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / f"sidekiq-{len(list(self.directory.glob('sidekiq-*.yml')))}.yml"
        lines = [f":concurrency: {self.concurrency}", f":timeout: {self.timeout}", ":queues:"]
        lines += [f"  - {queue}" for queue in self.queues]
        if self.tag:
            lines.append(f":tag: {self.tag}")
        config.write_text("\n".join(lines) + "\n")
        log = (self.directory / f"{config.stem}.log").open("wb")
        environment = {**os.environ, "REDIS_URL": self.redis_url}
        self.process = subprocess.Popen(
            ["sidekiq", "-r", "./app.rb", "-C", str(config)],
            cwd=DEMO_APP,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def identity(self, client: redis.Redis) -> str:
        """Wait for this process's first heartbeat and return its identity (host:pid:nonce)."""

        def find() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"sidekiq exited with {self.process.returncode}: see logs in {self.directory}")
            for member in client.smembers("processes"):
                identity = member.decode() if isinstance(member, bytes) else member
                if identity.split(":")[-2] == str(self.pid):
                    return identity
            return None

        return str(wait_for(find, timeout=30, description=f"the heartbeat of sidekiq pid {self.pid}"))

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill_hard(self) -> None:
        """KILL the process, which leaves its entry in the processes set as a crash does."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=self.timeout + 10)


def ruby_api_dump(redis_url: str) -> dict[str, Any]:
    """Run Sidekiq's own Ruby API against the Redis and return what it reports (see sidekiq_api_dump.rb)."""
    output = subprocess.run(
        ["ruby", str(RUBY_API_DUMP)],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return dict(json.loads(output.stdout))


def ruby_enqueue(redis_url: str, *arguments: str) -> list[str]:
    """Push demo jobs with examples/demo-app/enqueue.rb and return their job ids."""
    output = subprocess.run(
        ["ruby", "enqueue.rb", *arguments],
        cwd=DEMO_APP,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return output.stdout.decode().split()


def ruby_eval(redis_url: str, code: str) -> str:
    """Run Ruby code with Sidekiq's API loaded against the Redis and return its standard output."""
    prelude = 'require "sidekiq/api"; Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=); '
    output = subprocess.run(
        ["ruby", "-e", prelude + code],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return output.stdout.decode()


def ruby_seed_random(redis_url: str, seed: int, queues: int, jobs: int) -> dict[str, Any]:
    """Push a seeded random mix of jobs with Sidekiq's Ruby client and return the summary it prints."""
    output = subprocess.run(
        ["ruby", str(RUBY_SEED_RANDOM), str(seed), str(queues), str(jobs)],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return dict(json.loads(output.stdout))


@contextmanager
def running_redis(directory: Path, **options: Any) -> Iterator[RedisServer]:
    """Run a redis-server for the duration of the block. Test modules wrap it in a fixture."""
    server = RedisServer(directory=directory, **options).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def sidekiq_launcher(directory: Path) -> Iterator[Callable[..., SidekiqWorker]]:
    """Start Sidekiq workers on demand inside the block and stop every one of them at the end."""
    started: list[SidekiqWorker] = []

    def start(redis_url: str, queues: tuple[str, ...], **options: Any) -> SidekiqWorker:
        worker = SidekiqWorker(redis_url=redis_url, directory=directory, queues=queues, **options).start()
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()
