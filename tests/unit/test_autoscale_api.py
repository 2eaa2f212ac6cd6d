"""Unit tests of the API backends' run: option checks, the busy floor, the stored state, and one pool's decision
with a backend double in place of Kubernetes or AWS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import yaml
from process_states import process_state  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.doc_fragments.kubernetes import ModuleDocFragment
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import autoscale_api as api
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_backends import (
    AwsPool,
    BackendOptionsError,
    BackendOutcome,
    BackendReading,
    KubernetesPool,
    backend_argument_spec,
    open_backends,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import PolicyState, settings_from_pool
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws import AwsNotFoundError
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_kubernetes import KUBERNETES_ARGUMENT_SPEC
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import (
    JobSetState,
    PoolState,
    ProcessState,
    SidekiqState,
)

NOW = 1_700_000_000.0
POOL: dict[str, Any] = {
    "name": "default",
    "queues": ["default"],
    "concurrency": 10,
    "processes": {"min": 1, "max": 4},
    "autoscale": {"scale_in_cooldown": 0, "scale_in_stabilization": 0},
}
BASE_PARAMS: dict[str, Any] = {
    "pools": [POOL],
    "singleton_queues": [],
    "pools_filter": [],
    "shutdown_margin": 10,
    "fleet": "shop",
    "validate_certs": None,
    "aws_targets": {},
    "aws_task_protection_minutes": 15,
    "aws_retry_mode": "standard",
    "aws_max_attempts": 5,
}


class FakeBackend:
    """A PoolBackend double that records the target it was asked for."""

    resource = "fake deployment"

    def __init__(self, requested: int, fail_on: str | None = None, changed: bool = True) -> None:
        self.requested = requested
        self.fail_on = fail_on
        self.changed = changed
        self.targets: list[int] = []

    def read(self, own: Sequence[ProcessState], redis_client: Any, namespace_prefix: str, now: float) -> BackendReading:
        if self.fail_on == "read":
            raise AwsNotFoundError("fake deployment was not found.")
        return BackendReading(requested=self.requested, details={"requested": self.requested})

    def scale(
        self,
        reading: BackendReading,
        target: int,
        own: Sequence[ProcessState],
        redis_client: Any,
        namespace_prefix: str,
        check_mode: bool,
    ) -> BackendOutcome:
        self.targets.append(target)
        if self.fail_on == "scale":
            raise AwsNotFoundError("fake deployment vanished.")
        changed = self.changed and target != reading.requested
        return BackendOutcome(reached=target, changed=changed, actions=["scaled"] if changed and not check_mode else [])


def process(identity: str, busy: int) -> ProcessState:
    return process_state(identity.split(":")[0], beat=NOW, identity=identity, busy=busy, oldest_run_at=NOW - 5)


def sidekiq_state(processes: Sequence[ProcessState], backlog: int = 0, found: bool = True) -> SidekiqState:
    busy = sum(item.busy for item in processes)
    pool = PoolState(
        name="default",
        queues=("default",),
        queued=backlog,
        scheduled_due=0,
        retry_due=0,
        backlog=backlog,
        latency=30.0 if backlog else 0.0,
        busy=busy,
        capacity=10 * len(processes),
        processes=len(processes),
        quiet_processes=0,
        due_estimated=False,
        upcoming=3,
        longest_running=5.0 if busy else 0.0,
    )
    empty = JobSetState("schedule", 0, 0, {}, 0)
    return SidekiqState(
        now=NOW,
        processed=0,
        failed=0,
        queues={},
        scheduled=empty,
        retries=JobSetState("retry", 0, 0, {}, 0),
        dead=0,
        processes=tuple(processes),
        malformed=(),
        sidekiq_data_found=found,
        pools={"default": pool},
    )


def context(own: Sequence[ProcessState], stored: PolicyState | None = None) -> api.PoolContext:
    return api.PoolContext(
        name="default",
        settings=settings_from_pool(POOL),
        own=own,
        stored=stored or PolicyState(),
        throughput=None,
    )


# The busy floor and the stored state


@pytest.mark.parametrize(
    ("current", "desired", "busy", "expected"),
    [(4, 1, 25, 3), (4, 1, 0, 1), (2, 4, 30, 4), (3, 1, 40, 3), (3, 3, 5, 3)],
    ids=["floor", "idle", "scale-out", "floor-above-current", "hold"],
)
def test_scaling_target_cases(current: int, desired: int, busy: int, expected: int) -> None:
    target, notes = api.scaling_target(current, desired, busy, concurrency=10)

    assert target == expected
    assert bool(notes) == (expected > desired)


def test_scaling_target_note_names_busy() -> None:
    _target, notes = api.scaling_target(4, 1, 25, concurrency=10)

    assert notes == ["Keeping 3 processes instead of 1: 25 threads are busy and each process has 10."]


def test_state_records_action_only_when_acted() -> None:
    stored = PolicyState(last_action="scale_out", last_action_at=NOW - 500, last_scale_out_at=NOW - 500)
    decided = PolicyState(last_action="scale_in", last_action_at=NOW, last_scale_out_at=NOW - 500)

    kept = api.state_to_store(decided, stored, "scale_in", acted=False, now=NOW)
    recorded = api.state_to_store(decided, stored, "scale_out", acted=True, now=NOW)

    assert (kept.last_action, kept.last_action_at) == ("scale_out", NOW - 500)
    assert (recorded.last_action, recorded.last_action_at, recorded.last_scale_out_at) == ("scale_out", NOW, NOW)


# One pool's decision with a backend double


def test_backlog_scales_out_and_records() -> None:
    backend = FakeBackend(requested=1)
    own = [process("pod-a:1:x", busy=10)]

    outcome = api.scale_pool(context(own), backend, sidekiq_state(own, backlog=500), None, "", check_mode=False)

    assert outcome.status == api.ACT
    assert outcome.action == "scale_out"
    assert backend.targets == [4]
    assert outcome.signals is not None
    assert outcome.signals["upcoming"] == 3
    assert outcome.signals["longest_running"] == 5.0
    assert outcome.state is not None
    assert outcome.state.last_action == "scale_out"
    assert outcome.backend_actions == ["scaled"]


def test_scale_in_keeps_busy_floor() -> None:
    # Six processes above processes.max 4: the policy returns to the maximum, but 50 threads are busy.
    backend = FakeBackend(requested=6)
    own = [process(f"pod-{number}:1:x", busy=10 if number < 5 else 0) for number in range(6)]

    outcome = api.scale_pool(context(own), backend, sidekiq_state(own), None, "", check_mode=False)

    assert outcome.desired == 4
    assert backend.targets == [5]
    assert outcome.target == 5
    assert outcome.action == "scale_in"
    assert "Keeping 5 processes instead of 4: 50 threads are busy and each process has 10." in outcome.notes


def test_check_mode_stores_no_action() -> None:
    backend = FakeBackend(requested=1)
    own = [process("pod-a:1:x", busy=10)]

    outcome = api.scale_pool(context(own), backend, sidekiq_state(own, backlog=500), None, "", check_mode=True)

    assert outcome.status == api.ACT
    assert outcome.backend_actions == []
    assert outcome.state is not None
    assert outcome.state.last_action is None


@pytest.mark.parametrize("step", ["read", "scale"])
def test_backend_error_is_pool_failure(step: str) -> None:
    backend = FakeBackend(requested=1, fail_on=step)
    own = [process("pod-a:1:x", busy=10)]

    outcome = api.scale_pool(context(own), backend, sidekiq_state(own, backlog=500), None, "", check_mode=False)

    assert outcome.status == api.FAILED
    assert outcome.problem is not None
    assert outcome.problem.startswith("default: fake deployment ")
    assert api.api_log_line("shop", outcome).startswith("autoscale shop/default failed")


def test_empty_redis_blocks_running_pool() -> None:
    backend = FakeBackend(requested=3)

    outcome = api.scale_pool(context([]), backend, sidekiq_state([], found=False), None, "", check_mode=False)

    assert outcome.status == api.BLOCKED
    assert backend.targets == []
    assert "Redis holds no Sidekiq data" in outcome.reason


def test_summary_names_failed_pools() -> None:
    failed = api.ApiPoolOutcome(name="bulk", status=api.FAILED, action="hold", reason="", error="403")
    held = api.ApiPoolOutcome(name="default", status=api.UNCHANGED, action="hold", reason="")

    text = api.summary("shop", "kubernetes", [held, failed], check_mode=False)

    assert text == "Scaled 2 pools of fleet shop with kubernetes: 0 scale out, 0 scale in, 1 hold, 1 failed (bulk)."


# Options


def test_validate_certs_is_shared() -> None:
    spec = backend_argument_spec()

    assert spec["validate_certs"] == {"type": "bool", "aliases": ["verify_ssl"]}
    assert "kubernetes_namespace" in spec
    assert "aws_targets" in spec


def test_kubernetes_fragment_matches_spec() -> None:
    documented = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"]

    assert sorted(documented) == sorted(KUBERNETES_ARGUMENT_SPEC)
    for name, option in KUBERNETES_ARGUMENT_SPEC.items():
        assert documented[name]["type"] == option["type"], name
        assert documented[name].get("default") == option.get("default"), name
        assert documented[name].get("aliases") == option.get("aliases"), name


def test_kubernetes_needs_namespace() -> None:
    with pytest.raises(BackendOptionsError, match="kubernetes_namespace is missing"):
        open_backends("kubernetes", BASE_PARAMS, [POOL], ["default"])


def test_kubernetes_opens_one_pool_each() -> None:
    params = {**BASE_PARAMS, "kubernetes_namespace": "shop", "host": "https://127.0.0.1:6443", "api_key": "t"}

    backends = open_backends("kubernetes", params, [POOL], ["default"])

    assert isinstance(backends["default"], KubernetesPool)
    assert backends["default"].resource == "deployments/scale shop/sidekiq-default"


def test_aws_unset_validate_certs_verifies() -> None:
    params = {**BASE_PARAMS, "region": "us-east-1"}

    backends = open_backends("aws_asg", params, [POOL], ["default"])

    scaler = backends["default"]
    assert isinstance(scaler, AwsPool)
    assert scaler.resource == "Auto Scaling group 'sidekiq-default'"
    assert scaler.scaler.settings.validate_certs is True


def test_ecs_filtered_pool_needs_no_cluster() -> None:
    bulk = dict(POOL, name="bulk", queues=["bulk"])
    params = {**BASE_PARAMS, "region": "us-east-1", "pools": [POOL, bulk], "aws_targets": {"default": {"cluster": "c"}}}

    backends = open_backends("aws_ecs", params, [POOL, bulk], ["default"])

    assert list(backends) == ["default"]


def test_ecs_invalid_protection_minutes() -> None:
    params = {
        **BASE_PARAMS,
        "region": "us-east-1",
        "aws_targets": {"default": {"cluster": "c"}},
        "aws_task_protection_minutes": 0,
    }

    with pytest.raises(BackendOptionsError, match="protection_minutes 0 is invalid"):
        open_backends("aws_ecs", params, [POOL], ["default"])


def test_request_collects_pool_errors() -> None:
    params = {**BASE_PARAMS, "backend": "kubernetes", "pools": [dict(POOL, processes={"min": 5, "max": 2})]}

    request, errors = api.build_api_request(params, check_mode=False)

    assert request is None
    assert any("processes.min 5 is above processes.max 2" in error for error in errors)
