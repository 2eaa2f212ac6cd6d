#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: queue_info
short_description: Read Sidekiq queues, job sets, processes and per-pool signals from Redis
description:
  - Reads the whole state of a Sidekiq fleet from its Redis and returns it as Sidekiq's own API reports it.
  - Returns the size and latency (age of the oldest job) of every queue, and the scheduled, retry and dead
    sets with how many entries are already due per queue.
  - Returns every process with its heartbeat, concurrency and busy threads, and whether it is live, quiet or
    stale, and the lifetime processed and failed counters.
  - Given O(pools), also sums these signals per pool - backlog, maximum latency, busy threads and live
    capacity - as the autoscaler reads them.
  - One server-side Lua script gathers everything, so the read takes the same number of Redis round trips
    (one, or two right after Redis lost its script cache) for 10 queues or 10,000.
  - Reads Sidekiq 6, 7 and 8 data alike (C(enqueued_at) in seconds or milliseconds, C(concurrency) in the
    heartbeat info or in its own field, work hashes C(:workers) or C(:work)).
  - Entries that cannot be parsed are skipped and counted in RV(malformed); they never fail the module.
  - The module only reads. A Redis ACL user for it needs the commands C(PING), C(EVAL), C(EVALSHA) and
    C(TIME) and read access to the Sidekiq keys, that is the ACL rules C(+ping +eval +evalsha +time +@read ~*).
version_added: 0.1.0
author:
  - sidekiq-ops maintainers (@sidekiq-ops)
extends_documentation_fragment:
  - sidekiq_ops.fleet.redis
attributes:
  check_mode:
    support: full
    description: The module never changes anything, so check mode runs the same read.
  diff_mode:
    support: none
    description: The module changes nothing, so it has no differences to show.
options:
  pools:
    description:
      - Worker pools to sum signals for, in the form of C(sidekiq_pools) in group_vars.
      - Each entry needs C(name) and C(queues), a list of queue names or of V([name, weight]) pairs.
        Other keys of the entry are ignored, so the list from group_vars can be passed unchanged.
    type: list
    elements: dict
    default: []
  due_scan_limit:
    description:
      - Maximum number of due entries decoded in each of the scheduled and retry sets to find their queues.
      - The total due count is always exact. When more entries are due, per-queue and per-pool due counts are
        scaled up from the ones decoded and the pool's C(due_estimated) is V(true).
      - Redis serves no other client while the script runs. Decoding 10,000 retry entries of 260 bytes took
        20 to 40 ms on a shared 2-CPU machine, so a lower limit keeps the pause shorter at the price of estimates.
    type: int
    default: 10000
  allow_empty:
    description:
      - Return an empty state instead of failing when the database holds no Sidekiq key at all.
      - Without it, a wrong O(redis_db) or O(redis_namespace) fails the task instead of reporting an idle fleet.
    type: bool
    default: false
notes:
  - A process is stale when its heartbeat hash is gone (Sidekiq lets it expire 60 s after the last
    heartbeat) or its last heartbeat is older than 60 s. Stale processes add no capacity and no busy threads.
  - Latencies use the Redis server's clock, and Sidekiq's C(enqueued_at) comes from the clock of the host
    that pushed the job, so clock skew between them shows up in latencies.
  - Check mode is supported and runs the same read.
  - Redis serves no other client while the read script runs. With 10,000 queues and 200 processes that took
    60 to 150 ms on a shared 2-CPU machine, depending on its load, and 10 to 16 ms with 1,000 queues (see
    benchmarks/README.md in the project repository).
"""

EXAMPLES = r"""
- name: Read the Sidekiq state of the shop app
  sidekiq_ops.fleet.queue_info:
    redis_url: "{{ vault_sidekiq_redis_url }}"
    pools: "{{ sidekiq_pools }}"
  register: sidekiq

- name: Fail the promotion when the default pool is more than a minute behind
  ansible.builtin.assert:
    that: sidekiq.pools.default.latency < 60
    fail_msg: "default pool latency is {{ sidekiq.pools.default.latency | round(1) }} s"

- name: Read through Sentinel with TLS and an ACL user
  sidekiq_ops.fleet.queue_info:
    redis_sentinel_master: sidekiq
    redis_sentinels: [10.0.1.10:26379, 10.0.2.10:26379, 10.0.3.10:26379]
    redis_username: sidekiq-ops
    redis_password: "{{ vault_redis_password }}"
    redis_tls: true
    redis_tls_ca_file: /etc/ssl/certs/redis-ca.pem
    redis_namespace: shop

- name: List queues that have jobs but no live process fetching them
  ansible.builtin.debug:
    msg: "{{ sidekiq.queues | dict2items | selectattr('value.size') | selectattr('value.live_processes', 'eq', 0)
             | map(attribute='key') | list }}"
