"""The Kubernetes backend of the autoscaler: read a pool's Deployment and pods, and scale it, quieting pods first.

A pool runs as the Deployment ``sidekiq-<pool>``. Sidekiq names each process ``<hostname>:<pid>:<nonce>`` and the
hostname inside a pod is the pod's name, so a pod is matched to its Sidekiq processes by that name.

The process count the Deployment is set to (``requested``) is ``spec.replicas`` minus its quiet pods: pods whose
every Sidekiq process is quiet fetch no jobs, yet count as replicas until a scale-in removes them.

Scaling towards N processes:

- scale-out patches ``spec.replicas`` of the Deployment's scale subresource; quiet pods stay in the count;
- otherwise the target is N replicas, so that the quiet pods go first, even when N equals ``requested``. A scale-in
  first chooses the pods to remove in the order the ReplicaSet controller removes them (unscheduled, pending, not
  ready, then lowest ``controller.kubernetes.io/pod-deletion-cost``), preferring quiet and idle pods among equals.
  It never removes a busy pod, or a running pod whose process is not in Redis, while a ready idle or quiet pod
  stays: it removes only the removable pods at the front of that order and reports the rest as held. It writes a
  low deletion cost on the chosen pods and a cost equal to their busy threads on the others. Then it quiets the
  chosen pods' Sidekiq processes through Redis (``LPUSH <identity>-signals TSTP``, which Sidekiq reads within one
  heartbeat), and only then patches the scale subresource. When that patch fails, the quieted pods count out of
  ``requested`` in the next run, which removes them first;
- while the Deployment rolls out, a scale-in is held, because the controller then spreads it over the old and the
  new ReplicaSet without regard to deletion costs. A scale-out still proceeds.

The scale patch carries the resourceVersion that was read, so a concurrent change gives 409 Conflict. The backend
then reads again and plans again, up to ``max_attempts`` times. Other API errors raise a ``KubernetesError``
subclass whose message names the object, the HTTP status, the API server's message and the next step.

The API calls need, in the pool's namespace: ``get`` on ``deployments`` (rollout status) and on
``deployments/scale`` (read), ``patch`` on ``deployments/scale`` (scale), ``list`` on ``pods`` (read) and ``patch``
on ``pods`` (deletion cost).

Connection options have the names and environment variables of kubernetes.core (``kubeconfig``, ``context``,
``host``, ``api_key``, ...; ``K8S_AUTH_*``). The ``kubernetes`` Python client is imported only when a client is
built, so the pure parts of this module work without it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    RedisAccessError,
    translate_redis_error,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Cost written on the pods a scale-in removes. Kept pods get their busy thread count (0 or more), so the chosen
# pods are always the cheapest.
REMOVAL_COST = -1000
# Cost written on a kept pod whose Sidekiq process is not in Redis: its jobs cannot be seen, so it is kept longest.
UNKNOWN_BUSY_COST = 1_000_000
DEFAULT_FIELD_MANAGER = "sidekiq-ops"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_REQUEST_TIMEOUT = 10.0
# Sidekiq's own API expires a signal list after 60 s, so a signal for a process that is gone does not linger.
SIGNAL_TTL_SECONDS = 60
# Phase order of the ReplicaSet controller when it removes pods: earlier phases go first.
PHASE_RANK = {"Pending": 0, "Unknown": 1, "Running": 2}
# Reason of a Deployment's Progressing condition while its controller brings up pods of the new ReplicaSet.
PROGRESSING_REASON = "ReplicaSetUpdated"

# Options as kubernetes.core names them, with their K8S_AUTH_* environment variables, for a module to merge into its
# argument spec. `no_log` keeps credentials out of logs and results. kubernetes.core's username and password are
# left out, because Kubernetes 1.19 removed basic authentication from the API server.
KUBERNETES_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "kubeconfig": {"type": "raw", "no_log": True},
    "context": {"type": "str"},
    "host": {"type": "str"},
    "api_key": {"type": "str", "no_log": True},
    "validate_certs": {"type": "bool", "aliases": ["verify_ssl"]},
    "ca_cert": {"type": "path", "aliases": ["ssl_ca_cert"]},
    "client_cert": {"type": "path", "aliases": ["cert_file"]},
    "client_key": {"type": "path", "aliases": ["key_file"]},
    "proxy": {"type": "str"},
    "no_proxy": {"type": "str"},
    "request_timeout": {"type": "float", "default": DEFAULT_REQUEST_TIMEOUT},
}
BOOLEAN_OPTIONS = frozenset({"validate_certs"})


class KubernetesError(Exception):
    """Base class: the Kubernetes API could not be reached or refused a request."""


class KubernetesOptionsError(KubernetesError):
    """The connection options are missing, contradict each other, or name a kubeconfig that cannot be loaded."""


class KubernetesDependencyError(KubernetesError):
    """The kubernetes Python package is not installed where the code runs."""


class KubernetesUnreachableError(KubernetesError):
    """No HTTP connection could be made to the API server, or it timed out."""


class KubernetesAuthError(KubernetesError):
    """The API server rejected the credentials (401)."""


class KubernetesPermissionError(KubernetesError):
    """The user or ServiceAccount may not make the request (403)."""


class KubernetesNotFoundError(KubernetesError):
    """The Deployment or namespace does not exist (404)."""


class KubernetesConflictError(KubernetesError):
    """The object kept changing between read and write (409) after every attempt."""


class KubernetesApiError(KubernetesError):
    """Any other error status from the API server, such as 422 or 500."""


class QuietError(KubernetesError):
    """Redis refused the quiet signal for a pod's Sidekiq process; nothing was scaled."""


