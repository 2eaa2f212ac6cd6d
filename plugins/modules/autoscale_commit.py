#!/usr/bin/python
# Copyright: sidekiq-ops contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: autoscale_commit
short_description: Record the outcome of an autoscaling run and release the fleet's lock
version_added: "0.1.0"
description:
  - The last step of an autoscaling run that M(sidekiq_ops.fleet.autoscale) planned and the worker hosts
    carried out.
  - Matches every unit the plan named to the host's registered loop result of the starts and of the stops.
    A pool's action counts as done only when every one of its units was started or stopped.
  - Records each done action and its decision time in the pool's policy state in Redis, so that cooldowns
    follow what really happened. A failed action is not recorded and is reported plainly per pool.
  - Releases the fleet's lock by its token in the same Lua call, and only while the plan's lock is still held.
  - Does not fail when an action failed or the plan could not decide or place a pool. It returns them in
    RV(problems), and the playbook fails the run after logging them, so that a scheduled run shows up as failed.
extends_documentation_fragment:
  - sidekiq_ops.fleet.redis
attributes:
  check_mode:
    support: full
    description: Reports the outcome without writing to Redis; the plan took no lock in check mode.
  diff_mode:
    support: none
    description: The process counts before and after are shown by M(sidekiq_ops.fleet.autoscale).
options:
  plan:
    description:
      - The result that the playbook registered for M(sidekiq_ops.fleet.autoscale) in the same run.
    type: dict
    required: true
  start_results:
    description:
      - The registered loop result of the task that started the planned units, keyed by inventory host.
      - Each loop item must carry the unit name as C(item.unit).
    type: dict
    default: {}
  stop_results:
    description:
      - The registered loop result of the task that stopped the planned units, keyed by inventory host.
      - Each loop item must carry the unit name as C(item.unit).
    type: dict
    default: {}
notes:
  - Use the same Redis connection options and O(redis_namespace) as for M(sidekiq_ops.fleet.autoscale).
author:
  - sidekiq-ops maintainers (@sidekiq-ops)
"""

EXAMPLES = r"""
- name: Record the outcome and release the lock
  sidekiq_ops.fleet.autoscale_commit:
    plan: "{{ autoscale_plan }}"
    start_results: >-
      {{ dict(groups['sidekiq_workers'] | zip(groups['sidekiq_workers'] | map('extract', hostvars)
         | map(attribute='autoscale_started', default={}))) }}
    stop_results: >-
      {{ dict(groups['sidekiq_workers'] | zip(groups['sidekiq_workers'] | map('extract', hostvars)
         | map(attribute='autoscale_stopped', default={}))) }}
    redis_url: "{{ vault_autoscaler_redis_url }}"
  register: autoscale_outcome
  when: autoscale_plan.actions_planned or autoscale_plan.problems | length > 0

- name: Fail the run when a pool could not be scaled
  ansible.builtin.fail:
    msg: "{{ autoscale_outcome.problems | join(' | ') }}"
  when: autoscale_outcome.problems | default([]) | length > 0
"""

RETURN = r"""
msg:
  description: One sentence with the actions done and every problem.
  returned: always
  type: str
  sample: "Fleet shop: 1 pool actions done."
fleet:
  description: The fleet of the plan.
  returned: always
  type: str
pools:
  description: Per pool with units to change or that was not decided, its outcome.
  returned: always
  type: dict
  contains:
    status:
      description: V(succeeded), V(failed), or V(blocked) for a pool the plan did not decide.
      type: str
    action:
      description: V(scale_out), V(scale_in) or V(hold).
      type: str
    message:
      description: What was done or what failed, naming each unit and host.
      type: str
    units:
      description: Every planned unit with C(host), C(unit), C(operation), C(ok) and C(message).
      type: list
      elements: dict
  sample:
    default:
      status: failed
      action: scale_out
      message: "scale_out from 2 to 4 failed: start sidekiq-default@3.service on worker2: the host became unreachable"
units:
  description: Every planned start and stop with its outcome.
  returned: always
  type: list
  elements: dict
recorded:
  description: Pools whose action was recorded in their policy state.
  returned: always
  type: list
  elements: str
lock_released:
  description: Whether the plan's lock is released.
  returned: always
  type: bool
problems:
  description: Every pool whose action failed or that the plan could not decide or place, with the reason.
  returned: always
  type: list
  elements: str
log_lines:
  description: One line per pool with its outcome, for logs and journals.
  returned: always
  type: list
  elements: str
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_commit import commit
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import FleetNameError
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    REDIS_ARGUMENT_SPEC,
    RedisAccessError,
    connect,
    mask_secrets,
    settings_from_params,
)


def argument_spec() -> dict[str, dict[str, Any]]:
    spec = dict(REDIS_ARGUMENT_SPEC)
    spec.update(
        plan={"type": "dict", "required": True},
        start_results={"type": "dict", "default": {}},
        stop_results={"type": "dict", "default": {}},
    )
    return spec


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    plan = module.params["plan"]
    if plan.get("failed") or "pools" not in plan or "lock" not in plan:
        module.fail_json(msg="plan is not a result of sidekiq_ops.fleet.autoscale; pass the result it registered")
    if plan.get("lock_held"):
        module.exit_json(changed=False, msg="The plan did not hold the lock, so there is nothing to record.")
    try:
        settings = settings_from_params(module.params)
    except RedisAccessError as error:
        module.fail_json(msg=str(error))
    module.no_log_values.update(settings.secrets)

    lock = plan["lock"]
    needs_redis = not module.check_mode and bool(lock.get("value")) and not lock.get("released", True)
    try:
        client = connect(settings) if needs_redis else None
        result = commit(
            client,
            plan,
            module.params["start_results"],
            module.params["stop_results"],
            namespace_prefix=settings.key_prefix,
            check_mode=module.check_mode,
        )
    except (RedisAccessError, FleetNameError) as error:
        module.fail_json(msg=mask_secrets(str(error), settings), redis_target=settings.describe())

    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(changed=bool(result["recorded"]), **result)


if __name__ == "__main__":
    main()