"""

RETURN = r"""
msg:
  description: One sentence with what was read, from where, in how many round trips.
  returned: always
  type: str
  sample: Read 4 queues and 2 processes (2 live, 0 stale) from 127.0.0.1:6379 db 0 in 1 round trip.
redis_target:
  description: The Redis that was read, as host, port and database, without credentials.
  returned: always
  type: str
  sample: 10.0.1.5:6379 db 0 over TLS
now:
  description: Redis server time of the read, epoch seconds.
  returned: always
  type: float
sidekiq_data_found:
  description: Whether the database holds any Sidekiq key; V(false) only with O(allow_empty).
  returned: always
  type: bool
processed:
  description: Lifetime count of processed jobs (failed ones included), from C(stat:processed).
  returned: always
  type: int
failed:
  description: Lifetime count of failed jobs, from C(stat:failed).
  returned: always
  type: int
enqueued:
  description: Jobs waiting in all queues.
  returned: always
  type: int
busy:
  description: Busy threads of live processes, from their work hashes.
  returned: always
  type: int
queues:
  description: Every queue in Sidekiq's C(queues) set, by name.
  returned: always
  type: dict
  contains:
    size:
      description: Jobs in the queue.
      type: int
    latency:
      description: Seconds since the oldest job was enqueued; V(0) for an empty queue.
      type: float
    oldest_enqueued_at:
      description: C(enqueued_at) of the oldest job in epoch seconds, or V(null) for an empty queue.
      type: float
    busy:
      description: Threads of live processes running a job from this queue.
      type: int
    live_processes:
      description: Live processes that are not quiet and fetch from this queue.
      type: int
  sample:
    default: {name: default, size: 120, latency: 4.2, oldest_enqueued_at: 1700000000.5, busy: 10, live_processes: 2}
scheduled:
  description: The C(schedule) sorted set.
  returned: always
  type: dict
  contains:
    size:
      description: Entries in the set.
      type: int
    due:
      description: Entries whose run-at time has passed; exact.
      type: int
    due_by_queue:
      description: Due entries per queue, from the first O(due_scan_limit) due entries.
      type: dict
    due_scanned:
      description: Due entries decoded.
      type: int
    due_truncated:
      description: Whether more entries were due than O(due_scan_limit).
      type: bool
    upcoming:
      description: Entries that come due after RV(now) and within the next 60 seconds; exact.
      type: int
    upcoming_by_queue:
      description: Upcoming entries per queue, from the first RV(scheduled.upcoming_scanned) upcoming entries.
      type: dict
    upcoming_scanned:
      description: Upcoming entries decoded, at most O(due_scan_limit).
      type: int
retries:
  description: The C(retry) sorted set, with the same fields as RV(scheduled).
  returned: always
  type: dict
dead:
  description: Entries in the C(dead) set.
  returned: always
  type: int
