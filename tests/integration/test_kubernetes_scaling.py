"""The Kubernetes scaling backend against a local HTTP server that speaks the API endpoints it uses.

No Kubernetes API server can run on these test machines. `FakeApiServer` therefore serves, on 127.0.0.1, the five
endpoints the backend calls: read a Deployment, read and patch deployments/scale, list pods, patch a pod. It keeps
the API server's behaviour that matters here: resourceVersion preconditions that give 409, Status bodies for errors
and bearer token checks. It also emulates the ReplicaSet, which removes pods by phase, readiness and
pod-deletion-cost when replicas drop, and reports a Deployment's rollout status from fields a test sets. The
backend talks to it through the official kubernetes client, as it would to a cluster.

Sidekiq's processes are fake heartbeat hashes in a real redis-server on loopback (and one test runs the real
Sidekiq 6.4.1), read with the project's own state reader.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from sidekiq_fixtures import (  # type: ignore[import-not-found]
    RedisServer,
    SidekiqWorker,
    running_redis,
    sidekiq_launcher,
    wait_for,
)

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import scaling_kubernetes as backend
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import connect
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

NAMESPACE = "shop"
DEPLOYMENT = "sidekiq-default"
SELECTOR = "app.kubernetes.io/name=sidekiq,sidekiq-ops/pool=default"
LABELS = {"app.kubernetes.io/name": "sidekiq", "sidekiq-ops/pool": "default"}
TOKEN = "test-token"
DEPLOYMENT_PATH = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)$")
SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)/scale$")
PODS_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
POD_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)$")
PHASE_ORDER = {"Pending": 0, "Unknown": 1, "Running": 2}


@dataclass
class Failure:
    """A response the server gives instead of the normal one, `times` times, to requests matching method and path."""

    method: str
    path: str
    status: int
    message: str
    times: int = 1


@dataclass
class FakeApiServer:
    """The API endpoints of the backend, with a Deployment and its pods held in memory."""

    replicas: int = 0
    resource_version: int = 100
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    # Called before a scale patch is applied: lets a test play another writer that changes the Deployment.
    before_scale_patch: Callable[[FakeApiServer], None] | None = None
    # Rollout status of the Deployment: pods of an older template, and the Progressing reason. observed_generation
    # None means the controller has acted on the latest generation.
    generation: int = 1
    observed_generation: int | None = None
    old_template_pods: int = 0
    progressing_reason: str = "NewReplicaSetAvailable"
    paused: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    created: int = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}"

    def add_pod(self, name: str, phase: str = "Running", ready: bool = True, node: str | None = "node-1") -> None:
        self.created += 1
        self.pods[name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "labels": dict(LABELS),
                "annotations": {},
                "creationTimestamp": f"2024-05-01T12:{self.created:02d}:00Z",
            },
            "spec": {"containers": [{"name": "sidekiq", "image": "shop:1"}], **({"nodeName": node} if node else {})},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }

    def deletion_costs(self) -> dict[str, str | None]:
        return {
            name: pod["metadata"]["annotations"].get(backend.DELETION_COST_ANNOTATION)
            for name, pod in self.pods.items()
        }

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for verb, url, _ in self.requests if verb == method and re.search(pattern, urlsplit(url).path))

    # The ReplicaSet controller's order for removing pods: unscheduled, by phase, not ready, lowest deletion cost.
    def _replicaset_removal_key(self, pod: dict[str, Any]) -> tuple[Any, ...]:
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        cost = int(pod["metadata"]["annotations"].get(backend.DELETION_COST_ANNOTATION, "0"))
        return (
            bool(pod["spec"].get("nodeName")),
            PHASE_ORDER.get(pod["status"]["phase"], 1),
            ready,
            cost,
            pod["metadata"]["creationTimestamp"],
        )

    def add_running_pod(self, name: str, **options: Any) -> None:
        """Add a pod as if the Deployment had been scaled to include it."""
        self.add_pod(name, **options)
        self.replicas = len(self.pods)

    def _reconcile(self) -> None:
        while len(self.pods) > self.replicas:
            victim = min(self.pods.values(), key=self._replicaset_removal_key)
            del self.pods[victim["metadata"]["name"]]
        while len(self.pods) < self.replicas:
            self.add_pod(f"{DEPLOYMENT}-new{self.created + 1}", phase="Pending", ready=False, node=None)

    def scale_object(self) -> dict[str, Any]:
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE, "resourceVersion": str(self.resource_version)},
            "spec": {"replicas": self.replicas},
            "status": {"replicas": len(self.pods), "selector": SELECTOR},
        }

    def deployment_object(self) -> dict[str, Any]:
        """The Deployment as the API server returns it, with the rollout status fields the backend reads."""
        ready = sum(
            1
            for pod in self.pods.values()
            if any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
        )
        observed = self.generation if self.observed_generation is None else self.observed_generation
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": DEPLOYMENT,
                "namespace": NAMESPACE,
                "generation": self.generation,
                "resourceVersion": str(self.resource_version),
            },
            "spec": {
                "replicas": self.replicas,
                "paused": self.paused,
                "selector": {"matchLabels": dict(LABELS)},
                "template": {"metadata": {"labels": dict(LABELS)}, "spec": {"containers": [{"name": "sidekiq"}]}},
            },
            "status": {
                "observedGeneration": observed,
                "replicas": len(self.pods),
                "updatedReplicas": len(self.pods) - self.old_template_pods,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": max(self.replicas - ready, 0),
                "conditions": [
                    {"type": "Available", "status": "True" if ready else "False", "reason": "MinimumReplicas"},
                    {"type": "Progressing", "status": "True", "reason": self.progressing_reason},
                ],
            },
        }

    def handle(self, method: str, url: str, headers: Any, body: Any) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append((method, url, body))
            path = urlsplit(url).path
            if headers.get("Authorization") != f"Bearer {TOKEN}":
                return status_body(401, "Unauthorized")
            for failure in self.failures:
                if failure.times > 0 and failure.method == method and re.search(failure.path, path):
                    failure.times -= 1
                    return status_body(failure.status, failure.message)
            return self._route(method, url, path, headers, body)

    def _route(self, method: str, url: str, path: str, headers: Any, body: Any) -> tuple[int, dict[str, Any]]:
        if (match := DEPLOYMENT_PATH.match(path)) and match["ns"] == NAMESPACE and method == "GET":
            if match["name"] != DEPLOYMENT:
                return status_body(404, f'deployments.apps "{match["name"]}" not found')
            return 200, self.deployment_object()
        if (match := SCALE_PATH.match(path)) and match["ns"] == NAMESPACE:
            if match["name"] != DEPLOYMENT:
                return status_body(404, f'deployments.apps "{match["name"]}" not found')
            if method == "GET":
                return 200, self.scale_object()
            return self._patch_scale(headers, body)
        if (match := PODS_PATH.match(path)) and method == "GET":
            selector = parse_qs(urlsplit(url).query)["labelSelector"][0]
            expected = dict(part.split("=", 1) for part in selector.split(","))
            items = [pod for pod in self.pods.values() if expected.items() <= pod["metadata"]["labels"].items()]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if (match := POD_PATH.match(path)) and method == "PATCH":
            pod = self.pods.get(match["name"])
            if pod is None:
                return status_body(404, f'pods "{match["name"]}" not found')
            assert headers.get("Content-Type") == "application/merge-patch+json"
            pod["metadata"]["annotations"].update(body["metadata"]["annotations"])
            return 200, pod
        return status_body(404, f"no route for {method} {path}")

    def _patch_scale(self, headers: Any, body: Any) -> tuple[int, dict[str, Any]]:
        assert headers.get("Content-Type") == "application/merge-patch+json"
        if self.before_scale_patch is not None:
            hook, self.before_scale_patch = self.before_scale_patch, None
            hook(self)
        expected = body.get("metadata", {}).get("resourceVersion")
        if expected is not None and expected != str(self.resource_version):
            return status_body(
                409,
                f'Operation cannot be fulfilled on deployments.apps "{DEPLOYMENT}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        self.replicas = int(body["spec"]["replicas"])
        self.resource_version += 1
        self.generation += 1
        self._reconcile()
        return 200, self.scale_object()


def status_body(code: int, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message, "code": code}


def make_handler(fake: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, payload = fake.handle(method, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

    return Handler


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    fake.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def make_backend(fake: FakeApiServer, client: Any = None, max_attempts: int = 5) -> backend.KubernetesBackend:
    settings = backend.settings_from_params({"host": fake.url, "api_key": TOKEN, "request_timeout": 5}, {})
    return backend.KubernetesBackend(
        backend.ClientApi.from_settings(settings), NAMESPACE, redis_client=client, max_attempts=max_attempts
    )


def add_process(client: redis.Redis, host: str, busy: int, quiet: bool = False, pid: int = 1) -> str:
    """Write the heartbeat of a Sidekiq 6.4 process as Sidekiq does: the processes set and the identity hash."""
    identity = f"{host}:{pid}:0123456789ab"
    info = {"hostname": host, "pid": pid, "tag": "default", "concurrency": 10, "queues": ["default"], "labels": []}
    client.sadd("processes", identity)
    client.hset(
        identity,
        mapping={
            "info": json.dumps(info),
            "busy": busy,
            "beat": time.time(),
            "quiet": "true" if quiet else "false",
            "rss": 1000,
        },
    )
    return identity


def processes(server: RedisServer) -> tuple[ProcessState, ...]:
    state = read_state(connect({"redis_url": server.url}))
    return state.processes


def signals(client: redis.Redis, identity: str) -> list[bytes]:
    return list(client.lrange(f"{identity}-signals", 0, -1))


def test_scale_out_patches_replicas(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")

    result = make_backend(api_server).scale(DEPLOYMENT, 3, [])

    assert result.changed
    assert (result.before, result.after) == (1, 3)
    assert api_server.replicas == 3
    assert api_server.count("PATCH", "/pods/") == 0
    assert result.quieted == []
    patch = next(body for verb, path, body in api_server.requests if verb == "PATCH")
    assert patch == {"metadata": {"resourceVersion": "100"}, "spec": {"replicas": 3}}


def test_scale_unchanged_makes_no_write(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")

    result = make_backend(api_server).scale(DEPLOYMENT, 1, [])

    assert not result.changed
    assert api_server.count("PATCH", ".") == 0


def test_scale_in_quiets_idle_pods_and_sets_costs(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    busy_pods = {"sidekiq-default-a": 7, "sidekiq-default-b": 0, "sidekiq-default-c": 4, "sidekiq-default-d": 0}
    identities = {}
    for name, busy in busy_pods.items():
        api_server.add_running_pod(name)
        identities[name] = add_process(client, name, busy)

    result = make_backend(api_server, client).scale(DEPLOYMENT, 2, processes(redis_server))

    assert (result.before, result.after) == (4, 2)
    assert sorted(result.removals) == ["sidekiq-default-b", "sidekiq-default-d"]
    assert sorted(api_server.pods) == ["sidekiq-default-a", "sidekiq-default-c"]
    assert api_server.deletion_costs() == {"sidekiq-default-a": "7", "sidekiq-default-c": "4"}
    assert result.deletion_costs["sidekiq-default-b"] == backend.REMOVAL_COST
    assert sorted(result.quieted) == sorted([identities["sidekiq-default-b"], identities["sidekiq-default-d"]])
    for name in ("sidekiq-default-b", "sidekiq-default-d"):
        assert signals(client, identities[name]) == [b"TSTP"]
        assert 0 < client.ttl(f"{identities[name]}-signals") <= backend.SIGNAL_TTL_SECONDS
    for name in ("sidekiq-default-a", "sidekiq-default-c"):
        assert signals(client, identities[name]) == []


def test_scale_in_writes_costs_and_quiets_before_patch(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b")
    identity = add_process(client, "sidekiq-default-b", 0)
    add_process(client, "sidekiq-default-a", 2)
    seen: dict[str, Any] = {}

    def record(fake: FakeApiServer) -> None:
        seen["costs"] = fake.deletion_costs()
        seen["signals"] = signals(client, identity)

    api_server.before_scale_patch = record

    make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert seen["costs"] == {"sidekiq-default-a": "2", "sidekiq-default-b": str(backend.REMOVAL_COST)}
    assert seen["signals"] == [b"TSTP"]


def test_scale_in_skips_costs_already_set(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b")
    api_server.pods["sidekiq-default-a"]["metadata"]["annotations"][backend.DELETION_COST_ANNOTATION] = "3"
    add_process(client, "sidekiq-default-a", 3)
    add_process(client, "sidekiq-default-b", 0)

    result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert result.deletion_costs == {"sidekiq-default-b": backend.REMOVAL_COST}
    assert api_server.count("PATCH", "/pods/sidekiq-default-a$") == 0


def test_scale_in_prefers_pending_pod_without_quiet(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b", phase="Pending", ready=False)
    identity = add_process(client, "sidekiq-default-a", 0)

    result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert result.removals == ["sidekiq-default-b"]
    assert result.quieted == []
    assert signals(client, identity) == []
    assert list(api_server.pods) == ["sidekiq-default-a"]
    assert any("no Sidekiq process in Redis" in note for note in result.notes)


def test_check_mode_plans_without_writes(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b")
    add_process(client, "sidekiq-default-a", 5)
    identity = add_process(client, "sidekiq-default-b", 1)

    result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server), check_mode=True)

    assert result.check_mode
    assert (result.before, result.after) == (2, 1)
    assert result.removals == ["sidekiq-default-b"]
    assert result.quieted == [identity]
    assert api_server.count("PATCH", ".") == 0
    assert signals(client, identity) == []
    assert api_server.replicas == 2


def test_conflict_then_success_reads_again(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")
    api_server.failures.append(Failure("PATCH", "/scale$", 409, "the object has been modified"))

    result = make_backend(api_server).scale(DEPLOYMENT, 2, [])

    assert result.conflicts == 1
    assert result.after == 2
    assert api_server.replicas == 2
    assert api_server.count("GET", "/scale$") == 2
    assert api_server.count("PATCH", "/scale$") == 2


def test_conflict_from_other_writer_replans_scale_in(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    for name, busy in (("sidekiq-default-a", 3), ("sidekiq-default-b", 0), ("sidekiq-default-c", 1)):
        api_server.add_running_pod(name)
        add_process(client, name, busy)

    def other_writer(fake: FakeApiServer) -> None:
        # Someone removes the idle pod b and bumps the resourceVersion between our read and our patch.
        del fake.pods["sidekiq-default-b"]
        fake.replicas = 2
        fake.resource_version += 1

    api_server.before_scale_patch = other_writer

    result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert result.conflicts == 1
    assert result.after == 1
    assert list(api_server.pods) == ["sidekiq-default-a"]
    assert result.removals == ["sidekiq-default-c"]
    assert signals(client, "sidekiq-default-c:1:0123456789ab") == [b"TSTP"]


def test_conflict_keeps_quieted_pods_chosen(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    for name, busy in (("sidekiq-default-a", 2), ("sidekiq-default-b", 0), ("sidekiq-default-c", 2)):
        api_server.add_running_pod(name)
        add_process(client, name, busy)

    def other_writer(fake: FakeApiServer) -> None:
        # Between read and patch pod b turns busy in Redis and the resourceVersion moves, but b was quieted.
        client.hset("sidekiq-default-b:1:0123456789ab", "busy", 9)
        fake.resource_version += 1

    api_server.before_scale_patch = other_writer

    result = make_backend(api_server, client).scale(DEPLOYMENT, 2, processes(redis_server))

    assert result.conflicts == 1
    assert result.removals == ["sidekiq-default-b"]
    assert result.quieted == ["sidekiq-default-b:1:0123456789ab"]
    assert sorted(api_server.pods) == ["sidekiq-default-a", "sidekiq-default-c"]


def test_conflict_on_every_attempt_raises(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")
    api_server.failures.append(Failure("PATCH", "/scale$", 409, "the object has been modified", times=10))

    with pytest.raises(backend.KubernetesConflictError, match="on each of 3 attempts") as raised:
        make_backend(api_server, max_attempts=3).scale(DEPLOYMENT, 2, [])

    assert "only one autoscaler" in str(raised.value)
    assert api_server.count("PATCH", "/scale$") == 3
    assert api_server.replicas == 1


def test_forbidden_pod_patch_stops_before_quiet(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b")
    add_process(client, "sidekiq-default-a", 1)
    identity = add_process(client, "sidekiq-default-b", 0)
    api_server.failures.append(
        Failure("PATCH", "/pods/", 403, 'pods "sidekiq-default-a" is forbidden: User cannot patch resource "pods"')
    )

    with pytest.raises(backend.KubernetesPermissionError) as raised:
        make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    message = str(raised.value)
    assert "(403)" in message
    assert 'User cannot patch resource "pods"' in message
    assert "get, list and patch on pods" in message
    assert signals(client, identity) == []
    assert api_server.replicas == 2


def test_missing_deployment_raises_not_found(api_server: FakeApiServer) -> None:
    with pytest.raises(backend.KubernetesNotFoundError, match=r"sidekiq-missing not found \(404\)"):
        make_backend(api_server).scale("sidekiq-missing", 2, [])


def test_server_error_on_pod_list_raises(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")
    api_server.failures.append(Failure("GET", "/pods$", 500, "etcdserver: request timed out"))

    with pytest.raises(backend.KubernetesApiError, match="returned 500 for list pods in namespace shop") as raised:
        make_backend(api_server).read(DEPLOYMENT, [])

    assert "etcdserver: request timed out." in str(raised.value)


def test_wrong_token_raises_auth_error(api_server: FakeApiServer) -> None:
    settings = backend.settings_from_params({"host": api_server.url, "api_key": "wrong"}, {})
    scaler = backend.KubernetesBackend(backend.ClientApi.from_settings(settings), NAMESPACE)

    with pytest.raises(backend.KubernetesAuthError, match=r"\(401\)"):
        scaler.read(DEPLOYMENT, [])


def test_unreachable_server_raises() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = backend.settings_from_params({"host": f"http://127.0.0.1:{port}", "api_key": TOKEN}, {})
    scaler = backend.KubernetesBackend(backend.ClientApi.from_settings(settings), NAMESPACE)

    with pytest.raises(backend.KubernetesUnreachableError, match="Could not reach the Kubernetes API server"):
        scaler.read(DEPLOYMENT, [])


def test_redis_failure_stops_before_patch(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    add_process(client, "sidekiq-default-a", 0)
    known = processes(redis_server)
    redis_server.stop()

    with pytest.raises(backend.QuietError, match="was not scaled in"):
        make_backend(api_server, client).scale(DEPLOYMENT, 0, known)

    assert api_server.replicas == 1


def test_read_reports_pods_and_quiet(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b")
    add_process(client, "sidekiq-default-a", 2, quiet=True)

    state = make_backend(api_server).read(DEPLOYMENT, processes(redis_server))

    assert state.replicas == 2
    assert state.selector == SELECTOR
    assert state.quiet_pods == ("sidekiq-default-a",)
    data = state.to_dict()
    assert [pod["name"] for pod in data["pods"]] == ["sidekiq-default-a", "sidekiq-default-b"]
    assert data["pods"][0]["busy"] == 2
    assert data["pods"][1]["busy"] is None


def test_scale_in_holds_busy_unready_pod(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-idle")
    api_server.add_running_pod("sidekiq-default-busy", ready=False)
    add_process(client, "sidekiq-default-idle", 0)
    busy = add_process(client, "sidekiq-default-busy", 5)
    first = min(api_server.pods.values(), key=api_server._replicaset_removal_key)
    assert first["metadata"]["name"] == "sidekiq-default-busy"

    result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert result.removals == []
    assert api_server.replicas == 2
    assert api_server.count("PATCH", "/scale$") == 0
    assert sorted(api_server.pods) == ["sidekiq-default-busy", "sidekiq-default-idle"]
    assert signals(client, busy) == []
    assert api_server.deletion_costs() == {"sidekiq-default-idle": "0", "sidekiq-default-busy": "5"}
    assert any("pod sidekiq-default-busy runs 5 jobs and is not ready" in note for note in result.notes)


def test_scale_in_removes_idle_pod_ahead(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-idle", ready=False)
    api_server.add_running_pod("sidekiq-default-busy", ready=False)
    api_server.add_running_pod("sidekiq-default-ready")
    add_process(client, "sidekiq-default-idle", 0)
    add_process(client, "sidekiq-default-busy", 5)
    add_process(client, "sidekiq-default-ready", 0)

    result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert result.removals == ["sidekiq-default-idle"]
    assert api_server.replicas == 2
    assert sorted(api_server.pods) == ["sidekiq-default-busy", "sidekiq-default-ready"]
    assert any("Holding 1 pod of the scale-in" in note for note in result.notes)


def test_rollout_holds_scale_in(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    for name in ("sidekiq-default-a", "sidekiq-default-b", "sidekiq-default-c"):
        api_server.add_running_pod(name)
        add_process(client, name, 0)
    api_server.old_template_pods = 2
    scaler = make_backend(api_server, client)

    state = scaler.read(DEPLOYMENT, processes(redis_server))
    result = scaler.scale(DEPLOYMENT, 1, processes(redis_server))

    assert state.rollout_reason == "2 of its 3 pods run an older pod template"
    assert state.to_dict()["rolling_out"] is True
    assert not result.changed
    assert api_server.count("PATCH", ".") == 0
    assert api_server.replicas == 3
    assert client.keys("*-signals") == []
    assert any("it is rolling out (2 of its 3 pods run an older pod template)" in note for note in result.notes)


def test_rollout_allows_scale_out(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")
    api_server.observed_generation = 0

    result = make_backend(api_server).scale(DEPLOYMENT, 3, [])

    assert result.changed
    assert api_server.replicas == 3


def test_unavailable_during_update_is_rollout(api_server: FakeApiServer) -> None:
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b", ready=False)
    scaler = make_backend(api_server)
    steady = scaler.read(DEPLOYMENT, [])
    api_server.progressing_reason = "ReplicaSetUpdated"

    updating = scaler.read(DEPLOYMENT, [])

    assert steady.rollout_reason is None
    assert updating.rollout_reason == (
        "1 replica is unavailable while the Progressing condition reports ReplicaSetUpdated"
    )


def test_failed_patch_quiet_pod_goes_next_run(api_server: FakeApiServer, redis_server: RedisServer) -> None:
    client = redis_server.client()
    api_server.add_running_pod("sidekiq-default-a")
    api_server.add_running_pod("sidekiq-default-b")
    add_process(client, "sidekiq-default-a", 3)
    quieted = add_process(client, "sidekiq-default-b", 0)
    api_server.failures.append(Failure("PATCH", "/scale$", 500, "etcdserver: request timed out"))

    with pytest.raises(backend.KubernetesApiError) as raised:
        make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

    assert f"{quieted} were quieted (TSTP)" in str(raised.value)
    assert signals(client, quieted) == [b"TSTP"]
    assert api_server.replicas == 2
    # Play Sidekiq, which turns quiet within one heartbeat of the signal.
    client.hset(quieted, "quiet", "true")
    scaler = make_backend(api_server, client)

    state = scaler.read(DEPLOYMENT, processes(redis_server))
    result = scaler.scale(DEPLOYMENT, state.requested, processes(redis_server))

    assert state.requested == 1
    assert result.removals == ["sidekiq-default-b"]
    assert list(api_server.pods) == ["sidekiq-default-a"]
    assert result.requested_after == 1


@pytest.mark.sidekiq
def test_real_sidekiq_goes_quiet(api_server: FakeApiServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """A real Sidekiq 6.4.1 process whose hostname is a pod's name is quieted by a scale-in."""
    client = redis_server.client()
    hostname = socket.gethostname()
    api_server.add_running_pod(hostname)
    api_server.add_running_pod("sidekiq-default-busy")
    add_process(client, "sidekiq-default-busy", 5)
    with sidekiq_launcher(tmp_path / "sidekiq") as start:
        worker: SidekiqWorker = start(redis_server.url, queues=("default",))
        identity = worker.identity(client)

        result = make_backend(api_server, client).scale(DEPLOYMENT, 1, processes(redis_server))

        assert result.quieted == [identity]
        wait_for(lambda: client.hget(identity, "quiet") == b"true", timeout=15, description="Sidekiq to turn quiet")
    assert list(api_server.pods) == ["sidekiq-default-busy"]
