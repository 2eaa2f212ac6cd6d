"""Render the Kubernetes objects of every example environment and check them strictly.

Each environment (inventories/staging, inventories/production and tests/data/kubernetes/inventory, which reaches
the KEDA, HPA and TLS branches) is rendered once with `ansible-playbook playbooks/kubernetes.yml --tags render`
into a temporary review directory: the worker pools of roles/sidekiq_kubernetes at its top, and the autoscaler
CronJob of roles/autoscaler (autoscaler_target: kubernetes) in its autoscaler/ subdirectory. The objects are
validated against the official Kubernetes OpenAPI schemas of several minor versions with kubernetes-validate in
strict mode, so unknown fields fail. The ScaledObject is checked against KEDA's CRD schema, and the pod specs
against the Pod Security "restricted" profile, field by field. Finally the checkov policy scanner reads the whole
directory, subdirectory included.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from sidekiq_fixtures import free_port  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "kubernetes"
ROLES = ROOT / "roles"
AUTOSCALER_NAME = "sidekiq-ops-autoscaler"
AUTOSCALER_KINDS = {"ServiceAccount", "ConfigMap", "Role", "RoleBinding", "CronJob"}
ENVIRONMENTS = {
    "staging": ROOT / "inventories" / "staging",
    "production": ROOT / "inventories" / "production",
    "test": DATA / "inventory",
}
# Every minor version whose schemas kubernetes-validate 1.37.0 ships, from 1.30 on.
KUBERNETES_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"]
KEDA_SCHEMA = DATA / "keda-scaledobject-v1alpha1.schema.yaml"
ALLOWED_VOLUME_TYPES = {"configMap", "emptyDir", "secret", "projected", "downwardAPI", "persistentVolumeClaim"}

# Checkov findings accepted, each with the reason, and the objects it may apply to (None: any object).
CHECKOV_ACCEPTED: dict[str, tuple[str, set[str] | None]] = {
    "CKV_K8S_43": (
        "Image should use digest: the image reference is the inventory's choice; pin it by digest in "
        "sidekiq_kubernetes_image to pass. The test inventory does, the examples use release tags.",
        None,
    ),
    "CKV_K8S_15": (
        "Image pull policy Always: with digests or immutable release tags IfNotPresent starts the same image "
        "without a registry round trip; sidekiq_kubernetes_image_pull_policy sets it.",
        None,
    ),
    "CKV_K8S_35": (
        "Secrets as environment variables: Sidekiq and redis-rb read the Redis URL only from REDIS_URL, and KEDA's "
        "redis trigger reads the password from the target's REDIS_PASSWORD variable.",
        None,
    ),
    "CKV_K8S_38": (
        "ServiceAccount token mounted: the autoscaler CronJob calls the Kubernetes API with it; worker pods mount "
        "none.",
        {"CronJob.sidekiq-ops-autoscaler"},
    ),
}


@dataclass
class Rendered:
    """The objects one environment rendered, keyed by path in the review directory, with the inventory variables."""

    name: str
    directory: Path
    objects: dict[str, dict[str, Any]]
    variables: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects.values() if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        return found


def ansible_environment() -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def playbook_command(inventory: Path, review_dir: Path, *arguments: str) -> list[str]:
    return [
        str(ROOT / ".venv" / "bin" / "ansible-playbook"),
        "-i", str(inventory),
        str(ROOT / "playbooks" / "kubernetes.yml"),
        "--tags", "render",
        "-e", json.dumps({"sidekiq_kubernetes_review_dir": str(review_dir)}),
        *arguments,
    ]  # fmt: skip


def run_playbook(inventory: Path, review_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        playbook_command(inventory, review_dir, *arguments),
        cwd=ROOT,
        env=ansible_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def inventory_variables(inventory: Path) -> dict[str, Any]:
    """Merge the plain YAML group_vars of an inventory (the secrets files hold only references)."""
    variables: dict[str, Any] = {}
    for path in sorted((inventory / "group_vars" / "all").glob("*.yml")):
        variables.update(yaml.safe_load(path.read_text()) or {})
    return variables


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Render every environment once for the whole module, the three playbook runs side by side."""
    runs = {}
    for name, inventory in sorted(ENVIRONMENTS.items()):
        review_dir = tmp_path_factory.mktemp(f"review-{name}")
        process = subprocess.Popen(
            playbook_command(inventory, review_dir),
            cwd=ROOT,
            env=ansible_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs[name] = (inventory, review_dir, process)
    found: dict[str, Rendered] = {}
    for name, (inventory, review_dir, process) in runs.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
        objects = {
            str(path.relative_to(review_dir)): yaml.safe_load(path.read_text())
            for path in sorted(review_dir.rglob("*.yaml"))
        }
        found[name] = Rendered(name, review_dir, objects, inventory_variables(inventory))
    return found


@pytest.fixture(params=sorted(ENVIRONMENTS))
def rendered(request: pytest.FixtureRequest, renders: dict[str, Rendered]) -> Rendered:
    return renders[str(request.param)]


@pytest.fixture
def test_environment(renders: dict[str, Rendered]) -> Rendered:
    return renders["test"]


def pod_specs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    specs = [
        (f"Deployment {obj['metadata']['name']}", obj["spec"]["template"]["spec"])
        for obj in rendered.of_kind("Deployment")
    ]
    specs += [
        (f"CronJob {obj['metadata']['name']}", obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        for obj in rendered.of_kind("CronJob")
    ]
    return specs


def strict_crd_schema(schema: Any) -> Any:
    """Close every object schema that lists properties, so unknown fields fail as with kubectl --validate=strict."""
    if isinstance(schema, dict):
        closed = {key: strict_crd_schema(value) for key, value in schema.items()}
        if (
            closed.get("type") == "object"
            and "properties" in closed
            and "additionalProperties" not in closed
            and not closed.get("x-kubernetes-preserve-unknown-fields")
        ):
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [strict_crd_schema(item) for item in schema]
    return schema


def find_checkov() -> str:
    candidates = [
        os.environ.get("SIDEKIQ_OPS_CHECKOV", ""),
        str(ROOT / ".venv" / "bin" / "checkov"),
        str(ROOT / ".cache" / "checkov-venv" / "bin" / "checkov"),
        shutil.which("checkov") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        "checkov is not installed: create its own environment with `python3 -m venv .cache/checkov-venv && "
        ".cache/checkov-venv/bin/pip install checkov==3.3.30` (its pins conflict with .venv), or set "
        "SIDEKIQ_OPS_CHECKOV to a checkov executable"
    )


def test_every_object_has_one_file(rendered: Rendered) -> None:
    kinds = sorted({obj["kind"] for obj in rendered.objects.values()})
    pools = [pool["name"] for pool in rendered.variables["sidekiq_pools"]]

    for pool in pools:
        for kind in ("ServiceAccount", "ConfigMap", "NetworkPolicy", "Deployment", "PodDisruptionBudget"):
            assert rendered.get(kind, f"sidekiq-{pool}")
    for file_name, obj in rendered.objects.items():
        assert file_name.endswith(f"-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml")
        autoscaler_object = obj["metadata"]["name"] == AUTOSCALER_NAME
        assert file_name.startswith("autoscaler/") == autoscaler_object, file_name
    assert "Secret" not in kinds
    assert list(rendered.objects) == sorted(rendered.objects)


def test_autoscaler_objects_come_from_autoscaler_role(rendered: Rendered) -> None:
    autoscaler_objects = [obj for name, obj in rendered.objects.items() if name.startswith("autoscaler/")]

    assert rendered.variables["autoscaler_target"] == "kubernetes"
    assert sorted(obj["kind"] for obj in autoscaler_objects) == sorted(AUTOSCALER_KINDS)
    for obj in autoscaler_objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "autoscaler"
    assert not list((ROLES / "sidekiq_kubernetes" / "templates").glob("autoscaler-*"))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_match_kubernetes_schemas(rendered: Rendered, version: str) -> None:
    for file_name, obj in rendered.objects.items():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{rendered.name}/{file_name} is invalid for Kubernetes {version}: {error}") from error


def test_validator_rejects_unknown_field() -> None:
    """The strict validation above can fail: an unknown field in a Deployment is an error."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "comand": ["sidekiq"]}]},
            },
        },
    }

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_scaled_objects_match_keda_schema(test_environment: Rendered) -> None:
    schema = strict_crd_schema(yaml.safe_load(KEDA_SCHEMA.read_text()))
    scaled_objects = test_environment.of_kind("ScaledObject")

    assert [obj["metadata"]["name"] for obj in scaled_objects] == ["sidekiq-bulk"]
    for obj in scaled_objects:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(obj, schema)


def test_keda_schema_rejects_wrong_objects(test_environment: Rendered) -> None:
    schema = strict_crd_schema(yaml.safe_load(KEDA_SCHEMA.read_text()))
    scaled = test_environment.get("ScaledObject", "sidekiq-bulk")
    number_as_metadata = copy.deepcopy(scaled)
    number_as_metadata["spec"]["triggers"][0]["metadata"]["listLength"] = 20
    unknown_field = copy.deepcopy(scaled)
    unknown_field["spec"]["advanced"]["scalingModifier"] = {"formula": "x"}

    for wrong in (number_as_metadata, unknown_field):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_keda_sums_every_queue_of_the_pool(test_environment: Rendered) -> None:
    pools = {pool["name"]: pool for pool in test_environment.variables["sidekiq_pools"]}
    scaled = test_environment.get("ScaledObject", "sidekiq-bulk")
    triggers = scaled["spec"]["triggers"]
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]

    assert [trigger["metadata"]["listName"] for trigger in triggers] == ["queue:default", "queue:low"]
    assert pool_model.queue_names(pools["bulk"]) == ["default", "low"]
    assert modifiers["formula"] == "q0_default + q1_low"
    assert [trigger["name"] for trigger in triggers] == ["q0_default", "q1_low"]
    assert modifiers["target"] == "20"
    assert modifiers["activationTarget"] == "1"
    assert modifiers["metricType"] == "AverageValue"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 10)
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sidekiq-bulk"}
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"] == "redis.demo-data.svc.cluster.local:6380"
        assert trigger["metadata"]["databaseIndex"] == "2"
        assert trigger["metadata"]["enableTLS"] == "true"
        assert trigger["metadata"]["passwordFromEnv"] == "REDIS_PASSWORD"
        assert trigger["metadata"]["usernameFromEnv"] == "REDIS_USERNAME"


def test_hpa_scales_on_pool_backlog(test_environment: Rendered) -> None:
    hpa = test_environment.get("HorizontalPodAutoscaler", "sidekiq-mail")
    (metric,) = hpa["spec"]["metrics"]

    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "sidekiq_pool_backlog"
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {"app": "demo", "pool": "mail"}}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "30"}
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sidekiq-mail"
    assert test_environment.get("PodDisruptionBudget", "sidekiq-mail")["spec"]["maxUnavailable"] == 2


def test_pod_specs_meet_restricted_profile(rendered: Rendered) -> None:
    specs = pod_specs(rendered)

    assert specs
    for label, spec in specs:
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, label
        assert pod_context.get("runAsUser", 1) != 0, label
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
        assert "sysctls" not in pod_context, label
        for host_field in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
            assert spec.get(host_field) in (None, False) or host_field == "hostUsers", label
        for volume in spec.get("volumes", []):
            volume_types = set(volume) - {"name"}
            assert volume_types <= ALLOWED_VOLUME_TYPES, f"{label}: volume {volume}"
        mounts = {}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{label} container {container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged") in (None, False), where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
            assert context.get("runAsUser", pod_context.get("runAsUser")) not in (0, None), where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("seccompProfile", pod_context.get("seccompProfile"))["type"] == "RuntimeDefault", where
            assert context.get("procMount", "Default") == "Default", where
            for port in container.get("ports", []):
                assert "hostPort" not in port, where
            for resource in ("cpu", "memory"):
                assert resource in container["resources"]["requests"], where
                assert resource in container["resources"]["limits"], where
            mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, where
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], label


def test_workers_mount_no_token(rendered: Rendered) -> None:
    for deployment in rendered.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == name
        assert rendered.get("ServiceAccount", name)["automountServiceAccountToken"] is False


def test_deployments_follow_pool_model(rendered: Rendered) -> None:
    margin = rendered.variables.get("sidekiq_shutdown_margin", pool_model.DEFAULT_SHUTDOWN_MARGIN)
    settings = rendered.variables.get("sidekiq_kubernetes_pools", {})
    singletons = set(rendered.variables.get("sidekiq_singleton_queues", []))

    for pool in rendered.variables["sidekiq_pools"]:
        deployment = rendered.get("Deployment", f"sidekiq-{pool['name']}")
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        minimum, maximum = pool_model.processes(pool)
        autoscaled = minimum != maximum or settings.get(pool["name"], {}).get("autoscaler") in ("hpa", "keda")

        assert pod["terminationGracePeriodSeconds"] == pool_model.stop_budget(pool, margin), pool["name"]
        if autoscaled:
            assert "replicas" not in spec, f"{pool['name']}: an autoscaled pool must not set replicas"
        else:
            assert spec["replicas"] == minimum, pool["name"]
        if set(pool_model.queue_names(pool)) & singletons:
            assert spec["strategy"] == {"type": "Recreate"}, pool["name"]
        else:
            assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, pool["name"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_containers_use_exec_form(rendered: Rendered) -> None:
    shells = {"sh", "bash", "/bin/sh", "/bin/bash", "dash"}
    for deployment in rendered.of_kind("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert isinstance(container["command"], list)
        assert container["command"][0] not in shells
        assert "sidekiq" in container["command"]
        assert container["args"][-2:] == ["-C", "/etc/sidekiq/sidekiq.yml"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop == ["ruby", "-e", 'Process.kill("TSTP", 1)']
        assert container["livenessProbe"]["exec"]["command"] == ["ruby", "/etc/sidekiq/probe.rb", "live"]
        assert container["readinessProbe"]["exec"]["command"] == ["ruby", "/etc/sidekiq/probe.rb", "ready"]
        assert container["startupProbe"]["exec"]["command"] == ["ruby", "/etc/sidekiq/probe.rb", "ready"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["exec"]["command"][0] not in shells


def test_redis_credentials_come_from_secret(rendered: Rendered) -> None:
    variables = rendered.variables
    secret = variables["sidekiq_kubernetes_redis_secret_name"]
    for deployment in rendered.of_kind("Deployment") + rendered.of_kind("CronJob"):
        pod = (
            deployment["spec"]["template"]["spec"]
            if deployment["kind"] == "Deployment"
            else deployment["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        )
        env = {item["name"]: item for item in pod["containers"][0]["env"]}
        if variables.get("sidekiq_kubernetes_redis_secret_url_key"):
            reference = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": secret, "key": variables["sidekiq_kubernetes_redis_secret_url_key"]}
        else:
            assert env["REDIS_URL"]["value"].startswith("redis")
            assert "$(REDIS_PASSWORD)@" in env["REDIS_URL"]["value"]
            names = list(env)
            assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
        reference = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": secret, "key": variables["sidekiq_kubernetes_redis_secret_password_key"]}
        for item in env.values():
            assert "password" not in str(item.get("value", "")).lower().replace("$(redis_password)", "")


def test_configmap_holds_pool_config_as_integers(rendered: Rendered) -> None:
    for pool in rendered.variables["sidekiq_pools"]:
        configmap = rendered.get("ConfigMap", f"sidekiq-{pool['name']}")
        config = yaml.safe_load(configmap["data"]["sidekiq.yml"])

        assert config == pool_model.sidekiq_config(pool)
        assert type(config["concurrency"]) is int
        assert type(config["timeout"]) is int
        assert configmap["data"]["probe.rb"].startswith("# Health probe of a Sidekiq pod")


def test_network_policies_allow_redis_and_dns_only(rendered: Rendered) -> None:
    variables = rendered.variables
    extra = variables.get("sidekiq_kubernetes_extra_egress", [])
    for policy in rendered.of_kind("NetworkPolicy"):
        spec = policy["spec"]
        redis_rule, dns_rule, *others = spec["egress"]

        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["ingress"] == []
        assert redis_rule["ports"] == [{"protocol": "TCP", "port": variables["sidekiq_kubernetes_redis_port"]}]
        assert redis_rule["to"]
        assert sorted(port["port"] for port in dns_rule["ports"]) == [53, 53]
        assert others == extra
        deployment = rendered.get("Deployment", policy["metadata"]["name"])
        assert spec["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_every_object_carries_standard_labels(rendered: Rendered) -> None:
    for file_name, obj in rendered.objects.items():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "sidekiq-ops", file_name
        assert labels["app.kubernetes.io/part-of"] == rendered.variables["sidekiq_app"], file_name
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == rendered.variables["sidekiq_kubernetes_namespace"], file_name
            assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"} <= set(
                labels
            )


def autoscale_extra_vars(rendered: Rendered) -> dict[str, Any]:
    extra_vars: dict[str, Any] = yaml.safe_load(rendered.get("ConfigMap", AUTOSCALER_NAME)["data"]["autoscale.yml"])
    return extra_vars


def test_cronjob_runs_one_autoscale_at_a_time(rendered: Rendered) -> None:
    cronjob = rendered.get("CronJob", AUTOSCALER_NAME)
    spec = cronjob["spec"]
    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    extra_vars = autoscale_extra_vars(rendered)
    # The worker role writes each pool's autoscaler on its Deployment; the CronJob must size exactly those pools.
    sized_by_sidekiq_ops = [
        deployment["metadata"]["name"].removeprefix("sidekiq-")
        for deployment in rendered.of_kind("Deployment")
        if deployment["metadata"]["annotations"]["sidekiq-ops/autoscaler"] == "sidekiq-ops"
    ]

    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["suspend"] is False
    assert container["command"][:2] == ["ansible-playbook", "playbooks/autoscale.yml"]
    assert container["command"][-2:] == ["--extra-vars", "@/etc/sidekiq-ops/autoscale.yml"]
    assert container["image"] == rendered.variables["autoscaler_kubernetes_image"]
    assert extra_vars["autoscale_backend"] == "kubernetes"
    assert extra_vars["autoscale_kubernetes_namespace"] == rendered.variables["sidekiq_kubernetes_namespace"]
    assert sorted(extra_vars["autoscale_pools_filter"]) == sorted(sized_by_sidekiq_ops)
    assert sized_by_sidekiq_ops


def test_cronjob_vars_are_read_by_playbook(rendered: Rendered) -> None:
    """Every extra variable the CronJob passes is one that playbooks/autoscale.yml uses and documents."""
    playbook = (ROOT / "playbooks" / "autoscale.yml").read_text()
    header = "".join(line for line in playbook.splitlines(keepends=True) if line.startswith("#"))
    body = "".join(line for line in playbook.splitlines(keepends=True) if not line.lstrip().startswith("#"))

    for name in autoscale_extra_vars(rendered):
        assert re.search(rf"\b{name}\b", body), f"playbooks/autoscale.yml never reads {name}"
        assert re.search(rf"\b{name}\b", header), f"{name} is not documented in the header of playbooks/autoscale.yml"


def test_autoscaler_role_is_minimal(rendered: Rendered) -> None:
    role = rendered.get("Role", AUTOSCALER_NAME)
    binding = rendered.get("RoleBinding", AUTOSCALER_NAME)
    pools_filter = autoscale_extra_vars(rendered)["autoscale_pools_filter"]

    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": [f"sidekiq-{name}" for name in pools_filter],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": [f"sidekiq-{name}" for name in pools_filter],
            "verbs": ["get", "patch"],
        },
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "sidekiq-ops-autoscaler",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sidekiq-ops-autoscaler", "namespace": role["metadata"]["namespace"]}
    ]


def test_checkov_finds_nothing_unaccepted(rendered: Rendered) -> None:
    for check, (reason, _) in CHECKOV_ACCEPTED.items():
        assert len(reason) > 40, f"{check} needs a written reason"
    result = subprocess.run(
        [find_checkov(), "--directory", str(rendered.directory), "--framework", "kubernetes", "--quiet",
         "--compact", "--output", "json", "--skip-download"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    unaccepted = []
    for entry in reports:
        assert entry["summary"]["parsing_errors"] == 0
        # checkov counts each container as a resource of its own, so it reports at least one per object.
        assert entry["summary"]["resource_count"] >= len(rendered.objects)
        for failed in entry["results"]["failed_checks"]:
            kind, _, name = failed["resource"].split(".", 2)
            accepted = CHECKOV_ACCEPTED.get(failed["check_id"])
            if accepted is None or (accepted[1] is not None and f"{kind}.{name}" not in accepted[1]):
                unaccepted.append(f"{failed['check_id']} {failed['check_name']} on {failed['resource']}")

    assert unaccepted == []


def test_namespace_enforces_restricted(test_environment: Rendered) -> None:
    namespace = test_environment.get("Namespace", "demo-test")

    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


BAD_INPUTS = {
    "pool name not a DNS label": (
        {"sidekiq_pools": [{"name": "Bulk_Jobs", "queues": ["default"], "processes": {"min": 1, "max": 1}}],
         "sidekiq_app_queues": []},
        "invalid name 'Bulk_Jobs'",
    ),
    "stop budget above cap": (
        {"sidekiq_pools": [{"name": "slow", "queues": ["slow"], "timeout": 900, "processes": {"min": 1, "max": 1}}],
         "sidekiq_app_queues": [], "sidekiq_kubernetes_max_stop_budget": 600},
        "stop budget 910 s (timeout 900 + margin 10) exceeds the platform's cap of 600 s",
    ),
    "keda with sidekiq-ops settings": (
        {"sidekiq_kubernetes_pools": {"default": {"autoscaler": "keda"}}},
        "has autoscale settings for the sidekiq-ops autoscaler and autoscaler \"keda\"",
    ),
    "two autoscalers listed": (
        {"sidekiq_kubernetes_pools": {"default": {"autoscaler": ["sidekiq-ops", "hpa"]}}},
        "two autoscalers on one pool",
    ),
    "hpa with min zero": (
        {"sidekiq_pools": [{"name": "zero", "queues": ["zero"], "processes": {"min": 0, "max": 3}}],
         "sidekiq_app_queues": [], "sidekiq_kubernetes_pools": {"zero": {"autoscaler": "hpa"}}},
        "with processes.min 0 never sees scheduled and retry jobs",
    ),
    "settings for unknown pool": (
        {"sidekiq_kubernetes_pools": {"defualt": {"autoscaler": "none"}}},
        'sidekiq_kubernetes_pools names "defualt", which is no pool of sidekiq_pools',
    ),
    "missing namespace": (
        {"sidekiq_kubernetes_namespace": ""},
        'sidekiq_kubernetes_namespace "" is invalid',
    ),
    "removed cronjob variable": (
        {"sidekiq_kubernetes_autoscaler_cronjob": True},
        "sidekiq_kubernetes_autoscaler_cronjob was removed: the autoscaler CronJob moved to the autoscaler role, "
        "which playbooks/kubernetes.yml runs after this role; set autoscaler_target: kubernetes instead",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_rejected_before_render(case: str, tmp_path: Path) -> None:
    overrides, message = BAD_INPUTS[case]
    review_dir = tmp_path / "review"

    result = run_playbook(ENVIRONMENTS["staging"], review_dir, "-e", json.dumps(overrides))

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Invalid Kubernetes settings, nothing was rendered or applied" in output
    assert message in output.replace("\n", " "), output
    assert not review_dir.exists()


def test_apply_reads_exactly_the_rendered_files() -> None:
    """The apply step loops over the same plan as the render step and reads each object from its rendered file."""
    tasks = ROOT / "roles" / "sidekiq_kubernetes" / "tasks"
    render = yaml.safe_load((tasks / "render.yml").read_text())
    apply = yaml.safe_load((tasks / "apply.yml").read_text())
    (render_task,) = [task for task in render if "ansible.builtin.template" in task]
    (apply_task,) = [task for task in apply if task.get("kubernetes.core.k8s", {}).get("state") == "present"]
    module = apply_task["kubernetes.core.k8s"]

    assert render_task["loop"] == apply_task["loop"] == "{{ _sidekiq_kubernetes_plan }}"
    assert render_task["ansible.builtin.template"]["dest"] == module["src"]
    assert "definition" not in module
    assert "resource_definition" not in module
    assert module["apply"] is True
    assert module["server_side_apply"]["field_manager"] == "{{ sidekiq_kubernetes_field_manager }}"


AUTOSCALER_BAD_INPUTS = {
    "missing image": ({"autoscaler_kubernetes_image": ""}, "autoscaler_kubernetes_image is empty"),
    "schedule not cron": (
        {"autoscaler_kubernetes_schedule": "every minute"},
        'autoscaler_kubernetes_schedule "every minute" is invalid',
    ),
    "deadline too short": ({"autoscaler_kubernetes_deadline": 5}, "autoscaler_kubernetes_deadline 5 is invalid"),
    "no pool to size": (
        {"sidekiq_kubernetes_pools": {"default": {"autoscaler": "none"}}},
        "no pool of sidekiq_pools has autoscaler sidekiq-ops",
    ),
    "pool name clash": (
        {"sidekiq_pools": [{"name": "ops-autoscaler", "queues": ["default"], "processes": {"min": 1, "max": 3}}],
         "sidekiq_app_queues": []},
        'pool "ops-autoscaler" would share the name sidekiq-ops-autoscaler',
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(AUTOSCALER_BAD_INPUTS))
def test_bad_autoscaler_input_rejected(case: str, tmp_path: Path) -> None:
    overrides, message = AUTOSCALER_BAD_INPUTS[case]
    review_dir = tmp_path / "review"

    result = run_playbook(ENVIRONMENTS["staging"], review_dir, "-e", json.dumps(overrides))

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Invalid autoscaler CronJob settings, nothing was rendered or applied" in output
    assert message in output.replace("\n", " "), output
    assert not (review_dir / "autoscaler").exists()


def test_disabled_autoscaler_suspends_cronjob(tmp_path: Path) -> None:
    review_dir = tmp_path / "review"

    result = run_playbook(ENVIRONMENTS["staging"], review_dir, "-e", json.dumps({"autoscaler_enabled": False}))

    assert result.returncode == 0, result.stdout + result.stderr
    cronjob = yaml.safe_load((review_dir / "autoscaler" / "80-cronjob-sidekiq-ops-autoscaler.yaml").read_text())
    assert cronjob["spec"]["suspend"] is True
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_systemd_target_renders_no_cronjob(tmp_path: Path) -> None:
    review_dir = tmp_path / "review"

    result = run_playbook(ENVIRONMENTS["staging"], review_dir, "-e", json.dumps({"autoscaler_target": "systemd"}))

    assert result.returncode == 0, result.stdout + result.stderr
    assert list(review_dir.glob("*-deployment-sidekiq-default.yaml"))
    assert not (review_dir / "autoscaler").exists()


def test_prune_keeps_autoscaler_objects() -> None:
    """The worker role prunes only objects of component worker.

    The CronJob objects of the autoscaler role carry the same app labels, so without that selector every apply of
    the worker role would delete them.
    """
    apply = yaml.safe_load((ROLES / "sidekiq_kubernetes" / "tasks" / "apply.yml").read_text())
    (find_task,) = [task for task in apply if "kubernetes.core.k8s_info" in task]
    selectors = find_task["kubernetes.core.k8s_info"]["label_selectors"]

    assert "app.kubernetes.io/component=worker" in selectors
    assert "app.kubernetes.io/managed-by=sidekiq-ops" in selectors


def test_autoscaler_apply_reads_rendered_files() -> None:
    tasks = ROLES / "autoscaler" / "tasks"
    render = yaml.safe_load((tasks / "kubernetes_render.yml").read_text())
    apply = yaml.safe_load((tasks / "kubernetes_apply.yml").read_text())
    (render_task,) = [task for task in render if "ansible.builtin.template" in task]
    (apply_task,) = [task for task in apply if "kubernetes.core.k8s" in task]
    module = apply_task["kubernetes.core.k8s"]

    assert render_task["loop"] == apply_task["loop"] == "{{ __autoscaler_kubernetes_objects }}"
    assert render_task["ansible.builtin.template"]["dest"] == module["src"]
    assert module["apply"] is True
    assert module["server_side_apply"]["field_manager"] == "{{ sidekiq_kubernetes_field_manager }}"


def test_shared_variables_match_between_roles() -> None:
    """The autoscaler role reads the sidekiq_kubernetes role's variables under the same names: defaults, types and
    choices must agree, so a variable means the same whichever role runs first."""
    autoscaler_defaults = yaml.safe_load((ROLES / "autoscaler" / "defaults" / "main.yml").read_text())
    worker_defaults = yaml.safe_load((ROLES / "sidekiq_kubernetes" / "defaults" / "main.yml").read_text())
    autoscaler_specs = yaml.safe_load((ROLES / "autoscaler" / "meta" / "argument_specs.yml").read_text())
    worker_specs = yaml.safe_load((ROLES / "sidekiq_kubernetes" / "meta" / "argument_specs.yml").read_text())
    autoscaler_options = autoscaler_specs["argument_specs"]["main"]["options"]
    worker_options = worker_specs["argument_specs"]["main"]["options"]
    shared = [name for name in autoscaler_defaults if name.startswith("sidekiq_")]

    assert "sidekiq_kubernetes_namespace" in shared
    for name in shared:
        assert autoscaler_defaults[name] == worker_defaults[name], name
        assert name in autoscaler_options, f"{name} is not in the autoscaler role's argument specs"
        for key in ("type", "default", "choices", "elements", "no_log"):
            assert autoscaler_options[name].get(key) == worker_options[name].get(key), f"{name}: {key}"
    for name in autoscaler_defaults:
        assert name in autoscaler_options, f"{name} is not in the autoscaler role's argument specs"


def test_unreachable_cluster_fails_once_with_the_fix(tmp_path: Path) -> None:
    """Without an API server (none can run on these machines), the apply step fails once, naming the fix."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "closed", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
                "users": [{"name": "deployer", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "closed", "context": {"cluster": "closed", "user": "deployer"}}],
                "current-context": "closed",
            }
        )
    )
    command = playbook_command(
        ENVIRONMENTS["test"],
        tmp_path / "review",
        "-e",
        json.dumps({"sidekiq_kubernetes_kubeconfig": str(kubeconfig), "sidekiq_kubernetes_context": "closed"}),
    )
    command.remove("--tags")
    command.remove("render")

    result = subprocess.run(command, cwd=ROOT, env=ansible_environment(), capture_output=True, text=True, timeout=300)

    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert "The Kubernetes API could not be reached, so nothing was applied" in output, output
    assert 'Set sidekiq_kubernetes_context (now "closed")' in output, output
    assert "run with --tags render" in output, output
    assert "TASK [sidekiq_ops.fleet.sidekiq_kubernetes : Apply each rendered file" not in output, output
    assert list((tmp_path / "review").glob("*.yaml")), "the objects were not rendered before the check"