processes:
  description: Every member of Sidekiq's C(processes) set, sorted by identity.
  returned: always
  type: list
  elements: dict
  contains:
    identity:
      description: Sidekiq's process identity, C(hostname:pid:nonce).
      type: str
    hostname:
      description: Host name from the heartbeat, or from the identity once the heartbeat is gone.
      type: str
    pid:
      description: Process id from the heartbeat, or from the identity once the heartbeat is gone.
      type: int
    tag:
      description: The process tag (Sidekiq's C(tag) option).
      type: str
    labels:
      description: Labels of the process.
      type: list
      elements: str
    version:
      description: Sidekiq version from the heartbeat (7.0 and later), else V(null).
      type: str
    concurrency:
      description: Threads of the process; V(0) when the heartbeat is gone.
      type: int
    queues:
      description: Queues the process fetches from.
      type: list
      elements: str
    busy:
      description: The heartbeat's busy thread count.
      type: int
    busy_by_queue:
      description: Busy threads per queue, from the process's work hash.
      type: dict
    quiet:
      description: Whether the process is quiet or stopping (it fetches no new jobs).
      type: bool
    beat:
      description: Time of the last heartbeat, epoch seconds; V(null) once the heartbeat hash is gone.
      type: float
    seconds_since_beat:
      description: Seconds from the last heartbeat to RV(now).
      type: float
    rss_kb:
      description: Resident memory of the process in KiB, as its last heartbeat reported it.
      type: int
    live:
      description: Whether the process has a heartbeat younger than 60 s and a readable heartbeat hash.
      type: bool
    stale_reason:
      description: Why the process is not live, or V(null).
      type: str
    oldest_run_at_by_queue:
      description: Per queue, the earliest C(run_at) (epoch seconds) of the jobs the process runs, from its work hash.
      type: dict
    unknown_run_at_by_queue:
      description: Per queue, running jobs whose C(run_at) could not be read, so their age is unknown.
      type: dict
live_processes:
  description: Number of live processes.
  returned: always
  type: int
stale_processes:
  description: Number of processes in the C(processes) set that are not live.
  returned: always
  type: int
pools:
  description: Signals per pool of O(pools), by pool name.
  returned: always
  type: dict
  contains:
    queues:
      description: The pool's queue names.
      type: list
      elements: str
    queued:
      description: Jobs waiting in the pool's queues.
      type: int
    scheduled_due:
      description: Due scheduled jobs for the pool's queues.
      type: int
    retry_due:
      description: Due retries for the pool's queues.
      type: int
    backlog:
      description: The sum of C(queued), C(scheduled_due) and C(retry_due).
      type: int
    latency:
      description: Maximum latency over the pool's queues, in seconds.
      type: float
    busy:
      description: Threads of live processes running jobs from the pool's queues.
      type: int
    capacity:
      description: Sum of concurrency over live, not quiet processes that fetch any of the pool's queues.
      type: int
    processes:
      description: Live, not quiet processes that fetch any of the pool's queues.
      type: int
    quiet_processes:
      description: Live, quiet processes that fetch any of the pool's queues.
      type: int
    due_estimated:
      description: Whether a due count was scaled up because O(due_scan_limit) was reached.
      type: bool
    upcoming:
      description: Scheduled jobs and retries of the pool's queues that come due within the next 60 seconds.
      type: int
    longest_running:
      description: Seconds since the oldest running job of the pool's queues started; V(0) when none runs, V(null)
        when the C(run_at) of a running job could not be read.
      type: float
  sample:
    default: {name: default, queues: [default, low], queued: 120, scheduled_due: 3, retry_due: 1, backlog: 124,
              latency: 4.2, busy: 10, capacity: 20, processes: 2, quiet_processes: 0, due_estimated: false}
malformed:
  description: Entries that could not be parsed, grouped by kind and reason, with up to five keys or identities.
  returned: always
  type: list
  elements: dict
  sample:
    - {kind: queued job, reason: invalid JSON, count: 1, examples: ["queue:imports"]}
malformed_total:
  description: Sum of the counts in RV(malformed).
  returned: always
  type: int
round_trips:
  description: Redis round trips of the read itself (connection set-up and PING not included).
  returned: always
  type: int
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    REDIS_ARGUMENT_SPEC,
    RedisAccessError,
    connect,
    mask_secrets,
    settings_from_params,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import (
    DEFAULT_DUE_SCAN_LIMIT,
    PoolSpecError,
    SidekiqState,
    parse_pool_specs,
    read_state,
)


def count_of(number: int, singular: str, plural: str) -> str:
    """Return the number followed by the noun in singular or plural, as in "1 queue" or "3 queues"."""
    return f"{number} {singular if number == 1 else plural}"


def summarize(state: SidekiqState, target: str) -> str:
    """Describe the read in one sentence for the task output."""
    queues = count_of(len(state.queues), "queue", "queues")
    processes = count_of(len(state.processes), "process", "processes")
    round_trips = count_of(state.round_trips, "round trip", "round trips")
    return (
        f"Read {queues} and {processes} ({len(state.live_processes)} live, {len(state.stale_processes)} stale) "
        f"from {target} in {round_trips}."
    )


def argument_spec() -> dict[str, dict[str, Any]]:
    """Return the module's argument spec: the shared Redis options plus the reader's own."""
    spec = dict(REDIS_ARGUMENT_SPEC)
    spec.update(
        pools={"type": "list", "elements": "dict", "default": []},
        due_scan_limit={"type": "int", "default": DEFAULT_DUE_SCAN_LIMIT},
        allow_empty={"type": "bool", "default": False},
    )
    return spec


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)

    try:
        settings = settings_from_params(module.params)
        parse_pool_specs(module.params["pools"])
    except (RedisAccessError, PoolSpecError) as error:
        module.fail_json(msg=str(error))
    if module.params["due_scan_limit"] < 0:
        module.fail_json(msg=f"due_scan_limit must be 0 or more, got {module.params['due_scan_limit']}.")

    module.no_log_values.update(settings.secrets)
    for warning in settings.warnings():
        module.warn(warning)

    target = settings.describe()
    try:
        client = connect(settings)
        state = read_state(
            client,
            namespace_prefix=settings.key_prefix,
            pools=module.params["pools"],
            due_scan_limit=module.params["due_scan_limit"],
            settings=settings,
        )
    except RedisAccessError as error:
        module.fail_json(msg=mask_secrets(str(error), settings), redis_target=target)

    if not state.sidekiq_data_found and not module.params["allow_empty"]:
        module.fail_json(
            msg=(
                f"Redis at {target} holds no Sidekiq data: no queues, processes, counters or job sets. "
                "Check redis_db and redis_namespace, or set allow_empty: true for a fleet that has not run yet."
            ),
            redis_target=target,
        )

    module.exit_json(changed=False, msg=summarize(state, target), redis_target=target, **state.to_dict())


if __name__ == "__main__":
    main()