# --- Connection -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubernetesSettings:
    """Connection settings resolved from module options and K8S_AUTH_* environment variables."""

    kubeconfig: str | dict[str, Any] | None = field(default=None, repr=False)
    context: str | None = None
    host: str | None = None
    api_key: str | None = field(default=None, repr=False)
    validate_certs: bool | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None
    no_proxy: str | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT

    @property
    def has_direct_credentials(self) -> bool:
        """Whether host plus a token or a client certificate are enough to connect without a kubeconfig."""
        return bool(self.host and (self.api_key or (self.client_cert and self.client_key)))


def settings_from_params(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> KubernetesSettings:
    """Resolve the options of KUBERNETES_ARGUMENT_SPEC; an option left unset falls back to K8S_AUTH_<OPTION>.

    Raises KubernetesOptionsError for a request_timeout that is not above 0.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in KUBERNETES_ARGUMENT_SPEC:
        value = params.get(name)
        if value is None and name != "request_timeout":
            raw = env.get(f"K8S_AUTH_{name.upper()}")
            if raw is not None and name in BOOLEAN_OPTIONS:
                value = raw.strip().lower() not in ("0", "false", "no", "off")
            else:
                value = raw
        if value is not None:
            values[name] = value
    timeout = float(values.get("request_timeout", DEFAULT_REQUEST_TIMEOUT))
    if timeout <= 0:
        raise KubernetesOptionsError(f"request_timeout must be a number of seconds above 0, got {timeout}.")
    values["request_timeout"] = timeout
    if isinstance(values.get("host"), str):
        values["host"] = values["host"].rstrip("/")
    return KubernetesSettings(**values)


def build_configuration(settings: KubernetesSettings) -> Any:
    """Build a kubernetes.client.Configuration the way kubernetes.core does.

    Order: host with direct credentials; else the given kubeconfig and context; else the in-cluster ServiceAccount
    (inside a pod); else the default kubeconfig (~/.kube/config or KUBECONFIG). Explicit options then override
    what was loaded. Retries are off, so a failure surfaces at once and the next scheduled run tries again.
    """
    client, config = _import_kubernetes()
    configuration = client.Configuration()
    if not settings.has_direct_credentials:
        if settings.kubeconfig or settings.context:
            _load_kubeconfig(config, settings, configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                _load_kubeconfig(config, settings, configuration)
    if settings.host:
        configuration.host = settings.host
    if settings.api_key:
        # The client sends api_key["BearerToken"] as the Authorization header, as its kubeconfig loader sets it.
        configuration.api_key = {"BearerToken": f"Bearer {settings.api_key}"}
    if settings.validate_certs is not None:
        configuration.verify_ssl = settings.validate_certs
    if settings.ca_cert:
        configuration.ssl_ca_cert = settings.ca_cert
    if settings.client_cert:
        configuration.cert_file = settings.client_cert
    if settings.client_key:
        configuration.key_file = settings.client_key
    if settings.proxy:
        configuration.proxy = settings.proxy
    if settings.no_proxy:
        configuration.no_proxy = settings.no_proxy
    configuration.retries = 0
    return configuration


def _import_kubernetes() -> tuple[Any, Any]:
    try:
        from kubernetes import client, config
    except ImportError as error:
        raise KubernetesDependencyError(
            "The Python package 'kubernetes' is not installed for the Python interpreter that runs this module: "
            "install it there (pip install kubernetes), or point ansible_python_interpreter at a Python that has it."
        ) from error
    return client, config


def _load_kubeconfig(config: Any, settings: KubernetesSettings, configuration: Any) -> None:
    where = "the kubeconfig option" if settings.kubeconfig else "the default kubeconfig (KUBECONFIG or ~/.kube/config)"
    try:
        if isinstance(settings.kubeconfig, dict):
            config.load_kube_config_from_dict(
                config_dict=settings.kubeconfig, context=settings.context, client_configuration=configuration
            )
        else:
            config.load_kube_config(
                config_file=settings.kubeconfig, context=settings.context, client_configuration=configuration
            )
    except (config.ConfigException, OSError, ValueError, TypeError) as error:
        context = f" with context {settings.context!r}" if settings.context else ""
        raise KubernetesOptionsError(
            f"Could not load {where}{context}: {error}. Outside a pod, set kubeconfig (and context) or host with "
            "api_key; inside a pod, mount a ServiceAccount token."
        ) from error


# --- API access -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleReading:
    """The scale subresource of a Deployment."""

    replicas: int
    status_replicas: int
    selector: str
    resource_version: str


@dataclass(frozen=True)
class RolloutReading:
    """The fields of a Deployment that tell whether a rollout is in progress.

    Attributes:
        generation: metadata.generation, raised by every change of the spec (a replicas change included).
        observed_generation: status.observedGeneration, the generation the Deployment controller has acted on.
        replicas: spec.replicas.
        status_replicas: status.replicas, the pods of all its ReplicaSets that are not terminating.
        updated_replicas: status.updatedReplicas, those of them that run the current pod template.
        unavailable_replicas: status.unavailableReplicas.
        progressing_reason: reason of the Progressing condition, such as "ReplicaSetUpdated" while the controller
            brings up pods of the new ReplicaSet and "NewReplicaSetAvailable" once they are available.
        paused: spec.paused.
    """

    generation: int
    observed_generation: int
    replicas: int
    status_replicas: int
    updated_replicas: int
    unavailable_replicas: int
    progressing_reason: str | None
    paused: bool = False


@dataclass(frozen=True)
class PodReading:
    """The fields of one pod that the removal order needs."""

    name: str
    node_name: str | None
    phase: str
    ready: bool
    terminating: bool
    deletion_cost: int | None
    created: datetime | None


class KubernetesApi(Protocol):
    """The five API calls of this backend; `ClientApi` implements them with the official client."""

    def read_scale(self, namespace: str, name: str) -> ScaleReading: ...

    def read_rollout(self, namespace: str, name: str) -> RolloutReading: ...

    def patch_scale(self, namespace: str, name: str, replicas: int, resource_version: str) -> ScaleReading: ...

    def list_pods(self, namespace: str, selector: str) -> list[PodReading]: ...

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None: ...


class ClientApi:
    """KubernetesApi over kubernetes.client, translating its exceptions into KubernetesError subclasses."""

    def __init__(self, api_client: Any, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        client, _config = _import_kubernetes()
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._timeout = request_timeout

    @classmethod
    def from_settings(cls, settings: KubernetesSettings) -> ClientApi:
        client, _config = _import_kubernetes()
        return cls(client.ApiClient(build_configuration(settings)), settings.request_timeout)

    def read_scale(self, namespace: str, name: str) -> ScaleReading:
        scale = self._call(
            "read", f"deployments/scale {namespace}/{name}",
            lambda: self._apps.read_namespaced_deployment_scale(name, namespace, _request_timeout=self._timeout),
        )  # fmt: skip
        return _scale_reading(scale)

    def read_rollout(self, namespace: str, name: str) -> RolloutReading:
        deployment = self._call(
            "read", f"deployment {namespace}/{name}",
            lambda: self._apps.read_namespaced_deployment(name, namespace, _request_timeout=self._timeout),
        )  # fmt: skip
        return _rollout_reading(deployment)

    def patch_scale(self, namespace: str, name: str, replicas: int, resource_version: str) -> ScaleReading:
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
        scale = self._call(
            "patch", f"deployments/scale {namespace}/{name}",
            lambda: self._apps.patch_namespaced_deployment_scale(
                name, namespace, body, field_manager=DEFAULT_FIELD_MANAGER,
                _content_type="application/merge-patch+json", _request_timeout=self._timeout,
            ),
        )  # fmt: skip
        return _scale_reading(scale)

    def list_pods(self, namespace: str, selector: str) -> list[PodReading]:
        pods = self._call(
            "list", f"pods in namespace {namespace}",
            lambda: self._core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=self._timeout),
        )  # fmt: skip
        return [_pod_reading(pod) for pod in pods.items or []]

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        body = {"metadata": {"annotations": dict(annotations)}}
        self._call(
            "patch", f"pod {namespace}/{name}",
            lambda: self._core.patch_namespaced_pod(
                name, namespace, body, field_manager=DEFAULT_FIELD_MANAGER,
                _content_type="application/merge-patch+json", _request_timeout=self._timeout,
            ),
        )  # fmt: skip

    def _call(self, verb: str, target: str, request: Callable[[], Any]) -> Any:
        client, _config = _import_kubernetes()
        try:
            return request()
        except client.exceptions.ApiException as error:
            raise translate_api_error(verb, target, int(error.status or 0), str(error.body or error.reason)) from error
        except Exception as error:
            # urllib3 raises its own classes (MaxRetryError, timeouts, SSLError) for transport failures.
            if type(error).__module__.startswith("urllib3"):
                raise KubernetesUnreachableError(
                    f"Could not reach the Kubernetes API server to {verb} {target}: {error}. Check host or the "
                    "kubeconfig's server, the network path and the CA (ca_cert, validate_certs)."
                ) from error
            raise


def _scale_reading(scale: Any) -> ScaleReading:
    return ScaleReading(
        replicas=int(scale.spec.replicas or 0) if scale.spec else 0,
        status_replicas=int(scale.status.replicas or 0) if scale.status else 0,
        selector=str(scale.status.selector or "") if scale.status else "",
        resource_version=str(scale.metadata.resource_version or ""),
    )


def _rollout_reading(deployment: Any) -> RolloutReading:
    metadata = deployment.metadata
    spec = deployment.spec
    status = deployment.status
    conditions = (status.conditions or []) if status else []
    progressing = next((condition for condition in conditions if condition.type == "Progressing"), None)
    return RolloutReading(
        generation=int(metadata.generation or 0),
        observed_generation=int(status.observed_generation or 0) if status else 0,
        replicas=int(spec.replicas or 0) if spec else 0,
        status_replicas=int(status.replicas or 0) if status else 0,
        updated_replicas=int(status.updated_replicas or 0) if status else 0,
        unavailable_replicas=int(status.unavailable_replicas or 0) if status else 0,
        progressing_reason=progressing.reason if progressing else None,
        paused=bool(spec.paused) if spec else False,
    )


def _pod_reading(pod: Any) -> PodReading:
    metadata = pod.metadata
    status = pod.status
    ready = any(
        condition.type == "Ready" and condition.status == "True" for condition in (status.conditions or [])
    ) if status else False  # fmt: skip
    return PodReading(
        name=str(metadata.name),
        node_name=pod.spec.node_name if pod.spec else None,
        phase=str(status.phase or "Unknown") if status else "Unknown",
        ready=ready,
        terminating=metadata.deletion_timestamp is not None,
        deletion_cost=parse_deletion_cost((metadata.annotations or {}).get(DELETION_COST_ANNOTATION)),
        created=metadata.creation_timestamp,
    )


def parse_deletion_cost(value: str | None) -> int | None:
    """Parse the deletion-cost annotation; None when absent or not an integer (the API server rejects those)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def translate_api_error(verb: str, target: str, status: int, body: str) -> KubernetesError:
    """Turn an HTTP error status from the API server into a KubernetesError with the server's message."""
    detail = _status_message(body)
    if status == 401:
        return KubernetesAuthError(
            f"The Kubernetes API server rejected the credentials (401) for {verb} {target}: {detail} Check the "
            "token (api_key), the client certificate or the kubeconfig user."
        )
    if status == 403:
        return KubernetesPermissionError(
            f"Not allowed to {verb} {target} (403): {detail} Grant the ServiceAccount or user a Role with get on "
            "deployments, get and patch on deployments/scale, and get, list and patch on pods in that namespace."
        )
    if status == 404:
        return KubernetesNotFoundError(
            f"{target} not found (404): {detail} Check the namespace and that the pool's Deployment was applied "
            "(playbooks/kubernetes.yml)."
        )
    if status == 409:
        return KubernetesConflictError(f"Conflict (409) on {verb} {target}: {detail}")
    return KubernetesApiError(f"The Kubernetes API server returned {status} for {verb} {target}: {detail}")


def _status_message(body: str) -> str:
    """Return the message of a Status object, or the start of a body that is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    found = isinstance(data, dict) and data.get("message")
    message = str(data["message"]) if found else " ".join(body.split())[:300]
    return message if message.endswith(".") else message + "."


# --- Planning (pure) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodState:
    """A pod of the pool with the Sidekiq processes whose hostname is the pod's name."""

    name: str
    node_name: str | None
    phase: str
    ready: bool
    deletion_cost: int | None
    created: datetime | None
    identities: tuple[str, ...] = ()
    busy: int | None = None
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node": self.node_name,
            "phase": self.phase,
            "ready": self.ready,
            "deletion_cost": self.deletion_cost,
            "identities": list(self.identities),
            "busy": self.busy,
            "quiet": self.quiet,
        }


