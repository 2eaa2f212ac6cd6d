"""Tests of the helpers that sidekiq_instance uses to find a process in Redis and read its environment file.

The environment file is rendered from the role's own template, pool.env.j2, so the parser is checked against the
escaping that deploys really write. Redis lookups run against a redis-server started here on a free loopback port.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import redis
from ansible.plugins.filter.core import comment

from ansible_collections.sidekiq_ops.fleet.plugins.filter import pools as pool_filters
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import systemd_instances

ROOT = Path(__file__).resolve().parents[2]
POOL_ENV_TEMPLATE = ROOT / "roles" / "sidekiq" / "templates" / "pool.env.j2"

# Values that a naive KEY="value" writer or reader gets wrong: quotes, backslashes next to quotes, a trailing
# backslash, shell metacharacters, '=' and '#' inside the value, and non-ASCII text.
TRICKY_VALUES = {
    "QUOTED": 'He said "hi"',
    "WINDOWS_PATH": "C:\\path\\to\\",
    "BACKSLASH_QUOTE": 'a\\"b',
    "DOUBLE_BACKSLASH": "x\\\\y",
    "ONLY_QUOTE": '"',
    "ONLY_BACKSLASH": "\\",
    "SHELL": "$HOME `id` $(id) ${PATH}",
    "EQUALS_HASH": "a=b # not a comment",
    "SPACES": "  padded  ",
    "EMPTY": "",
    "UNICODE": "grüße ✓",
}


def render_pool_env(pool: dict[str, Any], **variables: Any) -> str:
    """Render roles/sidekiq/templates/pool.env.j2 with jinja2, the collection's filters and Ansible's comment."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(POOL_ENV_TEMPLATE.parent)),
        trim_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    for name, function in pool_filters.FilterModule().filters().items():
        environment.filters[f"sidekiq_ops.fleet.{name}"] = function
    environment.filters["comment"] = comment
    context = {
        "ansible_managed": "Ansible managed",
        "pool": pool,
        "sidekiq_redis_url": "redis://127.0.0.1:6379/0",
        "sidekiq_environment": "production",
        "sidekiq_redis_tls": False,
        "sidekiq_redis_tls_ca_file": "",
        "sidekiq_app_env": {},
        "sidekiq_app_secret_env": {},
        **variables,
    }
    return environment.get_template(POOL_ENV_TEMPLATE.name).render(context)


def write_env_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pool.env"
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- read_environment_file ---


def test_env_file_round_trip(tmp_path: Path) -> None:
    redis_url = pool_filters.redis_url("::1", username="sidekiq", password='p@ss/w:rd%#"\\')
    text = render_pool_env(
        {"name": "bulk", "queues": ["default"], "concurrency": 7},
        sidekiq_redis_url=redis_url,
        sidekiq_environment="staging",
        sidekiq_app_env=TRICKY_VALUES,
    )
    values = systemd_instances.read_environment_file(write_env_file(tmp_path, text))
    assert values == {
        "REDIS_URL": redis_url,
        "APP_ENV": "staging",
        "SIDEKIQ_POOL": "bulk",
        "RAILS_MAX_THREADS": "7",
        "DB_POOL": "8",
        **TRICKY_VALUES,
    }


@pytest.mark.parametrize(("name", "value"), TRICKY_VALUES.items(), ids=TRICKY_VALUES.keys())
def test_env_file_tricky_value(tmp_path: Path, name: str, value: str) -> None:
    text = render_pool_env({"name": "bulk", "queues": ["default"]}, sidekiq_app_secret_env={name: value})
    assert systemd_instances.read_environment_file(write_env_file(tmp_path, text))[name] == value


def test_env_file_escaping_as_rendered(tmp_path: Path) -> None:
    text = render_pool_env(
        {"name": "bulk", "queues": ["default"]},
        sidekiq_app_env={"QUOTED": 'say "hi"', "PATH_END": "C:\\dir\\", "MIXED": '\\"'},
    )
    lines = text.splitlines()
    assert 'QUOTED="say \\"hi\\""' in lines
    assert 'PATH_END="C:\\\\dir\\\\"' in lines
    assert 'MIXED="\\\\\\""' in lines


