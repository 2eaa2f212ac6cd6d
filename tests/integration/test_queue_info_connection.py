"""connect() and read_state() against real redis-server processes: passwords, ACL users, TLS, Sentinel, sockets.

Certificates are made per test with the cryptography package (installed with ansible-core): a CA, a server
certificate for 127.0.0.1 and localhost, and a client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sidekiq_fixtures import RedisServer, free_port, running_redis  # type: ignore[import-not-found]

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    READER_ACL_RULES,
    REDIS_ARGUMENT_SPEC,
    RedisAuthenticationError,
    RedisPermissionError,
    RedisTLSError,
    RedisUnreachableError,
    connect,
    settings_from_params,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.sidekiq_state import read_state

PASSWORD = "correct horse battery staple"


def params(**options: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(REDIS_ARGUMENT_SPEC)
    values.update(redis_tls_verify=True, redis_socket_timeout=2.0)
    values.update(options)
    return values


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "plain") as server:
        yield server


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "password", password=PASSWORD) as server:
        yield server


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@dataclass
class Issued:
    """A key and its certificate, in memory for signing others and as PEM files for Redis and the client."""

    key: ec.EllipticCurvePrivateKey
    name: x509.Name
    cert_path: Path
    key_path: Path


def make_key_and_cert(
    directory: Path,
    name: str,
    issuer: Issued | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(key, subject, cert_path, key_path)


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    directory = tmp_path / "tls"
    directory.mkdir()
    ca = make_key_and_cert(directory, "test-ca", None, ca=True)
    server = make_key_and_cert(directory, "redis-server", ca, server=True)
    client = make_key_and_cert(directory, "sidekiq-ops", ca)
    other_ca = make_key_and_cert(directory, "unrelated-ca", None, ca=True)
    return Certificates(
        ca=ca.cert_path,
        server_cert=server.cert_path,
        server_key=server.key_path,
        client_cert=client.cert_path,
        client_key=client.key_path,
        other_ca=other_ca.cert_path,
    )


def tls_server_arguments(certificates: Certificates, port: int, client_certificates: str) -> tuple[str, ...]:
    return (
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(certificates.server_cert),
        "--tls-key-file", str(certificates.server_key),
        "--tls-ca-cert-file", str(certificates.ca),
        "--tls-auth-clients", client_certificates,
    )  # fmt: skip


def tls_client(certificates: Certificates) -> dict[str, Any]:
    """redis-py options for the helpers' own readiness checks against the TLS servers."""
    return {
        "ssl": True,
        "ssl_ca_certs": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key),
    }


@pytest.fixture
def tls_server(tmp_path: Path, certificates: Certificates) -> Iterator[RedisServer]:
    port = free_port()
    arguments = tls_server_arguments(certificates, port, "optional")
    with running_redis(
        tmp_path / "tls", port=port, extra_arguments=arguments, client_options=tls_client(certificates)
    ) as server:
        yield server


def test_password_accepted(password_server: RedisServer) -> None:
    client = connect(params(redis_host="127.0.0.1", redis_port=password_server.port, redis_password=PASSWORD))

    assert client.ping() is True


def test_wrong_password_rejected(password_server: RedisServer) -> None:
    with pytest.raises(RedisAuthenticationError) as raised:
        connect(params(redis_url=f"redis://:wrong-secret@127.0.0.1:{password_server.port}/0"))

    message = str(raised.value)
    assert message.startswith(f"Authentication to Redis at 127.0.0.1:{password_server.port} db 0 failed")
    assert "invalid username-password pair" in message
    assert "wrong-secret" not in message


def test_missing_password_rejected(password_server: RedisServer) -> None:
    with pytest.raises(RedisAuthenticationError) as raised:
        connect(params(redis_host="127.0.0.1", redis_port=password_server.port))

    assert "Authentication required" in str(raised.value)


def test_password_from_environment(password_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{password_server.port}/0")
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)

    assert connect(params()).ping() is True


def test_unreachable_port() -> None:
    port = free_port()

    with pytest.raises(RedisUnreachableError) as raised:
        connect(params(redis_host="127.0.0.1", redis_port=port))

    assert str(raised.value).startswith(f"Could not connect to Redis at 127.0.0.1:{port} db 0")
    assert "Connection refused" in str(raised.value)