@dataclass(frozen=True)
class DeploymentState:
    """A pool's Deployment as read: the scale subresource, its rollout status and the pods that count as replicas.

    Attributes:
        rollout_reason: why the Deployment is rolling out, or None when it is not (see `rollout_reason`).
    """

    namespace: str
    deployment: str
    replicas: int
    status_replicas: int
    selector: str
    resource_version: str
    pods: tuple[PodState, ...]
    rollout_reason: str | None = None

    @property
    def quiet_pods(self) -> tuple[str, ...]:
        """Pods whose every Sidekiq process is quiet: they fetch no jobs, yet count as replicas."""
        return tuple(pod.name for pod in self.pods if pod.quiet)

    @property
    def requested(self) -> int:
        """The process count the Deployment is set to: spec.replicas without its quiet pods."""
        return max(self.replicas - len(self.quiet_pods), 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "deployment": self.deployment,
            "replicas": self.replicas,
            "status_replicas": self.status_replicas,
            "requested": self.requested,
            "selector": self.selector,
            "rolling_out": self.rollout_reason is not None,
            "rollout_reason": self.rollout_reason,
            "pods": [pod.to_dict() for pod in self.pods],
            "quiet_pods": list(self.quiet_pods),
        }


@dataclass(frozen=True)
class ScaleInPlan:
    """The pods a scale-in removes, the deletion cost every pod should carry, and the removals it holds back.

    Attributes:
        held_count: how many of the requested removals the plan holds back.
        blocking: the pods that made it hold back: busy (or not matched to a process) and ahead of a ready idle or
            quiet pod in the ReplicaSet controller's order.
    """

    removals: tuple[PodState, ...]
    costs: dict[str, int]
    held_count: int = 0
    blocking: tuple[PodState, ...] = ()


