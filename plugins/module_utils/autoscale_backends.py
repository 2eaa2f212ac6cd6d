"""The backends that the autoscale module drives through an API: Kubernetes Deployments, EC2 Auto Scaling groups
and ECS services, behind one small interface per pool.

`open_backends` validates the backend's options for every selected pool and opens the API clients without
calling the API, so that invalid options fail the task before anything changes. Each `PoolBackend` then reads
the process count its platform is set to, and scales towards a target count (in check mode: plans only).

Errors that concern one pool (API errors, access denied, conflicts, a Redis error while quieting) are the
classes in BACKEND_ERRORS; the caller reports them for that pool and goes on with the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import RedisAccessError
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws import (
    AWS_ARGUMENT_SPEC,
    AWS_BACKENDS,
    AWS_TARGETS_ARGUMENT_SPEC,
    AwsBackend,
    AwsError,
    AwsOptionsError,
    ScalingReading,
    aws_settings,
    build_backend,
    parse_targets,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_ecs import DEFAULT_PROTECTION_MINUTES
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_kubernetes import (
    KUBERNETES_ARGUMENT_SPEC,
    ClientApi,
    DeploymentState,
    KubernetesApi,
    KubernetesBackend,
    KubernetesError,
    settings_from_params,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

SYSTEMD = "systemd"
KUBERNETES = "kubernetes"
API_BACKENDS = (KUBERNETES, *AWS_BACKENDS)
BACKENDS = (SYSTEMD, *API_BACKENDS)

# Errors of one pool's backend: the run reports them for that pool and scales the others.
BACKEND_ERRORS: tuple[type[Exception], ...] = (KubernetesError, AwsError, RedisAccessError)


class BackendOptionsError(ValueError):
    """The options of the chosen backend are missing or invalid; the message lists every problem."""


def backend_argument_spec() -> dict[str, dict[str, Any]]:
    """Return the options of the API backends, as kubernetes.core and amazon.aws name them.

    Both collections have ``validate_certs``. Only one backend runs per task, so the option is shared and
    applies to the API of the chosen backend. It has no default here: unset, the AWS backends verify
    certificates (amazon.aws's default), and the Kubernetes backend falls back to ``K8S_AUTH_VALIDATE_CERTS`` and
    then to the kubeconfig. ``verify_ssl`` is kubernetes.core's alias.
    """
    spec: dict[str, dict[str, Any]] = {}
    spec.update(KUBERNETES_ARGUMENT_SPEC)
    spec.update(AWS_ARGUMENT_SPEC)
    spec.update(AWS_TARGETS_ARGUMENT_SPEC)
    spec["validate_certs"] = {"type": "bool", "aliases": ["verify_ssl"]}
    spec["kubernetes_namespace"] = {"type": "str"}
    return spec


@dataclass
class BackendOutcome:
    """The changes a pool's backend made in one run (check mode: would make).

    Attributes:
        reached: the process count the backend is set to after the run.
        changed: whether the backend changed something (check mode: would change).
        actions: one sentence per change made, in order; empty in check mode.
        notes: sentences about anything that limited or delayed the change.
        details: the backend's own result or plan, for the module result.
    """

    reached: int
    changed: bool
    actions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendReading:
    """The process count a pool's backend is set to, and the backend's own reading for `PoolBackend.scale`."""

    requested: int
    details: dict[str, Any]
    handle: Any = None


class PoolBackend(Protocol):
    """One pool's Deployment, Auto Scaling group or ECS service."""

    resource: str

    def read(self, own: Sequence[ProcessState], redis_client: Any, namespace_prefix: str, now: float) -> BackendReading:
        """Read the process count the backend is set to. Raises one of BACKEND_ERRORS."""

    def scale(
        self,
        reading: BackendReading,
        target: int,
        own: Sequence[ProcessState],
        redis_client: Any,
        namespace_prefix: str,
        check_mode: bool,
    ) -> BackendOutcome:
        """Scale towards `target` processes; in check mode, plan only. Raises one of BACKEND_ERRORS."""


class KubernetesPool:
    """A pool's Deployment ``sidekiq-<pool>``, one Sidekiq process per pod.

    The requested process count is spec.replicas without the quiet pods, which the next scale removes first.
    """

    def __init__(self, api: KubernetesApi, namespace: str, pool: str) -> None:
        self.api = api
        self.namespace = namespace
        self.deployment = f"sidekiq-{pool}"
        self.resource = f"deployments/scale {namespace}/{self.deployment}"

    def _backend(self, redis_client: Any, namespace_prefix: str) -> KubernetesBackend:
        return KubernetesBackend(self.api, self.namespace, redis_client=redis_client, namespace_prefix=namespace_prefix)

    def read(self, own: Sequence[ProcessState], redis_client: Any, namespace_prefix: str, now: float) -> BackendReading:
        state = self._backend(redis_client, namespace_prefix).read(self.deployment, own)
        return BackendReading(requested=state.requested, details=state.to_dict(), handle=state)

    def scale(
        self,
        reading: BackendReading,
        target: int,
        own: Sequence[ProcessState],
        redis_client: Any,
        namespace_prefix: str,
        check_mode: bool,
    ) -> BackendOutcome:
        state: DeploymentState = reading.handle
        if target == reading.requested and not state.quiet_pods:
            return BackendOutcome(reached=reading.requested, changed=False, details={"reading": reading.details})
        # scale() reads the Deployment again and plans from that reading, so a change since `reading` is respected.
        result = self._backend(redis_client, namespace_prefix).scale(
            self.deployment, target, own, check_mode=check_mode
        )
        actions: list[str] = []
        if not check_mode:
            if result.deletion_costs:
                costs = ", ".join(f"{pod}={cost}" for pod, cost in result.deletion_costs.items())
                actions.append(f"Set the pod-deletion-cost of {costs}.")
            if result.quieted:
                actions.append(f"Sent TSTP to {', '.join(result.quieted)}.")
            if result.changed:
                actions.append(
                    f"Scaled {self.resource} from {result.before} to {result.after} replicas"
                    + (f" after {result.conflicts} conflicts." if result.conflicts else ".")
                )
        return BackendOutcome(
            reached=result.requested_after,
            changed=result.changed or bool(result.deletion_costs or result.quieted),
            actions=actions,
            notes=list(result.notes),
            details={"reading": reading.details, "result": result.to_dict()},
        )


class AwsPool:
    """A pool's Auto Scaling group or ECS service; see scaling_aws for the steps of a scale-in."""

    def __init__(self, scaler: AwsBackend, resource: str) -> None:
        self.scaler = scaler
        self.resource = resource

    def read(self, own: Sequence[ProcessState], redis_client: Any, namespace_prefix: str, now: float) -> BackendReading:
        reading = self.scaler.read(own, redis_client, namespace_prefix, now=now)
        return BackendReading(requested=reading.requested_processes, details=reading.to_dict(), handle=reading)

    def scale(
        self,
        reading: BackendReading,
        target: int,
        own: Sequence[ProcessState],
        redis_client: Any,
        namespace_prefix: str,
        check_mode: bool,
    ) -> BackendOutcome:
        # A plan is made even for an unchanged target, because members chosen to leave in earlier runs are
        # quieted again, unprotected and removed once they are drained.
        scaling_reading: ScalingReading = reading.handle
        plan = self.scaler.plan(scaling_reading, target)
        details = {"reading": reading.details, "plan": plan.to_dict()}
        if check_mode:
            return BackendOutcome(
                reached=plan.requested_after, changed=plan.changed, notes=list(plan.notes), details=details
            )
        result = self.scaler.apply(plan, redis_client, namespace_prefix)
        return BackendOutcome(
            reached=plan.requested_after,
            changed=result.changed,
            actions=list(result.actions),
            notes=list(plan.notes),
            details=details,
        )


def _aws_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Return the module options for aws_settings, with amazon.aws's default for an unset validate_certs."""
    values = dict(params)
    if values.get("validate_certs") is None:
        values["validate_certs"] = True
    return values


def open_backends(
    backend: str,
    params: Mapping[str, Any],
    pools: Sequence[Mapping[str, Any]],
    selected: Sequence[str],
    margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN,
) -> dict[str, PoolBackend]:
    """Validate the backend's options and open one PoolBackend per selected pool, without calling any API.

    Raises BackendOptionsError for missing or invalid options, with every problem and its fix, and
    KubernetesError or AwsError when a client cannot be set up (a kubeconfig that does not load, a missing
    Python package, an unknown AWS profile).
    """
    if backend == KUBERNETES:
        return _open_kubernetes(params, selected)
    if backend in AWS_BACKENDS:
        return _open_aws(backend, params, pools, selected, margin)
    raise BackendOptionsError(f"backend {backend!r} is not driven through an API; use one of {list(API_BACKENDS)}.")


def _open_kubernetes(params: Mapping[str, Any], selected: Sequence[str]) -> dict[str, PoolBackend]:
    namespace = params.get("kubernetes_namespace")
    if not isinstance(namespace, str) or not namespace:
        raise BackendOptionsError(
            "kubernetes_namespace is missing; give the namespace of the pools' Deployments, as "
            "sidekiq_kubernetes_namespace sets it."
        )
    settings = settings_from_params(params)
    api = ClientApi.from_settings(settings)
    return {name: KubernetesPool(api, namespace, name) for name in selected}


def _open_aws(
    backend: str,
    params: Mapping[str, Any],
    pools: Sequence[Mapping[str, Any]],
    selected: Sequence[str],
    margin: int,
) -> dict[str, PoolBackend]:
    targets = params.get("aws_targets") or {}
    if not isinstance(targets, Mapping):
        raise BackendOptionsError(
            f"aws_targets must be a mapping of pool name to settings, got {type(targets).__name__}."
        )
    names = [str(pool["name"]) for pool in pools]
    unknown = sorted(str(name) for name in targets if name not in names)
    if unknown:
        raise BackendOptionsError(f"aws_targets names unknown pools {unknown}; use names from pools: {sorted(names)}.")
    try:
        settings = aws_settings(_aws_params(params))
        # Only the selected pools need a target, so an ECS pool left out by pools_filter needs no cluster.
        parsed = parse_targets(backend, {name: value for name, value in targets.items() if name in selected}, selected)
    except AwsError as error:
        raise BackendOptionsError(str(error)) from error
    protection_minutes = params.get("aws_task_protection_minutes")
    if protection_minutes is None:
        protection_minutes = DEFAULT_PROTECTION_MINUTES
    by_name = {str(pool["name"]): pool for pool in pools}
    opened: dict[str, PoolBackend] = {}
    for name in selected:
        try:
            scaler = build_backend(
                backend, settings, by_name[name], parsed[name], margin=margin, protection_minutes=protection_minutes
            )
        except AwsOptionsError as error:
            raise BackendOptionsError(str(error)) from error
        opened[name] = AwsPool(scaler, scaler.resource)
    return opened
