"""The staging and production inventories take the Redis passwords from AWS through the amazon.aws lookups.

Each test stores secrets in a moto server, runs the real ``ansible`` command against an inventory with the AWS
environment pointed at moto (``AWS_ENDPOINT_URL``), and reads the variable back with ansible.builtin.debug, which
templates it and so really runs the lookup. The checks without AWS prove that the lookups are lazy.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from scaling_aws_support import (  # type: ignore[import-not-found]
    REGION,
    MotoServer,
    aws_environment,
    running_moto,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
INVENTORIES = ("staging", "production")
ADHOC = (str(BIN / "ansible"), "-i")
SIDEKIQ_PASSWORD = "s1de/kiq:p@ss w0rd"
ADMIN_PASSWORD = "adm1n-#-secret"
# The region the inventories name (fleet_aws_region). moto keeps each region apart, and the test environment's
# AWS_REGION is another one, so a lookup finds the secrets only when it passes fleet_aws_region on.
INVENTORY_REGION = "eu-west-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with running_moto() as server:
        yield server


@pytest.fixture(autouse=True)
def clean_moto(moto: MotoServer) -> None:
    moto.reset()


def ansible_environment(home: Path, moto: MotoServer | None) -> dict[str, str]:
    environment = {
        **os.environ,
        **aws_environment(home),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(home / "ansible-tmp"),
        "ANSIBLE_HOME": str(home / "ansible-home"),
    }
    if moto is None:
        # No endpoint and no credentials: any AWS call would fail, so success proves that none was made.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            environment.pop(name, None)
        environment["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    else:
        environment["AWS_ENDPOINT_URL"] = moto.url
    return environment


def show_variable(inventory: str, variable: str, environment: dict[str, str], *extra: str) -> str:
    """Template `variable` for host redis-1 with ansible.builtin.debug and return its value."""
    result = subprocess.run(
        [*ADHOC, f"inventories/{inventory}", "redis-1", "-m", "ansible.builtin.debug", "-a", f"var={variable}", *extra],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _, _, payload = result.stdout.partition("=>")
    return str(json.loads(payload)[variable])


def store_parameters(moto: MotoServer, inventory: str) -> None:
    ssm = moto.client("ssm", region=INVENTORY_REGION)
    for name, value in (("sidekiq-password", SIDEKIQ_PASSWORD), ("admin-password", ADMIN_PASSWORD)):
        ssm.put_parameter(Name=f"/shop/{inventory}/redis/{name}", Value=value, Type="SecureString")


def test_environment_region_differs(tmp_path: Path) -> None:
    assert aws_environment(tmp_path)["AWS_REGION"] == REGION
    assert REGION != INVENTORY_REGION


def test_inventories_share_hosts() -> None:
    staging = (ROOT / "inventories" / "staging" / "hosts.yml").read_text()
    production = (ROOT / "inventories" / "production" / "hosts.yml").read_text()

    assert staging == production


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_ssm_parameters_resolve(moto: MotoServer, tmp_path: Path, inventory: str) -> None:
    store_parameters(moto, inventory)
    environment = ansible_environment(tmp_path, moto)

    assert show_variable(inventory, "redis_sidekiq_password", environment) == SIDEKIQ_PASSWORD
    assert show_variable(inventory, "sidekiq_redis_password", environment) == SIDEKIQ_PASSWORD
    assert show_variable(inventory, "redis_admin_password", environment) == ADMIN_PASSWORD


def test_secrets_manager_resolves(moto: MotoServer, tmp_path: Path) -> None:
    secrets = moto.client("secretsmanager", region=INVENTORY_REGION)
    secrets.create_secret(Name="/shop/production/redis/sidekiq-password", SecretString="from-secrets-manager")
    environment = ansible_environment(tmp_path, moto)

    value = show_variable(
        "production", "redis_sidekiq_password", environment, "-e", "fleet_secrets_store=secretsmanager"
    )

    assert value == "from-secrets-manager"


def test_missing_parameter_fails_clearly(moto: MotoServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [*ADHOC, "inventories/staging", "redis-1", "-m", "ansible.builtin.debug", "-a", "var=redis_sidekiq_password"],
        cwd=ROOT,
        env=ansible_environment(tmp_path, moto),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode != 0
    assert "/shop/staging/redis/sidekiq-password" in result.stdout + result.stderr


def test_vault_alternative_needs_no_aws(tmp_path: Path) -> None:
    environment = ansible_environment(tmp_path, None)

    value = show_variable(
        "staging",
        "redis_sidekiq_password",
        environment,
        "-e",
        "fleet_secrets_store=vault",
        "-e",
        "vault_redis_sidekiq_password=from-vault",
    )

    assert value == "from-vault"


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_inventory_and_syntax_need_no_aws(tmp_path: Path, inventory: str) -> None:
    environment = ansible_environment(tmp_path, None)
    commands = [
        [str(BIN / "ansible-inventory"), "-i", f"inventories/{inventory}", "--graph"],
        [str(BIN / "ansible-inventory"), "-i", f"inventories/{inventory}", "--host", "redis-1"],
        [str(BIN / "ansible-playbook"), "-i", f"inventories/{inventory}", "--syntax-check", "playbooks/site.yml"],
    ]

    outputs = []
    for command in commands:
        result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        outputs.append(result.stdout)

    assert "@sidekiq_workers:" in outputs[0]
    host_vars = json.loads(outputs[1])
    assert host_vars["fleet_secrets_store"] == "ssm"
    assert host_vars["fleet_aws_region"] == INVENTORY_REGION
    assert "lookup(" in host_vars["redis_sidekiq_password"]
