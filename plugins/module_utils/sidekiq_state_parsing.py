"""Turn the read script's raw reply into a SidekiqState. Pure functions: no Redis, no clock.

Every value from Redis is treated as untrusted. An entry that cannot be parsed is counted in
``SidekiqState.malformed`` with a short reason and the key or identity where it was found, and the reader
goes on with the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    STALE_AFTER_SECONDS,
    JobSetState,
    MalformedEntries,
    ProcessState,
    QueueState,
    SidekiqState,
)

# Sidekiq 8.0+ writes enqueued_at as integer epoch milliseconds, earlier versions as float epoch seconds.
# When the read script has to decode a job, Redis's cjson keeps no integer/float distinction, so the unit is
# decided by magnitude for every job: 1e11 seconds lies in the year 5138, while 1e11 milliseconds is March 1973.
MILLISECONDS_FROM = 1e11

MAX_EXAMPLES = 5


class MalformedCounter:
    """Collects skipped entries by kind and reason, keeping the first few places where each was found."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[int, list[str]]] = {}

    def add(self, kind: str, reason: str, where: str, count: int = 1) -> None:
        total, examples = self._entries.get((kind, reason), (0, []))
        if where not in examples and len(examples) < MAX_EXAMPLES:
            examples.append(where)
        self._entries[(kind, reason)] = (total + count, examples)

    def entries(self) -> tuple[MalformedEntries, ...]:
        return tuple(
            MalformedEntries(kind=kind, reason=reason, count=count, examples=tuple(examples))
            for (kind, reason), (count, examples) in sorted(self._entries.items())
        )


def parse_reply(reply: Sequence[Any], prefix: str = "") -> SidekiqState:
    """Build the state from the read script's reply; ``prefix`` is the key prefix, used in examples."""
    clock, counters, job_sets, queues_flat, schedule_due, retry_due, processes_raw, errors_flat = (
        _list(part) for part in reply
    )
    malformed = MalformedCounter()
    now = int(_text(clock[0]) or 0) + int(_text(clock[1]) or 0) / 1_000_000

    for key, error in _pairs(errors_flat):
        malformed.add("key", _text(error) or "error", prefix + (_text(key) or ""))

    processed_raw, failed_raw = (_text(value) for value in counters)
    processed = _parse_counter(processed_raw, prefix + "stat:processed", malformed)
    failed = _parse_counter(failed_raw, prefix + "stat:failed", malformed)
    schedule_size, schedule_due_count, retry_size, retry_due_count, dead_size, _dead_due = (
        int(value) for value in job_sets
    )

    processes = tuple(
        sorted(
            (_parse_process(raw, now, prefix, malformed) for raw in processes_raw),
            key=lambda process: process.identity,
        )
    )
    queues = _parse_queues(queues_flat, now, prefix, processes, malformed)
    scheduled = _parse_job_set("schedule", schedule_size, schedule_due_count, schedule_due, prefix, malformed)
    retries = _parse_job_set("retry", retry_size, retry_due_count, retry_due, prefix, malformed)

    found = bool(
        queues
        or processes
        or processed_raw is not None
        or failed_raw is not None
        or schedule_size
        or retry_size
        or dead_size
    )
    return SidekiqState(
        now=now,
        processed=processed,
        failed=failed,
        queues=queues,
        scheduled=scheduled,
        retries=retries,
        dead=dead_size,
        processes=processes,
        malformed=malformed.entries(),
        sidekiq_data_found=found,
    )


def enqueued_at_seconds(value: float) -> float:
    """Convert an ``enqueued_at`` value to epoch seconds, whether Sidekiq wrote seconds or milliseconds."""
    return value / 1000.0 if value >= MILLISECONDS_FROM else value


