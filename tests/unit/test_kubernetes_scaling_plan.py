"""Pure parts of the Kubernetes scaling backend: options, pod matching, removal order, deletion costs, API errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from process_states import process_state  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import scaling_kubernetes as backend
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state_model import ProcessState

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def process(host: str, pid: int = 1, busy: int = 0, quiet: bool = False, live: bool = True) -> ProcessState:
    return process_state(host, beat=1.0, pid=pid, busy=busy, quiet=quiet, live=live)


def pod(name: str, minutes: int = 0, **overrides: Any) -> backend.PodReading:
    values: dict[str, Any] = {
        "name": name,
        "node_name": "node-1",
        "phase": "Running",
        "ready": True,
        "terminating": False,
        "deletion_cost": None,
        "created": START + timedelta(minutes=minutes),
    }
    values.update(overrides)
    return backend.PodReading(**values)


def test_match_pods_joins_by_hostname() -> None:
    pods = [pod("sidekiq-default-a"), pod("sidekiq-default-b")]
    processes = [process("sidekiq-default-a", busy=3), process("other-host", busy=9)]

    matched = {state.name: state for state in backend.match_pods(pods, processes)}

    assert matched["sidekiq-default-a"].busy == 3
    assert matched["sidekiq-default-a"].identities == ("sidekiq-default-a:1:abc1",)
    assert matched["sidekiq-default-b"].busy is None
    assert matched["sidekiq-default-b"].identities == ()


def test_match_pods_skips_terminating_and_ended_pods() -> None:
    pods = [
        pod("a"),
        pod("b", terminating=True),
        pod("c", phase="Succeeded"),
        pod("d", phase="Failed"),
    ]

    names = [state.name for state in backend.match_pods(pods, [])]

    assert names == ["a"]


def test_match_pods_sums_restarted_container_processes() -> None:
    processes = [process("a", pid=1, busy=2, quiet=True), process("a", pid=7, busy=1), process("a", pid=9, live=False)]

    (state,) = backend.match_pods([pod("a")], processes)

    assert state.busy == 3
    assert state.quiet is False
    assert state.identities == ("a:1:abc1", "a:7:abc7")


def test_removal_order_follows_replicaset_ranks_first() -> None:
    pods = backend.match_pods(
        [
            pod("ready-idle"),
            pod("not-ready", ready=False),
            pod("pending", phase="Pending", ready=False),
            pod("unscheduled", node_name=None, phase="Pending", ready=False),
        ],
        [process("ready-idle"), process("not-ready", busy=5)],
    )

    order = [state.name for state in sorted(pods, key=backend.removal_key)]

    assert order == ["unscheduled", "pending", "not-ready", "ready-idle"]


def test_removal_order_prefers_quiet_then_idle_then_newest() -> None:
    pods = backend.match_pods(
        [pod("busy", 0), pod("idle-old", 1), pod("idle-new", 2), pod("quiet-busy", 3), pod("unknown", 4)],
        [
            process("busy", busy=4),
            process("idle-old"),
            process("idle-new"),
            process("quiet-busy", busy=6, quiet=True),
        ],
    )

    order = [state.name for state in sorted(pods, key=backend.removal_key)]

    assert order == ["quiet-busy", "idle-new", "idle-old", "busy", "unknown"]


def test_plan_scale_in_costs_removed_pods_lowest() -> None:
    pods = backend.match_pods(
        [pod("a"), pod("b"), pod("c"), pod("d")],
        [process("a", busy=3), process("b"), process("c", busy=1)],
    )

    plan = backend.plan_scale_in(pods, 2)

    assert [state.name for state in plan.removals] == ["b", "c"]
    assert plan.costs == {"a": 3, "b": backend.REMOVAL_COST, "c": backend.REMOVAL_COST, "d": backend.UNKNOWN_BUSY_COST}
    assert max(plan.costs[name] for name in ("b", "c")) < min(plan.costs[name] for name in ("a", "d"))


def test_plan_scale_in_caps_removals_at_pod_count() -> None:
    pods = backend.match_pods([pod("a")], [process("a")])

    plan = backend.plan_scale_in(pods, 3)

    assert [state.name for state in plan.removals] == ["a"]


def test_settings_read_k8s_auth_environment() -> None:
    environ = {
        "K8S_AUTH_HOST": "https://api.example.internal:6443/",
        "K8S_AUTH_API_KEY": "token-from-env",
        "K8S_AUTH_VALIDATE_CERTS": "false",
        "K8S_AUTH_CONTEXT": "staging",
    }

    settings = backend.settings_from_params({"context": "production"}, environ)

    assert settings.host == "https://api.example.internal:6443"
    assert settings.api_key == "token-from-env"
    assert settings.validate_certs is False
    assert settings.context == "production"
    assert settings.has_direct_credentials
    assert "token-from-env" not in repr(settings)


def test_settings_reject_zero_timeout() -> None:
    with pytest.raises(backend.KubernetesOptionsError, match="request_timeout"):
        backend.settings_from_params({"request_timeout": 0}, {})


def test_configuration_uses_host_and_token_without_kubeconfig(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    settings = backend.settings_from_params(
        {"host": "https://10.0.0.1:6443", "api_key": "abc", "ca_cert": "/etc/ca.pem"}, {}
    )

    configuration = backend.build_configuration(settings)

    assert configuration.host == "https://10.0.0.1:6443"
    assert configuration.auth_settings()["BearerToken"]["value"] == "Bearer abc"
    assert configuration.ssl_ca_cert == "/etc/ca.pem"
    assert configuration.retries == 0


def test_configuration_loads_kubeconfig_context(tmp_path: Any) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        """
apiVersion: v1
kind: Config
clusters:
- name: one
  cluster: {server: "https://one.example.internal:6443"}