def test_env_file_override_order(tmp_path: Path) -> None:
    text = render_pool_env(
        {"name": "bulk", "queues": ["default"], "env": {"LEVEL": "pool", "POOL_ONLY": "1"}},
        sidekiq_app_env={"LEVEL": "app", "APP_ONLY": "1", "SIDEKIQ_POOL": "overridden"},
        sidekiq_app_secret_env={"LEVEL": "secret"},
    )
    values = systemd_instances.read_environment_file(write_env_file(tmp_path, text))
    assert values["LEVEL"] == "secret"
    assert values["POOL_ONLY"] == "1"
    assert values["APP_ONLY"] == "1"
    assert values["SIDEKIQ_POOL"] == "overridden"


def test_env_file_tls_ca_file(tmp_path: Path) -> None:
    with_tls = render_pool_env(
        {"name": "bulk", "queues": ["default"]},
        sidekiq_redis_tls=True,
        sidekiq_redis_tls_ca_file="/etc/ssl/redis-ca.pem",
    )
    without_tls = render_pool_env({"name": "bulk", "queues": ["default"]}, sidekiq_redis_tls_ca_file="/etc/x.pem")
    with_tls_values = systemd_instances.read_environment_file(write_env_file(tmp_path, with_tls))
    without_tls_values = systemd_instances.read_environment_file(write_env_file(tmp_path, without_tls))
    assert with_tls_values["SSL_CERT_FILE"] == "/etc/ssl/redis-ca.pem"
    assert "SSL_CERT_FILE" not in without_tls_values


def test_env_file_defaults_from_concurrency(tmp_path: Path) -> None:
    text = render_pool_env({"name": "bulk", "queues": ["default"]})
    values = systemd_instances.read_environment_file(write_env_file(tmp_path, text))
    assert values["RAILS_MAX_THREADS"] == "10"
    assert values["DB_POOL"] == "11"


def test_env_file_skips_comments_and_blanks(tmp_path: Path) -> None:
    text = '#\n# Ansible managed\n#\n\n   \nnot a variable\n# REDIS_URL="commented"\nREDIS_URL="redis://h:1/0"\n'
    assert systemd_instances.read_environment_file(write_env_file(tmp_path, text)) == {"REDIS_URL": "redis://h:1/0"}


def test_env_file_unquoted_values(tmp_path: Path) -> None:
    text = 'PLAIN=value\nSINGLE="\nEMPTY=\nEQUALS=a=b\n'
    values = systemd_instances.read_environment_file(write_env_file(tmp_path, text))
    assert values["PLAIN"] == "value"
    assert values["SINGLE"] == '"'
    assert values["EMPTY"] == ""
    assert values["EQUALS"] == "a=b"


def test_env_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        systemd_instances.read_environment_file(str(tmp_path / "absent.env"))


# --- find_identity and busy_threads against a real redis-server ---


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Start a redis-server for this module on a free loopback port; stop it by its PID afterwards."""
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise AssertionError(f"redis-server exited with {process.returncode}; see {directory / 'redis.log'}")
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.terminate()
                raise AssertionError(f"redis-server on port {port} did not answer PING within 10 s") from None
            time.sleep(0.05)
    client.close()
    yield port
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def client(redis_port: int) -> Iterator[redis.Redis]:
    connection = redis.Redis(host="127.0.0.1", port=redis_port)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


def register_process(client: redis.Redis, identity: str, busy: int | None, quiet: bool = False) -> None:
    """Write a process entry the way Sidekiq 6.4's heartbeat does: a member of `processes` and a hash."""
    hostname, pid, _ = identity.rsplit(":", 2)
    info = {"hostname": hostname, "pid": int(pid), "concurrency": 5, "queues": ["default"], "tag": "bulk"}
    client.sadd("processes", identity)
    client.hset(identity, mapping={"info": json.dumps(info), "beat": time.time(), "quiet": str(quiet).lower()})
    if busy is not None:
        client.hset(identity, "busy", busy)
    client.expire(identity, 60)