def _parse_queues(
    flat: Sequence[Any],
    now: float,
    prefix: str,
    processes: tuple[ProcessState, ...],
    malformed: MalformedCounter,
) -> dict[str, QueueState]:
    busy_by_queue: dict[str, int] = {}
    fetching_by_queue: dict[str, int] = {}
    for process in processes:
        if not process.live:
            continue
        for queue, busy in process.busy_by_queue.items():
            busy_by_queue[queue] = busy_by_queue.get(queue, 0) + busy
        if not process.quiet:
            for queue in set(process.queues):
                fetching_by_queue[queue] = fetching_by_queue.get(queue, 0) + 1

    queues: dict[str, QueueState] = {}
    for index in range(0, len(flat), 4):
        name = _text(flat[index]) or ""
        size = int(flat[index + 1])
        enqueued_at_text = _text(flat[index + 2])
        problem = _text(flat[index + 3])
        oldest = _parse_float(enqueued_at_text)
        if oldest is None and enqueued_at_text and not problem:
            problem = "enqueued_at is not a finite number"
        if problem:
            malformed.add("queued job", problem, f"{prefix}queue:{name}")
        if oldest is not None:
            oldest = enqueued_at_seconds(oldest)
        queues[name] = QueueState(
            name=name,
            size=size,
            latency=now - oldest if oldest is not None else 0.0,
            oldest_enqueued_at=oldest,
            busy=busy_by_queue.get(name, 0),
            live_processes=fetching_by_queue.get(name, 0),
        )
    return dict(sorted(queues.items()))


def _parse_job_set(
    name: str,
    size: int,
    due: int,
    scan: Sequence[Any],
    prefix: str,
    malformed: MalformedCounter,
) -> JobSetState:
    scanned, counts_flat, problems_flat = int(scan[0]), _list(scan[1]), _list(scan[2])
    kind = "scheduled job" if name == "schedule" else "retry job"
    for reason, count in _pairs(problems_flat):
        malformed.add(kind, _text(reason) or "error", prefix + name, int(count))
    counts = {(_text(queue) or ""): int(count) for queue, count in _pairs(counts_flat)}
    # Replies of a script without the upcoming scan have three parts; they read as nothing upcoming.
    upcoming, upcoming_scanned, upcoming_flat = 0, 0, []
    if len(scan) >= 6:
        upcoming, upcoming_scanned, upcoming_flat = int(scan[3]), int(scan[4]), _list(scan[5])
    upcoming_counts = {(_text(queue) or ""): int(count) for queue, count in _pairs(upcoming_flat)}
    return JobSetState(
        name=name,
        size=size,
        due=due,
        due_by_queue=dict(sorted(counts.items())),
        due_scanned=scanned,
        upcoming=upcoming,
        upcoming_by_queue=dict(sorted(upcoming_counts.items())),
        upcoming_scanned=upcoming_scanned,
    )


def _parse_process(raw: Sequence[Any], now: float, prefix: str, malformed: MalformedCounter) -> ProcessState:
    identity = _text(raw[0]) or ""
    exists = bool(raw[1])
    hash_error, info_text, busy_text, beat_text, quiet_text, rss_text, concurrency_text = (
        _text(value) for value in raw[2:9]
    )
    where = prefix + identity

    busy_by_queue = {(_text(queue) or ""): int(count) for queue, count in _pairs(_list(raw[9]))}
    for reason, count in _pairs(_list(raw[10])):
        malformed.add("work entry", _text(reason) or "error", f"{where}:work", int(count))
    oldest_run_at, unknown_run_at = _parse_run_at(raw[11:13])

    info: dict[str, Any] = {}
    problem: str | None = None
    if hash_error:
        problem = "heartbeat key is not a hash"
    elif exists and info_text is None:
        problem = "heartbeat hash has no info field"
    elif exists:
        info, problem = _parse_info(info_text or "")
    concurrency, concurrency_problem = _parse_concurrency(concurrency_text, info)
    beat = _parse_float(beat_text)
    if problem is None and exists:
        problem = concurrency_problem or (None if beat is not None else "heartbeat hash has no valid beat")
    if problem:
        malformed.add("process", problem, where)

    busy = _parse_int(busy_text)
    if busy is None and busy_text is not None:
        malformed.add("process", "busy is not an integer", where)
    rss = _parse_int(rss_text)
    if rss is None and rss_text is not None:
        malformed.add("process", "rss is not an integer", where)

    seconds_since_beat = now - beat if beat is not None else None
    stale_reason = problem
    if stale_reason is None and not exists:
        stale_reason = "heartbeat hash is gone: no heartbeat for 60 s, or the process stopped without cleanup"
    elif stale_reason is None and seconds_since_beat is not None and seconds_since_beat > STALE_AFTER_SECONDS:
        stale_reason = f"last heartbeat {seconds_since_beat:.0f} s ago, more than {STALE_AFTER_SECONDS:.0f} s"

    host_from_identity, pid_from_identity = _split_identity(identity)
    return ProcessState(
        identity=identity,
        hostname=_string_field(info, "hostname") or host_from_identity,
        pid=_int_field(info, "pid") or pid_from_identity,
        tag=_string_field(info, "tag"),
        labels=tuple(label for label in _list_field(info, "labels") if isinstance(label, str)),
        version=_string_field(info, "version"),
        concurrency=concurrency,
        queues=tuple(queue for queue in _list_field(info, "queues") if isinstance(queue, str)),
        busy=busy or 0,
        busy_by_queue=dict(sorted(busy_by_queue.items())),
        quiet=quiet_text == "true",
        beat=beat,
        seconds_since_beat=seconds_since_beat,
        rss_kb=rss or 0,
        live=stale_reason is None,
        stale_reason=stale_reason,
        oldest_run_at_by_queue=oldest_run_at,
        unknown_run_at_by_queue=unknown_run_at,
    )