def rollout_reason(rollout: RolloutReading) -> str | None:
    """Return why the Deployment is rolling out, or None when it is not.

    It is rolling out while its controller has not acted on the latest spec, and while some of its pods run an
    older pod template (a rollout in progress or paused). It is also rolling out while replicas are unavailable
    and the Progressing condition reports ReplicaSetUpdated.
    NOTE: the Deployment controller may also report ReplicaSetUpdated while the pods of a plain scale-out become
    available, so a scale-in right after a scale-out waits for them as well.
    """
    if rollout.observed_generation < rollout.generation:
        return (
            f"its controller has not yet acted on generation {rollout.generation} of the spec (observed generation "
            f"{rollout.observed_generation})"
        )
    old = rollout.status_replicas - rollout.updated_replicas
    if old > 0:
        paused = ", and the rollout is paused" if rollout.paused else ""
        verb = "runs" if old == 1 else "run"
        return f"{old} of its {rollout.status_replicas} pods {verb} an older pod template{paused}"
    if rollout.unavailable_replicas > 0 and rollout.progressing_reason == PROGRESSING_REASON:
        replicas = (
            "1 replica is" if rollout.unavailable_replicas == 1 else f"{rollout.unavailable_replicas} replicas are"
        )
        return f"{replicas} unavailable while the Progressing condition reports {PROGRESSING_REASON}"
    return None


