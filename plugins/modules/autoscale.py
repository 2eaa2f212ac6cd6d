#!/usr/bin/python
# Copyright: sidekiq-ops contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: autoscale
short_description: Decide the size of every Sidekiq pool from its queues and scale it on systemd, Kubernetes or AWS
version_added: "0.1.0"
description:
  - Runs one autoscaling decision for every pool of a fleet, as a scheduled run does every 30 to 60 seconds.
  - Takes the fleet's lock in Redis (C(SET NX) with a random token and an expiry), so that only one run decides
    and acts at a time. When another run holds the lock, returns RV(lock_held=true) and changes nothing.
  - Reads Sidekiq's state once (queues, scheduled and retry jobs, processes, busy threads, the processed
    counter), loads each pool's policy state kept in Redis by earlier runs, and measures throughput from
    C(stat:processed) between runs.
  - Reads the scheduled and retry jobs of each pool's queues that come due within the next 60 seconds, and the
    age of the oldest running job from the processes' work hashes, so the policy can grow a pool before a batch
    comes due and spare processes that run long jobs.
  - Calls the scaling policy for each pool, which returns the desired process count with a reason. Pools with
    C(processes.min) equal to C(processes.max) and pools that serve a singleton queue are never scaled.
  - For the V(systemd) backend the module cannot reach the worker hosts itself. The playbook reads the units on
    each host first and passes them in O(instances). The module plans which units C(sidekiq-<pool>@<n>.service)
    to start on which host (lowest free instance numbers, on the hosts that run the fewest of the pool) and which
    to stop (quiet ones first, then the least busy, matched to Sidekiq processes by hostname and C(MainPID)).
    A scale-in never leaves fewer threads than are busy.
  - When a worker host could not be read, pools with live processes on that host are not scaled in this run
    and are reported in RV(problems); the other pools are scaled on the hosts that were read.
  - Stores each pool's new policy state, but not the scaling action. The module
    M(sidekiq_ops.fleet.autoscale_commit) records the action once the hosts have carried it out and releases
    the lock. When no pool has units to change, this module releases the lock itself.
  - The playbook C(playbooks/autoscale.yml) of the project runs the whole cycle.
  - The backends V(kubernetes), V(aws_asg) and V(aws_ecs) are reached by the module itself, so one task does the
    whole run. Per pool, it reads the process count the backend is set to, decides, keeps a scale-in at the busy
    floor, and scales. Then it stores each pool's policy state with the action the backend made, and releases
    the lock.
  - V(kubernetes) scales the Deployment C(sidekiq-<pool>) in O(kubernetes_namespace) through its scale
    subresource. A scale-in first gives the pods to remove the lowest C(controller.kubernetes.io/pod-deletion-cost)
    and quiets their Sidekiq processes.
  - V(aws_asg) and V(aws_ecs) scale the Auto Scaling group or ECS service of each pool (O(aws_targets)). A
    scale-in takes several runs. The first run protects the chosen instances or tasks from scale-in and quiets
    them, and a later run removes them once they are idle.
  - When one pool's backend fails (an API error, access denied, a conflict that persists), the error is reported
    for that pool in RV(problems), the other pools are still scaled, the lock is released, and the task fails at
    the end with a message that names the pool and the error.
extends_documentation_fragment:
  - sidekiq_ops.fleet.redis
  - sidekiq_ops.fleet.kubernetes
  - sidekiq_ops.fleet.aws
  - sidekiq_ops.fleet.aws.targets
attributes:
  check_mode:
    support: full
    description:
      - Decides and plans without taking the lock and without writing anything to Redis.
      - For the API backends, reads the backend and returns the plan, without any change to the backend.
  diff_mode:
    support: full
    description: Shows the process count of every pool before and after the plan.
