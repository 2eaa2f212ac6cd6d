#!/usr/bin/python
# Copyright: sidekiq-ops contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sidekiq_instance
short_description: Restart or stop a Sidekiq systemd instance without losing jobs
version_added: "0.1.0"
description:
  - Manages one instance of a Sidekiq pool unit such as C(sidekiq-default@2.service) on a systemd host.
  - Before a restart or a stop it quiets the process (TSTP), then waits until the process has no busy threads
    or O(timeout) seconds have passed, reading the busy count that Sidekiq reports to Redis.
  - systemd then stops the process with TERM, and Sidekiq pushes any job still running back to its queue.
    The unit's C(TimeoutStopSec) must cover Sidekiq's timeout plus a margin, which the sidekiq role renders.
  - A restart returns once Sidekiq has reported ready to systemd (C(Type=notify)).
  - When Redis cannot be reached the module still quiets and stops the process, skips the wait for idle,
    and says so in O(ignore:messages).
options:
  unit:
    description: Name of the instance, for example C(sidekiq-default@1.service).
    type: str
    required: true
  state:
    description:
      - V(restarted) quiets, drains and restarts a running instance, or starts one that is not running.
      - V(stopped) quiets, drains, stops and disables the instance; nothing happens when it is not running.
    type: str
    choices: [restarted, stopped]
    required: true
  timeout:
    description: Seconds to wait for busy threads to finish after quieting; use the pool's Sidekiq timeout.
    type: int
    required: true
  env_file:
    description:
      - The instance's EnvironmentFile. Its C(REDIS_URL) is used to read busy threads, so the password
        never appears in task arguments or logs.
    type: path
  disable:
    description: With O(state=stopped), also disable the instance so that a reboot does not start it again.
    type: bool
    default: true
requirements:
  - python3-redis (redis-py) on the managed host, to wait for idle
notes:
  - Supports check mode, in which it reports what it would do without sending any signal.
author:
  - sidekiq-ops maintainers (@sidekiq-ops)
"""

EXAMPLES = r"""
- name: Restart instance 1 of the default pool, waiting up to 25 s for its jobs to finish
  sidekiq_ops.fleet.sidekiq_instance:
    unit: sidekiq-default@1.service
    state: restarted
    timeout: 25
    env_file: /etc/sidekiq/default.env

- name: Scale in by stopping instance 3 after it drains
  sidekiq_ops.fleet.sidekiq_instance:
    unit: sidekiq-default@3.service
    state: stopped
    timeout: 25
    env_file: /etc/sidekiq/default.env
"""

RETURN = r"""
unit:
  description: The instance acted on.
  returned: always
  type: str
  sample: sidekiq-default@1.service
identity:
  description: Sidekiq's identity of the process that was quieted (host:pid:nonce), when it was found in Redis.
  returned: always
  type: str
  sample: worker1:4242:0f3a9c1b2d4e
busy_before:
  description: Busy threads when the process was quieted.
  returned: always
  type: int
  sample: 3
busy_at_stop:
  description: Busy threads when the stop began; jobs still running then were pushed back to their queues.
  returned: always
  type: int
  sample: 0
waited_seconds:
  description: Seconds spent waiting for the process to become idle.
  returned: always
  type: float
  sample: 4.2
messages:
  description: Plain sentences about anything unusual, such as Redis not being reachable.
  returned: always
  type: list
  elements: str
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import systemd_instances as instances

try:
    import redis

    HAS_REDIS = True
except ImportError:
    HAS_REDIS = False


def redis_client(module: AnsibleModule, messages: list[str]) -> Any | None:
    """Connect to Redis with the REDIS_URL of the instance's environment file, or return None."""
    env_file = module.params["env_file"]
    if not env_file:
        messages.append("no env_file given; not waiting for idle")
        return None
    if not HAS_REDIS:
        messages.append(missing_required_lib("redis") + "; not waiting for idle")
        return None
    try:
        environment = instances.read_environment_file(env_file)
    except OSError as error:
        messages.append(f"cannot read {env_file}: {error.strerror}; not waiting for idle")
        return None
    url = environment.get("REDIS_URL")
    if not url:
        messages.append(f"{env_file} has no REDIS_URL; not waiting for idle")
        return None
    options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5}
    # The role puts a private CA for TLS to Redis into SSL_CERT_FILE, which Sidekiq's OpenSSL reads by itself.
    if url.startswith("rediss://") and environment.get("SSL_CERT_FILE"):
        options["ssl_ca_certs"] = environment["SSL_CERT_FILE"]
    try:
        client = redis.Redis.from_url(url, **options)
        client.ping()
    except redis.RedisError as error:
        messages.append(f"Redis is not reachable ({type(error).__name__}); not waiting for idle")
        return None
    return client


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "unit": {"type": "str", "required": True},
            "state": {"type": "str", "required": True, "choices": ["restarted", "stopped"]},
            "timeout": {"type": "int", "required": True},
            "env_file": {"type": "path"},
            "disable": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    unit = module.params["unit"]
    state = module.params["state"]
    timeout = module.params["timeout"]
    if not unit.endswith(".service") or "@" not in unit:
        module.fail_json(msg=f"unit {unit!r} is invalid; name an instance such as 'sidekiq-default@1.service'")
    if timeout < 0:
        module.fail_json(msg=f"timeout {timeout} is invalid; give the pool's Sidekiq timeout in seconds (>= 0)")

    try:
        before = instances.unit_state(unit)
    except instances.InstanceError as error:
        module.fail_json(msg=str(error), unit=unit)

    result: dict[str, Any] = {
        "unit": unit,
        "changed": False,
        "identity": None,
        "busy_before": None,
        "busy_at_stop": None,
        "waited_seconds": 0.0,
        "messages": [],
    }
    if state == "stopped" and not before.running:
        result["messages"].append(f"{unit} is not running")
        if module.params["disable"] and before.unit_file_state == "enabled":
            result["changed"] = True
            if not module.check_mode:
                instances.run_systemctl("disable", unit)
        module.exit_json(**result)

    result["changed"] = True
    result["diff"] = {"before": f"{unit}: {before.active_state}\n", "after": f"{unit}: {state}\n"}
    if module.check_mode:
        module.exit_json(**result)

    messages: list[str] = []
    client = redis_client(module, messages) if before.running else None
    try:
        if state == "restarted":
            drained = instances.restart(unit, timeout, client)
        else:
            drained = instances.stop(unit, timeout, client, disable=module.params["disable"])
    except instances.InstanceError as error:
        module.fail_json(msg=str(error), **result)
    result.update(drained.to_dict())
    result["messages"] = messages + drained.messages
    module.exit_json(**result)


if __name__ == "__main__":
    main()
