"""Run playbooks/autoscale.yml with each kind of backend and check which plays reach which hosts.

The systemd backend reads and changes units on the hosts of sidekiq_workers. Every other backend must leave those
hosts alone and run the autoscale module once on localhost. The worker host in these inventories listens nowhere
(127.0.0.1, port 1), so any attempt to reach it shows up as UNREACHABLE in the output.

The kubernetes backend scales Deployments through the local fake API server of test_kubernetes_scaling.py, with
Sidekiq heartbeats and jobs in a real redis-server written as test_autoscale_backends.py writes them.

The CronJob of roles/autoscaler runs the playbook with the extra variables of its ConfigMap. One test renders that
ConfigMap for inventories/staging and runs the CronJob's own command from the project directory, as the pod does.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from sidekiq_fixtures import RedisServer, running_redis  # type: ignore[import-not-found]
from test_autoscale_backends import DEFAULT, MISSING, add_process, enqueue_backlog  # type: ignore[import-not-found]
from test_kubernetes_scaling import DEPLOYMENT, NAMESPACE, TOKEN, FakeApiServer, make_handler  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "autoscale.yml"
STAGING = ROOT / "inventories" / "staging"
WORKER = "worker-unreachable"
SINGLE_TASK_PLAY = "PLAY [Scale every pool with the kubernetes, aws_asg or aws_ecs backend]"
SINGLE_TASK = "TASK [Lock, read, decide, scale and record every pool]"
SYSTEMD_READ_PLAY = "PLAY [Read the Sidekiq units on every worker host]"
SYSTEMD_DECIDE_TASK = "TASK [Decide every pool and plan the units to start and stop]"


def ansible_environment(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def run(command: list[str], **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=ROOT,
        env=ansible_environment(**environment),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_autoscale(inventory: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    ansible_playbook = str(ROOT / ".venv" / "bin" / "ansible-playbook")
    return run([ansible_playbook, "-i", str(inventory), str(PLAYBOOK), *arguments])


def write_inventory(directory: Path, variables: dict[str, Any]) -> Path:
    """Write an inventory with one worker host that cannot be reached and the given group_vars/all."""
    hosts = {
        "all": {
            "children": {
                "sidekiq_workers": {
                    "hosts": {WORKER: {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_connection": "ssh"}}
                }
            }
        }
    }
    (directory / "group_vars" / "all").mkdir(parents=True)
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (directory / "group_vars" / "all" / "fleet.yml").write_text(yaml.safe_dump(variables))
    return directory


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


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


def kubernetes_variables(redis_server: RedisServer, api_server: FakeApiServer, pools: list[Any]) -> dict[str, Any]:
    return {
        "sidekiq_app": "shop",
        "sidekiq_pools": pools,
        "autoscale_backend": "kubernetes",
        "autoscale_redis_url": redis_server.url,
        "autoscale_kubernetes_namespace": NAMESPACE,
        "autoscale_kubernetes_host": api_server.url,
        "autoscale_kubernetes_api_key": TOKEN,
        "autoscale_kubernetes_request_timeout": 5,
    }


def fleet_variables(redis_server: RedisServer, minimum: int = 1) -> dict[str, Any]:
    return {
        "sidekiq_app": "demo",
        "sidekiq_pools": [{"name": "bulk", "queues": ["default"], "processes": {"min": minimum, "max": 3}}],
        "autoscale_redis_url": redis_server.url,
    }


def busy_pod_with_backlog(redis_server: RedisServer, api_server: FakeApiServer) -> None:
    """Run one pod of sidekiq-default with every thread busy and a backlog behind it."""
    client = redis_server.client()
    api_server.add_running_pod(f"{DEPLOYMENT}-a")
    add_process(client, f"{DEPLOYMENT}-a", busy=10)
    enqueue_backlog(client)


def test_bogus_backend_fails_before_any_host() -> None:
    result = run_autoscale(STAGING, "--check", "-e", "autoscale_backend=bogus")

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert (
        'autoscale_backend "bogus" is invalid; set it to one of systemd, kubernetes, aws_asg, aws_ecs'
        in output.replace("\n", " ")
    ), output
    assert "-e autoscale_backend=<backend>" in output
    assert SYSTEMD_READ_PLAY not in output
    assert SINGLE_TASK_PLAY not in output
    assert "worker-1" not in output


def test_syntax_check_with_kubernetes_backend() -> None:
    result = run_autoscale(STAGING, "--syntax-check", "-e", "autoscale_backend=kubernetes")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "playbook: " in result.stdout


@pytest.mark.parametrize("source", ["group_vars", "extra_vars"])
def test_kubernetes_backend_leaves_workers_alone(source: str, tmp_path: Path, redis_server: RedisServer) -> None:
    variables = fleet_variables(redis_server)
    arguments = ["--check"]
    if source == "group_vars":
        variables["autoscale_backend"] = "kubernetes"
    else:
        arguments += ["-e", "autoscale_backend=kubernetes"]
    inventory = write_inventory(tmp_path / "inventory", variables)

    result = run_autoscale(inventory, *arguments)

    output = result.stdout + result.stderr
    assert WORKER not in output, output
    assert output.count("skipping: no hosts matched") == 4, output
    assert SYSTEMD_DECIDE_TASK not in output
    assert SINGLE_TASK in output, output


def test_systemd_backend_skips_single_task_play(tmp_path: Path, redis_server: RedisServer) -> None:
    # With processes.min 0 and empty queues the pool stays at 0 processes. The run then has nothing to place on the
    # unreadable host, ends without a problem and reaches the last play.
    inventory = write_inventory(tmp_path / "inventory", fleet_variables(redis_server, minimum=0))

    result = run_autoscale(inventory, "--check")

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert SYSTEMD_READ_PLAY in output
    assert f"fatal: [{WORKER}]: UNREACHABLE!" in output, output
    assert SYSTEMD_DECIDE_TASK in output, output
    single_task_play = output[output.index(SINGLE_TASK_PLAY) :]
    assert single_task_play.split("\n", 2)[1] == "skipping: no hosts matched", output
    assert SINGLE_TASK not in output


def test_cronjob_command_skips_worker_hosts(tmp_path: Path) -> None:
    """Render the staging CronJob, then run its command as the pod would: the ConfigMap is the extra vars file."""
    review_dir = tmp_path / "review"
    rendered = run(
        [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", str(STAGING),
         str(ROOT / "playbooks" / "kubernetes.yml"), "--tags", "render",
         "-e", json.dumps({"sidekiq_kubernetes_review_dir": str(review_dir)})]
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    autoscaler_dir = review_dir / "autoscaler"
    configmap = yaml.safe_load((autoscaler_dir / "20-configmap-sidekiq-ops-autoscaler.yaml").read_text())
    cronjob = yaml.safe_load((autoscaler_dir / "80-cronjob-sidekiq-ops-autoscaler.yaml").read_text())
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    vars_file = tmp_path / "autoscale.yml"
    vars_file.write_text(configmap["data"]["autoscale.yml"])
    config_path = "@/etc/sidekiq-ops/autoscale.yml"
    assert config_path in container["command"]
    command = [f"@{vars_file}" if argument == config_path else argument for argument in container["command"]]
    command[0] = str(ROOT / ".venv" / "bin" / command[0])
    # The pod builds REDIS_URL from the Secret. This one points at a port where nothing listens.
    redis_url = "redis://sidekiq:secret@127.0.0.1:1/0"

    expanded = run(
        [str(ROOT / ".venv" / "bin" / "ansible"), "localhost", "-m", "ansible.builtin.debug",
         "-a", "var=autoscale_redis_url", "-e", f"@{vars_file}"],
        REDIS_URL=redis_url,
    )  # fmt: skip
    result = run(command, REDIS_URL=redis_url)

    assert expanded.returncode == 0, expanded.stdout + expanded.stderr
    assert redis_url in expanded.stdout
    assert "lookup(" not in expanded.stdout
    output = result.stdout + result.stderr
    assert "worker-1" not in output, output
    assert "worker-2" not in output, output
    assert SINGLE_TASK in output, output


def test_kubernetes_backend_scales_deployment(
    tmp_path: Path, redis_server: RedisServer, api_server: FakeApiServer
) -> None:
    busy_pod_with_backlog(redis_server, api_server)
    inventory = write_inventory(tmp_path / "inventory", kubernetes_variables(redis_server, api_server, [DEFAULT]))

    result = run_autoscale(inventory)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert api_server.replicas == 4
    assert "autoscale shop/default scale_out 1 -> 4" in output, output
    assert WORKER not in output
    assert TOKEN not in output


def test_kubernetes_problem_fails_after_logging(
    tmp_path: Path, redis_server: RedisServer, api_server: FakeApiServer
) -> None:
    """A pool whose Deployment is missing fails the run, after the other pool was scaled and logged."""
    busy_pod_with_backlog(redis_server, api_server)
    variables = kubernetes_variables(redis_server, api_server, [MISSING, DEFAULT])
    inventory = write_inventory(tmp_path / "inventory", variables)

    result = run_autoscale(inventory)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert api_server.replicas == 4
    assert "autoscale shop/default scale_out 1 -> 4" in output, output
    assert "Autoscaling could not scale every pool: missing: " in output.replace("\n", " "), output
    assert output.index("TASK [Log each decision]") < output.index("TASK [Fail the run when a pool could not")


def test_kubernetes_skips_pools_of_other_autoscalers(
    tmp_path: Path, redis_server: RedisServer, api_server: FakeApiServer
) -> None:
    """Without a pools filter, a manual run sizes only the pools that sidekiq-ops autoscales on Kubernetes."""
    busy_pod_with_backlog(redis_server, api_server)
    fixed = dict(MISSING, name="fixed", processes={"min": 2, "max": 2})
    variables = kubernetes_variables(redis_server, api_server, [MISSING, fixed, DEFAULT])
    variables["sidekiq_kubernetes_pools"] = {"missing": {"autoscaler": "keda"}}
    inventory = write_inventory(tmp_path / "inventory", variables)

    result = run_autoscale(inventory)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert api_server.replicas == 4
    assert "autoscale shop/default scale_out 1 -> 4" in output, output
    assert "sidekiq-missing" not in output, output
    assert "autoscale shop/fixed" not in output, output


def test_kubernetes_without_own_pools_ends_quietly(
    tmp_path: Path, redis_server: RedisServer, api_server: FakeApiServer
) -> None:
    variables = kubernetes_variables(redis_server, api_server, [DEFAULT])
    variables["sidekiq_kubernetes_pools"] = {"default": {"autoscaler": "hpa"}}
    inventory = write_inventory(tmp_path / "inventory", variables)

    result = run_autoscale(inventory)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "No pool is sized by sidekiq-ops on Kubernetes" in output, output
    assert "TASK [Lock, read, decide, scale and record every pool]" not in output, output
    assert api_server.requests == []
    assert redis_server.client().keys("sidekiq-ops:*") == []