options:
  pools:
    description:
      - Every worker pool of the fleet, in the form of C(sidekiq_pools) in group_vars.
      - Each pool needs C(name) and C(queues); C(concurrency), C(timeout), C(processes), C(autoscale) and C(tag)
        are read as the sidekiq role reads them.
      - Invalid pools or autoscale settings fail the task before anything changes, with a message naming the
        value and the fix.
    type: list
    elements: dict
    required: true
  singleton_queues:
    description:
      - Queues that must never run in more than one process. Pools that serve one are never scaled.
    type: list
    elements: str
    default: []
  pools_filter:
    description:
      - Names of the pools to decide in this run; the others are left as they are. Empty decides every pool.
      - A name that is not in O(pools) fails the task.
    type: list
    elements: str
    default: []
  backend:
    description:
      - Where the pools run. V(systemd) plans instance units on the worker hosts of O(instances), which the
        playbook then starts and stops.
      - V(kubernetes) scales the Deployments C(sidekiq-<pool>) in O(kubernetes_namespace).
      - V(aws_asg) scales one EC2 Auto Scaling group and V(aws_ecs) one ECS service per pool, as O(aws_targets) names
        them.
      - The options of the other backends are ignored.
    type: str
    choices: [systemd, kubernetes, aws_asg, aws_ecs]
    default: systemd
  kubernetes_namespace:
    description:
      - Namespace of the pools' Deployments, as C(sidekiq_kubernetes_namespace) sets it. Required for the
        V(kubernetes) backend.
    type: str
  validate_certs:
    description:
      - Verify the TLS certificate of the chosen backend's API. Only one backend runs per task, so this one option
        serves both the Kubernetes API server and the AWS endpoints, as it does in kubernetes.core and amazon.aws.
      - When unset, the V(aws_asg) and V(aws_ecs) backends verify (amazon.aws's default), and the V(kubernetes)
        backend falls back to E(K8S_AUTH_VALIDATE_CERTS), then to the kubeconfig.
    type: bool
    aliases: [verify_ssl]
    default: null
  instances:
    description:
      - For the V(systemd) backend, the unit reading of every worker host, keyed by inventory host name, in the
        order hosts should take new processes.
      - Each value is the result the playbook registered for the command C(uname -n && systemctl show --no-pager
        --property=Id,ActiveState,SubState,MainPID 'sidekiq-*@*.service') on that host, run with
        C(ignore_unreachable). A result that is unreachable, failed or missing marks the host as not read.
    type: dict
    default: {}
  fleet:
    description:
      - Name of the fleet in the keys of the lock and the state, C(sidekiq-ops:autoscale:<fleet>:lock) and
        C(sidekiq-ops:autoscale:<fleet>:state), under the O(redis_namespace) prefix when one is set.
      - Use one name per set of pools that a single autoscaler manages, for example the app name.
    type: str
    default: default
  shutdown_margin:
    description:
      - Seconds the stop budget adds to a pool's C(timeout); use the sidekiq role's C(sidekiq_shutdown_margin).
      - The lock's expiry covers the longest stop, which is the wait for idle (C(timeout)) plus the stop budget.
    type: int
    default: 10
  start_timeout:
    description:
      - Seconds the lock's expiry allows for each planned start; use the sidekiq role's C(sidekiq_start_timeout).
    type: int
    default: 90
notes:
  - Sidekiq keeps one C(stat:processed) counter for the whole app. With several pools, the jobs finished between
    two runs are shared out by each pool's busy threads, which is exact only when the pools' jobs take equally
    long.
  - The Redis user needs the commands of M(sidekiq_ops.fleet.queue_info) plus C(SET), C(DEL), C(PEXPIRE),
    C(PTTL), C(HGETALL), C(HSET), C(EXPIRE), C(EVAL), C(EVALSHA) and C(SCRIPT LOAD) on the keys
    C(sidekiq-ops:autoscale:*) (the lock and the state are written by Lua scripts). The API backends also
    send C(LPUSH) and C(EXPIRE) to C(<identity>-signals) to quiet processes, and the AWS backends keep
    C(HSET) and C(HDEL) records under C(sidekiq-ops:autoscale:aws:*).
  - The V(kubernetes) backend needs C(get) on C(deployments), C(get) and C(patch) on C(deployments/scale) and
    C(list) and C(patch) on C(pods) in O(kubernetes_namespace). It holds a scale-in while the Deployment rolls out,
    and never lets the ReplicaSet controller remove a busy pod that is not ready ahead of an idle one. Pods whose
    Sidekiq process is quiet count out of the current count and go first at the next change.
  - The V(aws_asg) backend needs C(autoscaling:DescribeAutoScalingGroups), C(autoscaling:SetDesiredCapacity),
    C(autoscaling:SetInstanceProtection), C(autoscaling:TerminateInstanceInAutoScalingGroup) and
    C(ec2:DescribeInstances). The V(aws_ecs) backend needs C(ecs:DescribeServices), C(ecs:DescribeTaskDefinition),
    C(ecs:ListTasks), C(ecs:DescribeTasks), C(ecs:GetTaskProtection), C(ecs:UpdateTaskProtection) and
    C(ecs:UpdateService).
author:
  - sidekiq-ops maintainers (@sidekiq-ops)
"""

EXAMPLES = r"""
- name: Read the units of every pool on the worker hosts
  ansible.builtin.shell: >-
    uname -n && systemctl show --no-pager --property=Id,ActiveState,SubState,MainPID 'sidekiq-*@*.service'
  register: autoscale_units
  changed_when: false
  check_mode: false
  ignore_unreachable: true
  # runs in a play on the sidekiq_workers group

- name: Decide and plan every pool
  sidekiq_ops.fleet.autoscale:
    pools: "{{ sidekiq_pools }}"
    singleton_queues: "{{ sidekiq_singleton_queues }}"
    fleet: shop
    redis_url: "{{ vault_autoscaler_redis_url }}"
    instances: >-
      {{ dict(groups['sidekiq_workers'] | zip(groups['sidekiq_workers'] | map('extract', hostvars)
         | map(attribute='autoscale_units', default={}))) }}
  register: autoscale_plan
  # runs in a play on localhost

- name: Decide only the default pool, without acting
  sidekiq_ops.fleet.autoscale:
    pools: "{{ sidekiq_pools }}"
    pools_filter: [default]
    fleet: shop
    redis_url: "{{ vault_autoscaler_redis_url }}"
  check_mode: true

- name: Scale the pools' Deployments, from a CronJob pod with its ServiceAccount
  sidekiq_ops.fleet.autoscale:
    backend: kubernetes
    kubernetes_namespace: shop
    pools: "{{ sidekiq_pools }}"
    fleet: shop
    redis_url: "{{ lookup('ansible.builtin.env', 'REDIS_URL') }}"

- name: Scale the pools' ECS services
  sidekiq_ops.fleet.autoscale:
    backend: aws_ecs
    region: eu-west-1
    aws_targets:
      default: {cluster: shop-workers}
      bulk: {cluster: shop-workers, service: shop-bulk, processes_per_task: 2}
    pools: "{{ sidekiq_pools }}"
    fleet: shop
    redis_url: "{{ vault_autoscaler_redis_url }}"
"""

RETURN = r"""
msg:
  description:
    - One sentence with how many pools were decided, how, and how many units change (V(systemd)) or which pools
      failed (the API backends).
    - When a pool's backend failed or a pool was not scaled, the task fails and the message lists RV(problems).
  returned: always
  type: str
  sample: "Decided 2 pools of fleet shop: 1 to scale out, 0 to scale in, 1 to hold; 2 units to start and 0 to stop."
backend:
  description: The backend of this run, for the API backends.
  returned: when O(backend) is not V(systemd)
  type: str
  sample: kubernetes
fleet:
  description: The fleet name of the lock and state keys.
  returned: always
  type: str
  sample: shop
redis_target:
  description: The Redis that was used, without credentials.
  returned: always
  type: str
  sample: 10.0.1.5:6379 db 0
lock_held:
  description: Whether another run held the fleet's lock, in which case nothing was read or changed.
  returned: always
  type: bool
lock:
  description: The fleet's lock as this run used it.
  returned: always
  type: dict
  contains:
    key:
      description: The Redis key of the lock.
      type: str
    value:
      description: The value this run set (a random token, the control host and the start time); V(null) in check mode.
      type: str
    ttl:
      description: Seconds of the lock's expiry after the plan; V(null) in check mode.
      type: int
    released:
      description: Whether the lock is free again, because nothing is to be done or check mode took none.
      type: bool
    holder:
      description: When RV(lock_held), who holds the lock and when it expires.
      type: str
now:
  description: Redis server time of the reading, epoch seconds.
  returned: unless lock_held
  type: float
pools:
  description: The decision and plan of every pool that was decided, by pool name.
  returned: always
  type: dict
  contains:
    status:
      description:
        - V(act) when units change or the backend changed something, V(hold) when nothing changes, V(blocked)
          when the pool was not decided.
        - V(failed) when the pool's backend failed; RV(pools.error) gives the reason.
      type: str
    action:
      description: V(scale_out), V(scale_in) or V(hold), after the busy floor and the placement of units.
      type: str
    current:
      description:
        - Running and booting units of the pool on the hosts that were read (V(systemd)), the Deployment's
          replicas less its pods whose Sidekiq process is quiet (V(kubernetes)), or the processes of the members
          that are not leaving (AWS).
      type: int
    desired:
      description: The process count the policy chose.
      type: int
    target:
      description:
        - The process count the plan reaches. Above RV(pools.desired) on a scale-in when the busy floor keeps
          processes, and below it when the backend cannot place or reach the count (see RV(pools.notes)).
      type: int
    recommendation:
      description: Processes the demand alone needs, within min and max, before steps and cooldowns.
      type: int
    reason:
      description: Plain sentences that state what was measured and why the count was chosen.
      type: str
    signals:
      description: The signals given to the policy (backlog, latency, busy, processes, capacity, idle_processes,
        requested, throughput, upcoming, longest_running).
      type: dict
    details:
      description: The figures behind the reason (arrival rate, job duration, threads needed).
      type: dict
    start:
      description: Units to start, each with C(host), C(unit) and C(pool). Only for V(systemd).
      type: list
      elements: dict
    stop:
      description:
        - Units to stop, each with C(host), C(unit), C(pool), the process's C(busy) threads and C(identity).
          Only for V(systemd).
      type: list
      elements: dict
    error:
      description: Why the pool's backend failed; V(null) unless RV(pools.status) is V(failed). Not for V(systemd).
      type: str
    backend_actions:
      description: One sentence per change the backend made, in order; empty in check mode. Not for V(systemd).
      type: list
      elements: str
    backend:
      description:
        - The backend's reading (C(reading)) and its result (V(kubernetes), C(result)) or plan (AWS, C(plan)).
          Not for V(systemd).
      type: dict
    notes:
      description: Sentences about anything that changed the plan or needs attention.
      type: list
      elements: str
  sample:
    default:
      status: act
      action: scale_out
      current: 2
      desired: 4
      target: 4
      reason: "Backlog 1200 jobs with latency 35 s exceeds target 10 s. ... Scaling out from 2 to 4."
      start:
        - {host: worker1, unit: sidekiq-default@3.service, pool: default}
        - {host: worker2, unit: sidekiq-default@3.service, pool: default}
      stop: []
starts:
  description: The units to start, grouped by inventory host, each with C(unit) and C(pool).
  returned: when O(backend=systemd)
  type: dict
  sample: {worker1: [{unit: sidekiq-default@3.service, pool: default}]}
stops:
  description: The units to stop, grouped by inventory host, each with C(unit), C(pool), C(timeout) and C(busy).
  returned: when O(backend=systemd)
  type: dict
  sample: {worker2: [{unit: sidekiq-default@2.service, pool: default, timeout: 25, busy: 0}]}
actions_planned:
  description:
    - Whether any unit is to be started or stopped by the playbook's hosts.
    - Always V(false) for the API backends, which act within the task.
  returned: always
  type: bool
problems:
  description:
    - Pools that cannot reach their desired count this run, with the reason.
    - For the API backends, the pools whose backend failed or that were not scaled, each as the pool name, a colon
      and the error.
  returned: always
  type: list
  elements: str
log_lines:
  description: One line per pool with the decision, the signals and the reason, for logs and journals.
  returned: always
  type: list
  elements: str
  sample:
    - "autoscale shop/default scale_out 2 -> 4 (backlog 1200, latency 35.0 s, busy 20/20 threads): ..."
unreadable_hosts:
  description: Worker hosts whose units could not be read, with the reason.
  returned: when O(backend=systemd)
  type: dict
  sample: {worker3: "unreachable: Failed to connect to the host via ssh"}
"""

from typing import Any, NoReturn

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_api import build_api_request, run_api
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_backends import (
    BACKENDS,
    SYSTEMD,
    backend_argument_spec,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_plan import (
    DEFAULT_START_TIMEOUT,
    AutoscaleError,
    PlanRequest,
    run_plan,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_signals import validate_request
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_store import FleetKeys, FleetNameError
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_systemd import parse_host_readings
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.pools import DEFAULT_SHUTDOWN_MARGIN
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    REDIS_ARGUMENT_SPEC,
    RedisAccessError,
    RedisSettings,
    connect,
    mask_secrets,
    settings_from_params,
)


def argument_spec() -> dict[str, dict[str, Any]]:
    """Return the module's argument spec: the shared Redis and backend options plus the autoscaler's own."""
    spec = dict(REDIS_ARGUMENT_SPEC)
    spec.update(backend_argument_spec())
    spec.update(
        pools={"type": "list", "elements": "dict", "required": True},
        singleton_queues={"type": "list", "elements": "str", "default": []},
        pools_filter={"type": "list", "elements": "str", "default": []},
        backend={"type": "str", "choices": list(BACKENDS), "default": SYSTEMD},
        instances={"type": "dict", "default": {}},
        fleet={"type": "str", "default": "default"},
        shutdown_margin={"type": "int", "default": DEFAULT_SHUTDOWN_MARGIN},
        start_timeout={"type": "int", "default": DEFAULT_START_TIMEOUT},
    )
    return spec


def fail_invalid(module: AnsibleModule, errors: list[str]) -> NoReturn:
    module.fail_json(msg="Invalid autoscale settings; nothing was changed: " + " | ".join(errors), errors=errors)
    # fail_json exits the process; its type hints do not say so.
    raise AssertionError("fail_json returned")


def build_request(module: AnsibleModule) -> PlanRequest:
    """Validate the systemd backend's input that does not need Redis; fail the task, naming the value and the fix."""
    params = module.params
    settings, errors = validate_request(
        params["pools"], params["singleton_queues"], params["pools_filter"], params["shutdown_margin"]
    )
    if params["start_timeout"] < 1:
        errors.append(
            f"start_timeout {params['start_timeout']} is invalid; give the seconds systemd waits for a start (>= 1)"
        )
    pool_names = [str(pool.get("name")) for pool in params["pools"]]
    try:
        parse_host_readings(params["instances"], pool_names)
    except ValueError as error:
        errors.append(str(error))
    if errors:
        fail_invalid(module, errors)
    return PlanRequest(
        pools=params["pools"],
        settings=settings,
        selected=params["pools_filter"] or pool_names,
        fleet=params["fleet"],
        instances=params["instances"],
        margin=params["shutdown_margin"],
        start_timeout=params["start_timeout"],
        check_mode=module.check_mode,
    )


def run_systemd(module: AnsibleModule, settings: RedisSettings) -> dict[str, Any]:
    request = build_request(module)
    client = connect(settings)
    result = run_plan(client, request, settings.key_prefix, settings)
    result["changed"] = bool(result["actions_planned"])
    return result


def run_backend(module: AnsibleModule, settings: RedisSettings) -> dict[str, Any]:
    """Run the whole cycle with an API backend; every option is checked before Redis or the API is touched."""
    request, errors = build_api_request(module.params, module.check_mode)
    if request is None:
        fail_invalid(module, errors)
    if module.params["instances"]:
        module.warn(f"instances is read only by the systemd backend, so it was ignored for {request.backend}.")
    client = connect(settings)
    return run_api(client, request, settings.key_prefix, settings)


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    try:
        settings = settings_from_params(module.params)
        FleetKeys.for_fleet(module.params["fleet"], settings.key_prefix)
    except (RedisAccessError, FleetNameError) as error:
        module.fail_json(msg=str(error))

    module.no_log_values.update(settings.secrets)
    for warning in settings.warnings():
        module.warn(warning)
    target = settings.describe()
    run = run_systemd if module.params["backend"] == SYSTEMD else run_backend
    try:
        result = run(module, settings)
    except (RedisAccessError, AutoscaleError) as error:
        module.fail_json(msg=mask_secrets(str(error), settings), redis_target=target)

    for warning in result.pop("warnings"):
        module.warn(warning)
    diff = result.pop("diff", None)
    if module._diff and diff:
        result["diff"] = diff
    if result["problems"] and module.params["backend"] != SYSTEMD:
        # The systemd run leaves failing to the playbook, after the hosts have acted and the commit step ran.
        result["msg"] = f"{result['msg']} Problems: {' | '.join(result['problems'])}"
        module.fail_json(redis_target=target, **result)
    module.exit_json(redis_target=target, **result)


if __name__ == "__main__":
    main()