def _parse_run_at(parts: Sequence[Any]) -> tuple[dict[str, float], dict[str, int]]:
    """Parse the earliest ``run_at`` per queue and the count of entries without one.

    Sidekiq 6.4 writes ``run_at`` as integer epoch seconds (``Time.now.to_i`` in its processor). A value in
    milliseconds is converted by magnitude, as ``enqueued_at`` is. A value that is not a finite number counts
    as unknown. A reply without these parts (an older script) gives empty mappings.
    """
    oldest: dict[str, float] = {}
    unknown: dict[str, int] = {}
    if len(parts) < 2:
        return oldest, unknown
    for queue_raw, count in _pairs(_list(parts[1])):
        queue = _text(queue_raw) or ""
        unknown[queue] = unknown.get(queue, 0) + int(count)
    for queue_raw, value_raw in _pairs(_list(parts[0])):
        queue = _text(queue_raw) or ""
        value = _parse_float(value_raw)
        if value is None:
            unknown[queue] = unknown.get(queue, 0) + 1
        else:
            oldest[queue] = enqueued_at_seconds(value)
    return dict(sorted(oldest.items())), dict(sorted(unknown.items()))


def _parse_info(text: str) -> tuple[dict[str, Any], str | None]:
    """Parse the heartbeat info JSON; return it and a problem, if any, that makes the process unusable."""
    try:
        info = json.loads(text)
    except ValueError:
        return {}, "info is not valid JSON"
    if not isinstance(info, dict):
        return {}, "info is not a JSON object"
    queues = info.get("queues")
    if not isinstance(queues, list) or not all(isinstance(queue, str) for queue in queues):
        return info, "info has no list of queue names"
    return info, None


def _parse_concurrency(field_raw: Any, info: dict[str, Any]) -> tuple[int, str | None]:
    """Read concurrency from its own hash field (Sidekiq 8.1.2+) or from the info JSON (earlier versions)."""
    if field_raw is not None:
        value = _parse_int(field_raw)
        if value is None:
            return 0, "concurrency field is not an integer"
        return value, None
    if not info:
        return 0, None
    value = info.get("concurrency")
    if isinstance(value, bool) or not isinstance(value, int):
        return 0, "info has no integer concurrency"
    return value, None


def _parse_counter(raw: Any, key: str, malformed: MalformedCounter) -> int:
    if raw is None:
        return 0
    value = _parse_int(raw)
    if value is None:
        malformed.add("counter", "not an integer", key)
        return 0
    return value


def _split_identity(identity: str) -> tuple[str | None, int | None]:
    """Split Sidekiq's identity ``hostname:pid:nonce``; return (None, None) if it has another form."""
    parts = identity.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


def _string_field(info: dict[str, Any], name: str) -> str | None:
    value = info.get(name)
    return value if isinstance(value, str) else None


def _int_field(info: dict[str, Any], name: str) -> int | None:
    value = info.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list_field(info: dict[str, Any], name: str) -> list[Any]:
    value = info.get(name)
    return value if isinstance(value, list) else []


def _parse_int(raw: Any) -> int | None:
    text = _text(raw)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _parse_float(raw: Any) -> float | None:
    text = _text(raw)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _list(value: Any) -> list[Any]:
    """Return a JSON array from the reply as a list; Lua's cjson encodes an empty array as {}."""
    return list(value) if isinstance(value, list) else []


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return [(flat[index], flat[index + 1]) for index in range(0, len(flat) - 1, 2)]


def _text(value: Any) -> str | None:
    """Return a reply value as text, or None for a missing value (false in the script's JSON)."""
    if value is None or value is False:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