def match_pods(pods: Iterable[PodReading], processes: Iterable[ProcessState]) -> tuple[PodState, ...]:
    """Join the pods that count as replicas with the live Sidekiq processes whose hostname is the pod's name.

    Terminating pods and pods that ended (Succeeded, Failed) are left out, as the ReplicaSet controller leaves them
    out of its count. A pod with several live processes (a restarted container) sums their busy threads, and it is
    quiet only when all of them are.
    """
    by_host: dict[str, list[ProcessState]] = {}
    for process in processes:
        if process.live and process.hostname:
            by_host.setdefault(process.hostname, []).append(process)
    states: list[PodState] = []
    for pod in pods:
        if pod.terminating or pod.phase in ("Succeeded", "Failed"):
            continue
        found = by_host.get(pod.name, [])
        states.append(
            PodState(
                name=pod.name,
                node_name=pod.node_name,
                phase=pod.phase,
                ready=pod.ready,
                deletion_cost=pod.deletion_cost,
                created=pod.created,
                identities=tuple(sorted(process.identity for process in found)),
                busy=sum(process.busy for process in found) if found else None,
                quiet=bool(found) and all(process.quiet for process in found),
            )
        )
    return tuple(states)


def removal_key(pod: PodState) -> tuple[Any, ...]:
    """Sort key of a pod for removal, earliest first.

    The first three parts follow the ReplicaSet controller, which removes unscheduled pods, then pods by phase
    (Pending, Unknown, Running), then pods that are not ready, before it looks at deletion costs. Among equals: quiet
    pods first, then the fewest busy threads (a pod without a Sidekiq process in Redis counts as the busiest,
    because its jobs cannot be seen), then the newest pod, then the name for a stable order.
    """
    busy = math.inf if pod.busy is None else pod.busy
    created = -pod.created.timestamp() if pod.created else 0.0
    return (
        bool(pod.node_name),
        PHASE_RANK.get(pod.phase, 1),
        pod.ready,
        not pod.quiet,
        busy,
        created,
        pod.name,
    )