- name: two
  cluster: {server: "https://two.example.internal:6443"}
users:
- name: robot
  user: {token: robot-token}
contexts:
- name: first
  context: {cluster: one, user: robot}
- name: second
  context: {cluster: two, user: robot}
current-context: first
"""
    )
    settings = backend.settings_from_params({"kubeconfig": str(kubeconfig), "context": "second"}, {})

    configuration = backend.build_configuration(settings)

    assert configuration.host == "https://two.example.internal:6443"
    assert configuration.auth_settings()["BearerToken"]["value"] == "Bearer robot-token"


def test_configuration_reports_missing_kubeconfig(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    settings = backend.settings_from_params({}, {})

    with pytest.raises(backend.KubernetesOptionsError, match="default kubeconfig"):
        backend.build_configuration(settings)


@pytest.mark.parametrize(
    ("status", "error_class", "hint"),
    [
        (401, backend.KubernetesAuthError, "api_key"),
        (403, backend.KubernetesPermissionError, "deployments/scale"),
        (404, backend.KubernetesNotFoundError, "playbooks/kubernetes.yml"),
        (409, backend.KubernetesConflictError, "Conflict"),
        (500, backend.KubernetesApiError, "returned 500"),
    ],
)
def test_api_errors_name_status_and_next_step(status: int, error_class: type[Exception], hint: str) -> None:
    body = '{"kind": "Status", "message": "deployments.apps \\"sidekiq-default\\" is forbidden"}'

    error = backend.translate_api_error("patch", "deployments/scale shop/sidekiq-default", status, body)

    assert isinstance(error, error_class)
    assert "deployments/scale shop/sidekiq-default" in str(error)
    assert 'deployments.apps "sidekiq-default" is forbidden.' in str(error)
    assert hint in str(error)


def test_api_error_keeps_non_json_body() -> None:
    error = backend.translate_api_error("read", "x", 502, "<html>Bad   gateway</html>")

    assert "<html>Bad gateway</html>." in str(error)
