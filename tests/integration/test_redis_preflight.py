"""Bad input for the redis role: each case must fail in tasks/preflight.yml, before anything changes.

Each case runs the whole role with ansible-playbook in check mode against localhost (connection local) and reads
the result through the ansible.posix.json callback. A case passes when the only failed task is the expected
preflight check and its message names the bad value and the fix. No task may report a change, and every task that
ran must come from the argument spec validation or from preflight.yml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
PREFLIGHT_FILE = "roles/redis/tasks/preflight.yml"

PLAYBOOK = """\
- name: Run the redis role against this machine in check mode
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: Run the role
      ansible.builtin.include_role:
        name: sidekiq_ops.fleet.redis
        tasks_from: "{{ redis_test_entry_point }}"
"""

# An override with this value removes the variable, so the role default applies.
UNSET = object()

VALID_VARS: dict[str, Any] = {
    "redis_sidekiq_password": "preflight-test-sidekiq-secret",
    "redis_admin_password": "preflight-test-admin-secret",
    "sidekiq_pools": [{"name": "default", "queues": ["default"], "concurrency": 5, "processes": {"min": 1, "max": 2}}],
}


def run_role(tmp_path: Path, overrides: dict[str, Any], entry_point: str = "main") -> dict[str, Any]:
    """Run the role in check mode with VALID_VARS plus overrides and return the report of the JSON callback."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    variables = tmp_path / "vars.json"
    merged = {key: value for key, value in {**VALID_VARS, **overrides}.items() if value is not UNSET}
    variables.write_text(json.dumps({**merged, "redis_test_entry_point": entry_point}))

    # An empty config file keeps any ansible.cfg of the machine or the user out of the run.
    config = tmp_path / "ansible.cfg"
    config.write_text("")
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
    }

    completed = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "--check", str(playbook), "-e", f"@{variables}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.stdout.strip(), f"ansible-playbook printed no report; stderr:\n{completed.stderr}"
    report: dict[str, Any] = json.loads(completed.stdout)
    report["returncode"] = completed.returncode
    return report


def task_results(report: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Return (task, result on localhost) for every task that ran, in order."""
    results = []
    for play in report["plays"]:
        for task in play["tasks"]:
            results.append((task["task"], task["hosts"]["localhost"]))
    return results


def failure_message(result: dict[str, Any]) -> str:
    """Return the failure messages of a task result, including those of its failed loop items."""
    messages = [result.get("msg", "")]
    messages.extend(item.get("msg", "") for item in result.get("results", []) if item.get("failed"))
    return "\n".join(messages)


BAD_INPUT = [
    pytest.param(
        {"redis_maxmemory_policy": "allkeys-lru"},
        "Preflight | Check that Redis never evicts Sidekiq jobs",
        ["redis_maxmemory_policy 'allkeys-lru'", "Set redis_maxmemory_policy: noeviction"],
        id="eviction-allkeys-lru",
    ),
    pytest.param(
        {"redis_maxmemory_policy": "volatile-lru"},
        "Preflight | Check that Redis never evicts Sidekiq jobs",
        ["redis_maxmemory_policy 'volatile-lru'", "Set redis_maxmemory_policy: noeviction"],
        id="eviction-volatile-lru",
    ),
    pytest.param(
        {"redis_sidekiq_password": UNSET},
        "Preflight | Check redis_sidekiq_password",
        ["redis_sidekiq_password is the placeholder CHANGE_ME", "Set it to a long random secret"],
        id="sidekiq-password-not-set",
    ),
    pytest.param(
        {"redis_admin_password": ""},
        "Preflight | Check redis_admin_password",
        ["redis_admin_password is empty", "Set it to a long random secret"],
        id="admin-password-empty",
    ),
    pytest.param(
        {"redis_port": 70000},
        "Preflight | Check redis_port",
        ["redis_port 70000 is out of range", "Set it to a TCP port from 1 to 65535"],
        id="port-out-of-range",
    ),
    pytest.param(
        {"redis_port": 0},
        "Preflight | Check that Redis has a port to listen on",
        ["redis_port is 0 and redis_tls_enabled is false", "Set redis_port to a port such as 6379"],
        id="plain-port-off-without-tls",
    ),
    pytest.param(
        {"redis_extra_config": {"maxmemory-policy": "allkeys-lru"}},
        "Preflight | Check redis_extra_config",
        ["directives the role renders from its own variables (maxmemory-policy)", "Use the role variable"],
        id="eviction-through-extra-config",
    ),
    pytest.param(
        {"redis_sidekiq_acl_rules": "nopass ~* +@all"},
        "Preflight | Check the ACL rules",
        ["redis_sidekiq_acl_rules 'nopass ~* +@all' contains a password", "Keep only key, channel and command rules"],
        id="acl-rules-without-password",
    ),
    pytest.param(
        {"redis_tls_enabled": True, "redis_tls_cert_file": "{tmp}/missing/redis.crt"},
        "Preflight | Check that every TLS file is given",
        [
            "the server certificate is missing",
            "redis_tls_cert_src is empty",
            "redis_tls_cert_file '{tmp}/missing/redis.crt' does not exist",
            "Set redis_tls_cert_src to a PEM file on the control node",
        ],
        id="tls-without-certificate",
    ),
]


@pytest.mark.parametrize(("overrides", "failed_task", "message_parts"), BAD_INPUT)
def test_preflight_rejects_bad_input(
    tmp_path: Path, overrides: dict[str, Any], failed_task: str, message_parts: list[str]
) -> None:
    overrides = {
        key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in overrides.items()
    }

    report = run_role(tmp_path, overrides)

    results = task_results(report)
    failed = [(task, result) for task, result in results if result.get("failed")]

    assert report["returncode"] != 0
    assert len(failed) == 1, f"expected one failed task, got {[task['name'] for task, _ in failed]}"
    task, result = failed[0]
    assert task["name"].endswith(failed_task)
    assert PREFLIGHT_FILE in task["path"]
    message = failure_message(result)
    for part in message_parts:
        assert part.format(tmp=tmp_path) in message
    assert report["stats"]["localhost"]["changed"] == 0
    for ran_task, _ in results:
        assert (
            PREFLIGHT_FILE in ran_task["path"]
            or ran_task["name"] == "Run the role"
            or "Validating arguments" in ran_task["name"]
        ), ran_task["name"]


def test_preflight_accepts_valid_input(tmp_path: Path) -> None:
    report = run_role(tmp_path, {}, entry_point="preflight")

    results = task_results(report)

    assert report["returncode"] == 0, [result.get("msg") for _, result in results if result.get("failed")]
    assert report["stats"]["localhost"]["failures"] == 0
    assert report["stats"]["localhost"]["changed"] == 0
    assert any(task["name"].endswith("Preflight | Check that Redis never evicts Sidekiq jobs") for task, _ in results)