def is_removable(pod: PodState) -> bool:
    """Return whether a scale-in may remove the pod while a ready idle pod stays.

    True when its Sidekiq processes are quiet (chosen to leave already) or idle, and when the pod has not started
    (unscheduled or Pending) and no process of it is in Redis. A busy pod, or a started pod whose process is not in
    Redis and whose jobs therefore cannot be seen, is not removable.
    """
    if pod.quiet or pod.busy == 0:
        return True
    return pod.busy is None and (not pod.node_name or pod.phase == "Pending")


def _is_spare(pod: PodState) -> bool:
    return pod.ready and (pod.quiet or pod.busy == 0)


def plan_scale_in(pods: Sequence[PodState], count: int) -> ScaleInPlan:
    """Choose up to `count` pods to remove and the deletion cost of every pod.

    The ReplicaSet controller removes pods in `removal_key` order, and deletion costs reorder only pods of equal
    rank. When a pod that is not removable (see `is_removable`) would go while a ready idle or quiet pod stays, the
    plan removes only the removable pods at the front of that order and keeps the rest.

    The removed pods get REMOVAL_COST. Kept pods get their busy thread count, or UNKNOWN_BUSY_COST when their
    process is not in Redis, so a later scale-in by anyone else also removes idle pods first.
    """
    ordered = sorted(pods, key=removal_key)
    requested = max(0, min(count, len(ordered)))
    front = 0
    while front < requested and is_removable(ordered[front]):
        front += 1
    planned = requested
    blocking: tuple[PodState, ...] = ()
    if front < requested and any(_is_spare(pod) for pod in ordered[requested:]):
        planned = front
        blocking = tuple(pod for pod in ordered[front:requested] if not is_removable(pod))
    removals = tuple(ordered[:planned])
    removed = {pod.name for pod in removals}
    costs: dict[str, int] = {}
    for pod in pods:
        if pod.name in removed:
            costs[pod.name] = REMOVAL_COST
        else:
            costs[pod.name] = UNKNOWN_BUSY_COST if pod.busy is None else pod.busy
    return ScaleInPlan(removals=removals, costs=costs, held_count=requested - planned, blocking=blocking)


def held_note(plan: ScaleInPlan) -> str | None:
    """Return the note that explains the removals a plan defers, or None when it defers none."""
    if not plan.held_count:
        return None
    reasons = "; ".join(_describe_blocking(pod) for pod in plan.blocking)
    pronoun = "it" if len(plan.blocking) == 1 else "them"
    pods = "pod" if plan.held_count == 1 else "pods"
    return (
        f"Holding {plan.held_count} {pods} of the scale-in: {reasons}, so the ReplicaSet controller would remove "
        f"{pronoun} before a ready idle or quiet pod. The scale-in goes on once {pronoun} turn ready, idle or gone."
    )


def _describe_blocking(pod: PodState) -> str:
    if pod.busy is None:
        work = "has no Sidekiq process in Redis, so its jobs cannot be seen,"
    else:
        work = f"runs {pod.busy} job" + ("" if pod.busy == 1 else "s")
    if not pod.ready:
        rank = "is not ready"
    elif pod.phase != "Running":
        rank = f"is in phase {pod.phase}"
    else:
        rank = "comes first in the controller's order"
    return f"pod {pod.name} {work} and {rank}"


