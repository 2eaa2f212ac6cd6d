"""Safety of a Kubernetes scale-in: busy pods the ReplicaSet would remove first, quiet pods left by a failed patch,
and scale-ins during a rollout.

The Kubernetes API and Redis are small in-memory fakes that keep their state between calls, so a test can run
several autoscaling runs in a row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from process_states import process_state  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import scaling_kubernetes as kubernetes
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.autoscale_backends import KubernetesPool
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

NOW = 1_800_000_000.0
CREATED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DEPLOYMENT = "sidekiq-default"
STEADY = kubernetes.RolloutReading(
    generation=3,
    observed_generation=3,
    replicas=2,
    status_replicas=2,
    updated_replicas=2,
    unavailable_replicas=0,
    progressing_reason="NewReplicaSetAvailable",
)


def process(hostname: str, busy: int = 0, quiet: bool = False, pid: int = 1) -> ProcessState:
    return process_state(hostname, beat=NOW, pid=pid, busy=busy, quiet=quiet)


def pod(name: str, ready: bool = True, phase: str = "Running", node: str | None = "node-1") -> kubernetes.PodReading:
    return kubernetes.PodReading(
        name=name,
        node_name=node,
        phase=phase,
        ready=ready,
        terminating=False,
        deletion_cost=None,
        created=CREATED,
    )


class FakeRedis:
    """The Redis commands the backend sends to quiet a process: LPUSH and EXPIRE in a pipeline."""

    def __init__(self) -> None:
        self.lists: dict[str, list[str]] = {}

    def lpush(self, key: str, value: str) -> None:
        self.lists.setdefault(key, []).insert(0, value)

    def expire(self, key: str, seconds: int) -> None:
        pass

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    def signalled(self) -> list[str]:
        return sorted(key for key, values in self.lists.items() if "TSTP" in values)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def lpush(self, *args: Any) -> None:
        self.commands.append(("lpush", args))

    def expire(self, *args: Any) -> None:
        self.commands.append(("expire", args))

    def execute(self) -> list[Any]:
        return [getattr(self.redis, name)(*args) for name, args in self.commands]


class FakeKubernetesApi:
    """One Deployment's scale subresource, rollout status and pods.

    With `patch_error` set, every scale patch raises it. Annotations are recorded by pod name.
    """

    def __init__(
        self,
        replicas: int,
        pods: Sequence[kubernetes.PodReading],
        patch_error: Exception | None = None,
        rollout: kubernetes.RolloutReading = STEADY,
    ) -> None:
        self.replicas = replicas
        self.pods = list(pods)
        self.patch_error = patch_error
        self.rollout = rollout
        self.patches: list[int] = []
        self.annotations: dict[str, dict[str, str]] = {}

    def read_scale(self, namespace: str, name: str) -> kubernetes.ScaleReading:
        return kubernetes.ScaleReading(self.replicas, len(self.pods), "app=sidekiq-default", "1")

    def read_rollout(self, namespace: str, name: str) -> kubernetes.RolloutReading:
        return self.rollout

    def patch_scale(self, namespace: str, name: str, replicas: int, resource_version: str) -> kubernetes.ScaleReading:
        if self.patch_error is not None:
            raise self.patch_error
        self.patches.append(replicas)
        self.replicas = replicas
        return self.read_scale(namespace, name)

    def list_pods(self, namespace: str, selector: str) -> list[kubernetes.PodReading]:
        return list(self.pods)

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        self.annotations.setdefault(name, {}).update(annotations)

    def cost(self, name: str) -> str | None:
        return self.annotations.get(name, {}).get(kubernetes.DELETION_COST_ANNOTATION)


def backend(api: FakeKubernetesApi, redis: FakeRedis | None = None) -> kubernetes.KubernetesBackend:
    return kubernetes.KubernetesBackend(api, "shop", redis_client=redis or FakeRedis(), max_attempts=3)


def plan_names(pods: Sequence[kubernetes.PodReading], processes: Sequence[ProcessState], count: int) -> list[str]:
    plan = kubernetes.plan_scale_in(kubernetes.match_pods(pods, processes), count)
    return [state.name for state in plan.removals]


# --- A busy pod that the ReplicaSet controller would remove first ------------------------------------------------


def test_busy_unready_pod_is_held() -> None:
    api = FakeKubernetesApi(replicas=2, pods=[pod("sidekiq-default-idle"), pod("sidekiq-default-busy", ready=False)])
    redis = FakeRedis()
    processes = [process("sidekiq-default-idle"), process("sidekiq-default-busy", busy=5)]

    result = backend(api, redis).scale(DEPLOYMENT, 1, processes)

    assert result.removals == []
    assert api.patches == []
    assert api.replicas == 2
    assert redis.signalled() == []
    assert not result.changed
    assert result.requested_after == 2
    assert any(
        "Holding 1 pod of the scale-in: pod sidekiq-default-busy runs 5 jobs and is not ready" in note
        for note in result.notes
    ), result.notes


def test_held_scale_in_still_marks_idle_pod() -> None:
    api = FakeKubernetesApi(replicas=2, pods=[pod("sidekiq-default-idle"), pod("sidekiq-default-busy", ready=False)])
    processes = [process("sidekiq-default-idle"), process("sidekiq-default-busy", busy=5)]

    result = backend(api).scale(DEPLOYMENT, 1, processes)

    assert api.cost("sidekiq-default-idle") == "0"
    assert api.cost("sidekiq-default-busy") == "5"
    assert result.deletion_costs == {"sidekiq-default-idle": 0, "sidekiq-default-busy": 5}


def test_unmatched_unready_pod_is_held() -> None:
    # A started pod without a Sidekiq process in Redis might run jobs that cannot be seen.
    api = FakeKubernetesApi(replicas=2, pods=[pod("sidekiq-default-a"), pod("sidekiq-default-b", ready=False)])

    result = backend(api).scale(DEPLOYMENT, 1, [process("sidekiq-default-a")])

    assert result.removals == []
    assert api.patches == []
    assert any("pod sidekiq-default-b has no Sidekiq process in Redis" in note for note in result.notes)


def test_scale_in_takes_removable_front_only() -> None:
    pods = [
        pod("pending", ready=False, phase="Pending"),
        pod("not-ready-busy", ready=False),
        pod("ready-idle-a"),
        pod("ready-idle-b"),
    ]
    processes = [process("not-ready-busy", busy=2), process("ready-idle-a"), process("ready-idle-b")]
    api = FakeKubernetesApi(replicas=4, pods=pods)

    result = backend(api).scale(DEPLOYMENT, 2, processes)

    assert result.removals == ["pending"]
    assert api.patches == [3]
    assert result.requested_after == 3
    assert api.cost("pending") == str(kubernetes.REMOVAL_COST)
    assert any("Holding 1 pod of the scale-in: pod not-ready-busy runs 2 jobs" in note for note in result.notes)


def test_plan_holds_every_busy_pod_ahead() -> None:
    pods = kubernetes.match_pods(
        [pod("a", ready=False), pod("b", ready=False), pod("c")],
        [process("a", busy=1), process("b", busy=3), process("c")],
    )

    plan = kubernetes.plan_scale_in(pods, 2)

    assert plan.removals == ()
    assert plan.held_count == 2
    assert [state.name for state in plan.blocking] == ["a", "b"]
    note = kubernetes.held_note(plan)
    assert note is not None
    assert "pod a runs 1 job and is not ready; pod b runs 3 jobs and is not ready" in note
    assert "would remove them before a ready idle or quiet pod" in note


def test_busy_pod_removed_when_no_idle_pod_stays() -> None:
    # With no ready idle or quiet pod left, holding gains nothing, because the policy's busy floor allowed it.
    pods = [pod("not-ready", ready=False), pod("ready-busy")]

    removed = plan_names(pods, [process("not-ready", busy=5), process("ready-busy", busy=3)], 1)

    assert removed == ["not-ready"]


def test_idle_unready_pod_removed_first() -> None:
    removed = plan_names(
        [pod("ready-idle"), pod("not-ready-idle", ready=False)], [process("ready-idle"), process("not-ready-idle")], 1
    )

    assert removed == ["not-ready-idle"]


def test_quiet_unready_pod_removed_first() -> None:
    # A quiet pod was chosen to leave already, and its running jobs get the stop budget on TERM.
    removed = plan_names(
        [pod("ready-idle"), pod("not-ready-quiet", ready=False)],
        [process("ready-idle"), process("not-ready-quiet", busy=2, quiet=True)],
        1,
    )

    assert removed == ["not-ready-quiet"]


def test_unscheduled_pod_is_removable() -> None:
    states = kubernetes.match_pods([pod("unscheduled", ready=False, phase="Pending", node=None)], [])

    assert kubernetes.is_removable(states[0])


# --- Quiet pods left behind by a failed scale patch -------------------------------------------------------------


def failing_api(error: Exception) -> FakeKubernetesApi:
    return FakeKubernetesApi(replicas=2, pods=[pod("sidekiq-default-a"), pod("sidekiq-default-b")], patch_error=error)


def test_failed_patch_then_next_run_removes_quiet_pod() -> None:
    api = failing_api(kubernetes.KubernetesApiError("The Kubernetes API server returned 500 for patch."))
    redis = FakeRedis()
    pool = KubernetesPool(api, "shop", "default")
    first_run = [process("sidekiq-default-a", busy=4), process("sidekiq-default-b")]

    with pytest.raises(kubernetes.KubernetesApiError) as raised:
        backend(api, redis).scale(DEPLOYMENT, 1, first_run)

    assert api.replicas == 2
    assert redis.signalled() == ["sidekiq-default-b:1:abc1-signals"]
    message = str(raised.value)
    assert message.startswith("The Kubernetes API server returned 500 for patch.")
    assert "sidekiq-default-b:1:abc1 were quieted (TSTP)" in message
    assert "the next autoscale run counts their pods out of the requested processes and removes them first" in message

    # By the next run Sidekiq has read the signal, and the API server accepts patches again.
    api.patch_error = None
    next_run = [process("sidekiq-default-a", busy=4), process("sidekiq-default-b", quiet=True)]
    reading = pool.read(next_run, redis, "", NOW)

    assert reading.requested == 1
    assert reading.details["replicas"] == 2
    assert reading.details["requested"] == 1
    assert reading.details["quiet_pods"] == ["sidekiq-default-b"]

    # The policy holds at the requested count; the scale still removes exactly the quiet pod.
    outcome = pool.scale(reading, reading.requested, next_run, redis, "", check_mode=False)

    assert api.patches == [1]
    assert outcome.reached == 1
    assert outcome.changed
    assert outcome.details["result"]["removals"] == ["sidekiq-default-b"]
    assert api.cost("sidekiq-default-b") == str(kubernetes.REMOVAL_COST)
    assert api.cost("sidekiq-default-a") == "4"


@pytest.mark.parametrize(
    "error",
    [
        kubernetes.KubernetesPermissionError("Not allowed to patch deployments/scale shop/sidekiq-default (403)."),
        kubernetes.KubernetesConflictError("Conflict (409) on patch deployments/scale shop/sidekiq-default."),
        kubernetes.KubernetesApiError("The Kubernetes API server returned 422 for patch."),
        kubernetes.KubernetesUnreachableError("Could not reach the Kubernetes API server: read timed out."),
    ],
    ids=["403", "409", "422", "timeout"],
)
def test_failed_patch_message_names_quieted(error: kubernetes.KubernetesError) -> None:
    api = failing_api(error)

    with pytest.raises(type(error)) as raised:
        backend(api).scale(DEPLOYMENT, 1, [process("sidekiq-default-a", busy=4), process("sidekiq-default-b")])

    message = str(raised.value)
    assert "sidekiq-default-b:1:abc1 were quieted (TSTP)" in message
    assert "removes them first" in message
    assert isinstance(raised.value.__cause__, kubernetes.KubernetesError)


def test_conflicts_on_every_attempt_name_quieted() -> None:
    api = failing_api(kubernetes.KubernetesConflictError("Conflict (409)."))

    with pytest.raises(kubernetes.KubernetesConflictError, match="on each of 3 attempts") as raised:
        backend(api).scale(DEPLOYMENT, 1, [process("sidekiq-default-a", busy=4), process("sidekiq-default-b")])

    assert "sidekiq-default-b:1:abc1 were quieted (TSTP)" in str(raised.value)


def test_failed_scale_out_message_unchanged() -> None:
    api = failing_api(kubernetes.KubernetesApiError("The Kubernetes API server returned 500 for patch."))

    with pytest.raises(kubernetes.KubernetesApiError) as raised:
        backend(api).scale(DEPLOYMENT, 3, [process("sidekiq-default-a"), process("sidekiq-default-b")])

    assert str(raised.value) == "The Kubernetes API server returned 500 for patch."


def test_quiet_pod_outside_requested_count() -> None:
    api = FakeKubernetesApi(replicas=3, pods=[pod("a"), pod("b"), pod("c")])
    processes = [process("a", busy=1), process("b", quiet=True), process("c", busy=2, quiet=True)]

    state = backend(api).read(DEPLOYMENT, processes)

    assert state.quiet_pods == ("b", "c")
    assert state.requested == 1
    assert state.to_dict()["requested"] == 1


def test_scale_in_removes_quiet_pods_first() -> None:
    api = FakeKubernetesApi(replicas=3, pods=[pod("a"), pod("b"), pod("c")])
    processes = [process("a"), process("b", busy=2, quiet=True), process("c")]

    result = backend(api).scale(DEPLOYMENT, 1, processes)

    assert result.removals[0] == "b"
    assert len(result.removals) == 2
    assert api.patches == [1]
    assert result.requested_after == 1


def test_scale_out_keeps_quiet_pod_counted() -> None:
    api = FakeKubernetesApi(replicas=2, pods=[pod("a"), pod("b")])
    processes = [process("a", busy=10), process("b", quiet=True)]

    result = backend(api).scale(DEPLOYMENT, 3, processes)

    assert api.patches == [4]
    assert result.requested_after == 3
    assert result.removals == []
    assert any("keeps the quiet pods ['b']" in note for note in result.notes)


def test_check_mode_plans_quiet_pod_removal() -> None:
    api = FakeKubernetesApi(replicas=2, pods=[pod("a"), pod("b")])
    redis = FakeRedis()
    pool = KubernetesPool(api, "shop", "default")
    processes = [process("a", busy=3), process("b", quiet=True)]
    reading = pool.read(processes, redis, "", NOW)

    outcome = pool.scale(reading, reading.requested, processes, redis, "", check_mode=True)

    assert outcome.changed
    assert outcome.reached == 1
    assert outcome.details["result"]["removals"] == ["b"]
    assert outcome.details["result"]["after"] == 1
    assert api.patches == []
    assert api.annotations == {}


def test_pool_without_quiet_pod_holds_without_calls() -> None:
    api = FakeKubernetesApi(replicas=2, pods=[pod("a"), pod("b")])
    pool = KubernetesPool(api, "shop", "default")
    processes = [process("a", busy=3), process("b")]
    reading = pool.read(processes, FakeRedis(), "", NOW)

    outcome = pool.scale(reading, 2, processes, FakeRedis(), "", check_mode=False)

    assert not outcome.changed
    assert outcome.reached == 2
    assert api.patches == []
    assert api.annotations == {}


# --- Rollouts ---------------------------------------------------------------------------------------------------


def rollout(**changes: Any) -> kubernetes.RolloutReading:
    steady = kubernetes.RolloutReading(
        generation=3,
        observed_generation=3,
        replicas=3,
        status_replicas=3,
        updated_replicas=3,
        unavailable_replicas=0,
        progressing_reason="NewReplicaSetAvailable",
    )
    return replace(steady, **changes)


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        (
            rollout(observed_generation=2),
            "its controller has not yet acted on generation 3 of the spec (observed generation 2)",
        ),
        (rollout(status_replicas=4, updated_replicas=1), "3 of its 4 pods run an older pod template"),
        (
            rollout(status_replicas=3, updated_replicas=2, paused=True),
            "1 of its 3 pods runs an older pod template, and the rollout is paused",
        ),
        (
            rollout(unavailable_replicas=2, progressing_reason="ReplicaSetUpdated"),
            "2 replicas are unavailable while the Progressing condition reports ReplicaSetUpdated",
        ),
    ],
    ids=["unobserved-generation", "old-template", "paused", "unavailable-during-update"],
)
def test_rollout_reason_names_cause(reading: kubernetes.RolloutReading, expected: str) -> None:
    assert kubernetes.rollout_reason(reading) == expected


@pytest.mark.parametrize(
    "reading",
    [
        rollout(),
        rollout(unavailable_replicas=1),
        rollout(unavailable_replicas=1, progressing_reason="ProgressDeadlineExceeded"),
        rollout(updated_replicas=2, status_replicas=2),
    ],
    ids=["steady", "unavailable-after-rollout", "deadline-exceeded", "pods-not-created"],
)
def test_rollout_reason_none_when_steady(reading: kubernetes.RolloutReading) -> None:
    assert kubernetes.rollout_reason(reading) is None


def test_rollout_holds_scale_in() -> None:
    api = FakeKubernetesApi(
        replicas=3,
        pods=[pod("a"), pod("b"), pod("c")],
        rollout=rollout(status_replicas=3, updated_replicas=1),
    )
    redis = FakeRedis()

    result = backend(api, redis).scale(DEPLOYMENT, 1, [process("a"), process("b"), process("c", busy=4)])

    assert api.patches == []
    assert api.annotations == {}
    assert redis.signalled() == []
    assert result.removals == []
    assert not result.changed
    assert result.after == 3
    assert any(
        "Holding the scale-in of deployment shop/sidekiq-default from 3 to 1 replicas: it is rolling out "
        "(2 of its 3 pods run an older pod template)" in note
        for note in result.notes
    ), result.notes


def test_rollout_holds_quiet_pod_removal() -> None:
    api = FakeKubernetesApi(replicas=2, pods=[pod("a"), pod("b")], rollout=rollout(observed_generation=2))
    pool = KubernetesPool(api, "shop", "default")
    processes = [process("a"), process("b", quiet=True)]
    reading = pool.read(processes, FakeRedis(), "", NOW)

    outcome = pool.scale(reading, reading.requested, processes, FakeRedis(), "", check_mode=False)

    assert reading.details["rolling_out"] is True
    assert api.patches == []
    assert not outcome.changed
    assert outcome.reached == 1
    assert any("rolling out" in note for note in outcome.notes)


def test_rollout_allows_scale_out() -> None:
    api = FakeKubernetesApi(
        replicas=2, pods=[pod("a"), pod("b")], rollout=rollout(status_replicas=2, updated_replicas=1)
    )

    result = backend(api).scale(DEPLOYMENT, 4, [process("a", busy=10), process("b", busy=10)])

    assert api.patches == [4]
    assert result.changed
    assert result.notes == []