def test_acl_user_with_reader_rules(password_server: RedisServer) -> None:
    # execute_command is untyped in redis-py; ACL SETUSER takes the rules as one string each, as in redis.conf.
    admin: Any = password_server.client()
    admin.execute_command("ACL", "SETUSER", "sidekiq-ops", "on", ">reader-secret", *READER_ACL_RULES.split())
    admin.execute_command("ACL", "SETUSER", "too-narrow", "on", ">narrow-secret", "+ping", "+@read", "~*")
    admin.sadd("queues", "default")

    reader = connect(
        params(redis_host="127.0.0.1", redis_port=password_server.port, redis_username="sidekiq-ops",
               redis_password="reader-secret")
    )  # fmt: skip
    narrow = connect(
        params(redis_host="127.0.0.1", redis_port=password_server.port, redis_username="too-narrow",
               redis_password="narrow-secret")
    )  # fmt: skip

    assert list(read_state(reader).queues) == ["default"]
    with pytest.raises(RedisPermissionError) as raised:
        read_state(narrow)
    assert READER_ACL_RULES in str(raised.value)


def test_tls_with_ca_file(tls_server: RedisServer, certificates: Certificates) -> None:
    client = connect(
        params(redis_url=f"rediss://127.0.0.1:{tls_server.port}/0", redis_tls_ca_file=str(certificates.ca))
    )

    assert client.ping() is True
    assert read_state(client).sidekiq_data_found is False


def test_tls_with_client_certificate(tmp_path: Path, certificates: Certificates) -> None:
    port = free_port()
    arguments = tls_server_arguments(certificates, port, "yes")
    with running_redis(
        tmp_path / "mtls", port=port, extra_arguments=arguments, client_options=tls_client(certificates)
    ):
        base = {"redis_host": "localhost", "redis_port": port, "redis_tls": True,
                "redis_tls_ca_file": str(certificates.ca)}  # fmt: skip
        client = connect(
            params(**base, redis_tls_cert_file=str(certificates.client_cert),
                   redis_tls_key_file=str(certificates.client_key))
        )  # fmt: skip
        assert client.ping() is True

        with pytest.raises(RedisTLSError) as raised:
            connect(params(**base))
        assert "requires a client certificate" in str(raised.value)


def test_tls_with_unknown_ca_rejected(tls_server: RedisServer, certificates: Certificates) -> None:
    with pytest.raises(RedisTLSError) as raised:
        connect(
            params(redis_host="127.0.0.1", redis_port=tls_server.port, redis_tls=True,
                   redis_tls_ca_file=str(certificates.other_ca))
        )  # fmt: skip

    assert "certificate verify failed" in str(raised.value)
    assert "redis_tls_ca_file" in str(raised.value)


def test_tls_verify_off_connects_and_warns(tls_server: RedisServer) -> None:
    options = params(redis_host="127.0.0.1", redis_port=tls_server.port, redis_tls=True, redis_tls_verify=False)

    assert connect(options).ping() is True
    assert "redis_tls_verify: false" in settings_from_params(options).warnings()[0]


def test_tls_to_plain_port(plain_server: RedisServer) -> None:
    with pytest.raises(RedisTLSError) as raised:
        connect(params(redis_url=f"rediss://127.0.0.1:{plain_server.port}/0", redis_socket_timeout=1.0))

    assert str(raised.value).startswith(f"TLS connection to Redis at 127.0.0.1:{plain_server.port} db 0 over TLS")


def test_plain_client_to_tls_port(tls_server: RedisServer) -> None:
    with pytest.raises(RedisUnreachableError) as raised:
        connect(params(redis_host="127.0.0.1", redis_port=tls_server.port, redis_socket_timeout=1.0))

    assert "set redis_tls: true" in str(raised.value)


def test_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    arguments = ("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    with running_redis(tmp_path / "unix", extra_arguments=arguments) as server:
        server.client(db=2).sadd("queues", "default")

        client = connect(params(redis_url=f"unix://{socket_path}?db=2"))

        assert list(read_state(client).queues) == ["default"]


def test_sentinel_finds_master(tmp_path: Path, plain_server: RedisServer) -> None:
    plain_server.client().sadd("queues", "via-sentinel")
    sentinel_port = free_port()
    directory = tmp_path / "sentinel"
    directory.mkdir()
    config = directory / "sentinel.conf"
    config.write_text(
        f"sentinel monitor sidekiq 127.0.0.1 {plain_server.port} 1\nsentinel down-after-milliseconds sidekiq 60000\n"
    )
    with running_redis(directory, port=sentinel_port, sentinel_config=config):
        options = {"redis_sentinel_master": "sidekiq", "redis_sentinels": [f"127.0.0.1:{sentinel_port}"]}

        client = connect(params(**options))
        assert list(read_state(client).queues) == ["via-sentinel"]

        with pytest.raises(RedisUnreachableError) as raised:
            connect(params(**{**options, "redis_sentinel_master": "no-such-master"}))
        assert "No Sentinel could name a master for Redis at master 'no-such-master'" in str(raised.value)
