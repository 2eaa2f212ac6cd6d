"""A builder of Sidekiq process readings (ProcessState) for the unit tests of the scaling backends."""

from __future__ import annotations

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState


def process_state(
    hostname: str,
    *,
    beat: float,
    pid: int = 1,
    busy: int = 0,
    quiet: bool = False,
    live: bool = True,
    concurrency: int = 10,
    labels: tuple[str, ...] = (),
    identity: str | None = None,
    oldest_run_at: float | None = None,
) -> ProcessState:
    """Return a live process of the pool `default` (tag and queue) as the Redis reader would report it."""
    return ProcessState(
        identity=identity or f"{hostname}:{pid}:abc{pid}",
        hostname=hostname,
        pid=pid,
        tag="default",
        labels=labels,
        version=None,
        concurrency=concurrency,
        queues=("default",),
        busy=busy,
        busy_by_queue={"default": busy} if busy else {},
        quiet=quiet,
        beat=beat,
        seconds_since_beat=1.0,
        rss_kb=1000,
        live=live,
        stale_reason=None if live else "no heartbeat for 90 s",
        oldest_run_at_by_queue={"default": oldest_run_at} if busy and oldest_run_at is not None else {},
    )