# --- Scaling ----------------------------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    """Outcome of a scale call, or the planned outcome in check mode.

    Attributes:
        before: spec.replicas when the last attempt read the Deployment.
        after: the replicas the Deployment has now (check mode: would have).
        requested_after: the process count the Deployment is set to now (check mode: would be): `after` without
            the quiet pods that stay.
        removals: the pods chosen for removal, in removal order (scale-in only).
        deletion_costs: the annotations written (check mode: to write), by pod name; pods already carrying the
            right cost are left out.
        quieted: the Sidekiq identities sent TSTP (check mode: to send).
        conflicts: the 409 responses that made the backend read and plan again.
    """

    namespace: str
    deployment: str
    before: int
    after: int
    requested_after: int = 0
    check_mode: bool = False
    changed: bool = False
    removals: list[str] = field(default_factory=list)
    deletion_costs: dict[str, int] = field(default_factory=dict)
    quieted: list[str] = field(default_factory=list)
    conflicts: int = 0
    notes: list[str] = field(default_factory=list)

    def add_note(self, note: str) -> None:
        """Append a note unless an earlier attempt added the same one."""
        if note not in self.notes:
            self.notes.append(note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "deployment": self.deployment,
            "before": self.before,
            "after": self.after,
            "requested_after": self.requested_after,
            "check_mode": self.check_mode,
            "changed": self.changed,
            "removals": list(self.removals),
            "deletion_costs": dict(self.deletion_costs),
            "quieted": list(self.quieted),
            "conflicts": self.conflicts,
            "notes": list(self.notes),
        }


class KubernetesBackend:
    """Read and scale the Deployments of one namespace.

    `redis_client` (redis-py) sends the quiet signals; it may be None only when no scale-in reaches a pod with a
    Sidekiq process. `namespace_prefix` is the redis-namespace prefix of Sidekiq's keys ("" without one).
    """

    def __init__(
        self,
        api: KubernetesApi,
        namespace: str,
        *,
        redis_client: Any = None,
        namespace_prefix: str = "",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be 1 or more, got {max_attempts}.")
        self.api = api
        self.namespace = namespace
        self.redis_client = redis_client
        self.namespace_prefix = namespace_prefix
        self.max_attempts = max_attempts

    def read(self, deployment: str, processes: Iterable[ProcessState]) -> DeploymentState:
        """Read the Deployment's scale subresource, rollout status and pods, joined with the Sidekiq processes."""
        scale = self.api.read_scale(self.namespace, deployment)
        if not scale.selector:
            raise KubernetesApiError(
                f"deployments/scale {self.namespace}/{deployment} has no status.selector, so its pods cannot be "
                "found; check that the Deployment has a selector and that its controller has observed it."
            )
        rollout = self.api.read_rollout(self.namespace, deployment)
        pods = self.api.list_pods(self.namespace, scale.selector)
        return DeploymentState(
            namespace=self.namespace,
            deployment=deployment,
            replicas=scale.replicas,
            status_replicas=scale.status_replicas,
            selector=scale.selector,
            resource_version=scale.resource_version,
            pods=match_pods(pods, processes),
            rollout_reason=rollout_reason(rollout),
        )

    def scale(
        self, deployment: str, target: int, processes: Iterable[ProcessState], *, check_mode: bool = False
    ) -> ScaleResult:
        """Scale the Deployment towards `target` pods that are not quiet, removing quiet pods first.

        A scale-out sets spec.replicas to `target` plus the quiet pods, which stay. Otherwise spec.replicas goes
        to `target`, so the quiet pods go first, even when `target` equals the reading's `requested`. A scale-in
        sets deletion costs and quiets the removed pods before it patches the replicas, holds back the pods that
        `plan_scale_in` may not remove, and waits while the Deployment rolls out.

        Raises ValueError for a negative count, KubernetesConflictError when every attempt met a 409, QuietError
        when Redis refused a quiet signal (the scale patch is then not sent), and another KubernetesError
        subclass for any other API failure. When processes were quieted before the error, its message names them.
        """
        if target < 0:
            raise ValueError(f"target must be 0 or more, got {target}.")
        result = ScaleResult(self.namespace, deployment, before=0, after=0, check_mode=check_mode)
        try:
            return self._scale(deployment, target, list(processes), result, check_mode)
        except KubernetesError as error:
            if check_mode or not result.quieted:
                raise
            raise type(error)(
                f"{error} The Sidekiq processes {', '.join(result.quieted)} were quieted (TSTP) before this error "
                "and take no new jobs: the next autoscale run counts their pods out of the requested processes and "
                "removes them first."
            ) from error

    def _scale(
        self, deployment: str, target: int, known: list[ProcessState], result: ScaleResult, check_mode: bool
    ) -> ScaleResult:
        signalled: set[str] = set()
        for _attempt in range(self.max_attempts):
            state = self.read(deployment, known)
            # After a conflict the processes read before are stale: pods quieted by an earlier attempt count as
            # quiet, so the new plan removes them first and no quieted pod is left running.
            pods = [
                replace(pod, quiet=True) if pod.identities and signalled.issuperset(pod.identities) else pod
                for pod in state.pods
            ]
            quiet = [pod.name for pod in pods if pod.quiet]
            requested = max(state.replicas - len(quiet), 0)
            replicas = target if target <= requested else target + len(quiet)
            result.before = result.after = state.replicas
            result.requested_after = requested
            if replicas == state.replicas:
                return result
            if replicas < state.replicas:
                if state.rollout_reason is not None:
                    result.add_note(
                        f"Holding the scale-in of deployment {self.namespace}/{deployment} from {state.replicas} to "
                        f"{replicas} replicas: it is rolling out ({state.rollout_reason}), and during a rollout the "
                        "controller spreads a scale-in over the old and new ReplicaSets without regard to "
                        "pod-deletion-cost. A run after the rollout scales in."
                    )
                    return result
                replicas = self._prepare_scale_in(state, pods, replicas, result, signalled, check_mode)
                if replicas == state.replicas:
                    return result
            elif quiet:
                result.add_note(
                    f"The scale-out keeps the quiet pods {quiet} in the replicas; a later run that holds or scales "
                    "in removes them first."
                )
            kept_quiet = len(set(quiet) - set(result.removals))
            if check_mode:
                result.after = replicas
                result.requested_after = max(replicas - kept_quiet, 0)
                result.changed = True
                return result
            try:
                scaled = self.api.patch_scale(self.namespace, deployment, replicas, state.resource_version)
            except KubernetesConflictError:
                result.conflicts += 1
                continue
            result.after = scaled.replicas
            result.requested_after = max(scaled.replicas - kept_quiet, 0)
            result.changed = True
            return result
        raise KubernetesConflictError(
            f"deployments/scale {self.namespace}/{deployment} changed between read and patch on each of "
            f"{self.max_attempts} attempts (409 Conflict); another writer keeps scaling it. Make sure only one "
            "autoscaler (sidekiq-ops, an HPA or KEDA) drives this pool."
        )

    def _prepare_scale_in(
        self,
        state: DeploymentState,
        pods: Sequence[PodState],
        replicas: int,
        result: ScaleResult,
        signalled: set[str],
        check_mode: bool,
    ) -> int:
        """Set the deletion costs and quiet the pods to remove; return the replicas to patch, held pods included."""
        removal_count = state.replicas - replicas
        # Replicas without a pod (not created yet, or blocked by a ResourceQuota) go without removing a pod.
        pod_removals = min(removal_count, max(len(pods) - replicas, 0))
        if removal_count > pod_removals:
            result.add_note(
                f"{removal_count - pod_removals} of the replicas to remove have no pod, so lowering replicas "
                "removes no pod for them."
            )
        plan = plan_scale_in(pods, pod_removals)
        result.removals = [pod.name for pod in plan.removals]
        note = held_note(plan)
        if note:
            result.add_note(note)
        for pod in pods:
            cost = plan.costs[pod.name]
            if pod.deletion_cost == cost:
                continue
            if not check_mode:
                try:
                    self.api.annotate_pod(self.namespace, pod.name, {DELETION_COST_ANNOTATION: str(cost)})
                except KubernetesNotFoundError:
                    result.add_note(f"Pod {pod.name} was gone before its deletion cost could be set.")
                    continue
            result.deletion_costs[pod.name] = cost
        for pod in plan.removals:
            if not pod.identities:
                result.add_note(
                    f"Pod {pod.name} has no Sidekiq process in Redis (booting, or not matched by hostname), so it "
                    "was not quieted; TERM on removal still lets it finish its jobs within the stop budget."
                )
                continue
            for identity in pod.identities:
                if identity in signalled:
                    continue
                if not check_mode:
                    self._send_quiet(identity)
                signalled.add(identity)
                result.quieted.append(identity)
        return replicas + plan.held_count

    def _send_quiet(self, identity: str) -> None:
        if self.redis_client is None:
            raise QuietError(
                f"Cannot quiet Sidekiq process {identity}: no Redis client was given to the Kubernetes backend."
            )
        key = f"{self.namespace_prefix}{identity}-signals"
        try:
            pipeline = self.redis_client.pipeline(transaction=True)
            pipeline.lpush(key, "TSTP")
            pipeline.expire(key, SIGNAL_TTL_SECONDS)
            pipeline.execute()
        except Exception as error:
            translated: RedisAccessError = translate_redis_error(error)
            raise QuietError(
                f"Could not quiet Sidekiq process {identity} through Redis, so the Deployment was not scaled in: "
                f"{translated}"
            ) from error