def test_find_identity_by_host_and_pid(client: redis.Redis) -> None:
    register_process(client, "worker1:4242:0f3a9c1b2d4e", busy=0)
    register_process(client, "worker2:4242:1a2b3c4d5e6f", busy=0)
    register_process(client, "worker1:42:9f8e7d6c5b4a", busy=0)
    register_process(client, "worker1:424242:aaaaaaaaaaaa", busy=0)
    assert systemd_instances.find_identity(client, 4242, "worker1") == "worker1:4242:0f3a9c1b2d4e"
    assert systemd_instances.find_identity(client, 42, "worker1") == "worker1:42:9f8e7d6c5b4a"
    assert systemd_instances.find_identity(client, 4242, "worker2") == "worker2:4242:1a2b3c4d5e6f"


def test_find_identity_not_registered(client: redis.Redis) -> None:
    assert systemd_instances.find_identity(client, 4242, "worker1") is None
    register_process(client, "worker2:4242:1a2b3c4d5e6f", busy=0)
    register_process(client, "worker1:4243:1a2b3c4d5e6f", busy=0)
    assert systemd_instances.find_identity(client, 4242, "worker1") is None


def test_find_identity_needs_exact_match(client: redis.Redis) -> None:
    register_process(client, "worker10:4242:1a2b3c4d5e6f", busy=0)
    register_process(client, "worker1:424242:1a2b3c4d5e6f", busy=0)
    register_process(client, "worker1:14242:1a2b3c4d5e6f", busy=0)
    assert systemd_instances.find_identity(client, 4242, "worker1") is None
    assert systemd_instances.find_identity(client, 42, "worker1") is None


def test_find_identity_defaults_to_local_host(client: redis.Redis) -> None:
    identity = f"{socket.gethostname()}:31337:5e5e5e5e5e5e"
    register_process(client, identity, busy=2)
    register_process(client, "elsewhere:31337:5e5e5e5e5e5e", busy=2)
    assert systemd_instances.find_identity(client, 31337) == identity


def test_find_identity_decoded_client(redis_port: int, client: redis.Redis) -> None:
    register_process(client, "worker1.example.internal:7:abcdef012345", busy=1)
    decoded = redis.Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
    try:
        found = systemd_instances.find_identity(decoded, 7, "worker1.example.internal")
    finally:
        decoded.close()
    assert found == "worker1.example.internal:7:abcdef012345"


def test_find_identity_ignores_malformed_members(client: redis.Redis) -> None:
    client.sadd("processes", "worker1", "worker1:4242", "")
    assert systemd_instances.find_identity(client, 4242, "worker1") is None


def test_busy_threads_reads_busy_field(client: redis.Redis) -> None:
    register_process(client, "worker1:4242:0f3a9c1b2d4e", busy=3)
    register_process(client, "worker1:4243:0f3a9c1b2d4f", busy=0)
    assert systemd_instances.busy_threads(client, "worker1:4242:0f3a9c1b2d4e") == 3
    assert systemd_instances.busy_threads(client, "worker1:4243:0f3a9c1b2d4f") == 0


def test_busy_threads_follows_heartbeat(client: redis.Redis) -> None:
    identity = "worker1:4242:0f3a9c1b2d4e"
    register_process(client, identity, busy=5)
    assert systemd_instances.busy_threads(client, identity) == 5
    register_process(client, identity, busy=1, quiet=True)
    assert systemd_instances.busy_threads(client, identity) == 1


def test_busy_threads_when_hash_is_gone(client: redis.Redis) -> None:
    assert systemd_instances.busy_threads(client, "worker1:4242:0f3a9c1b2d4e") is None
    register_process(client, "worker1:4244:0f3a9c1b2d40", busy=None)
    assert systemd_instances.busy_threads(client, "worker1:4244:0f3a9c1b2d40") is None
