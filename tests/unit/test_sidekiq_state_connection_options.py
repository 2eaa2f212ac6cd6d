"""Unit tests of the shared Redis connection options: validation, precedence, messages, error translation."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import redis

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.redis_connection import (
    REDIS_ARGUMENT_SPEC,
    RedisAuthenticationError,
    RedisCommandError,
    RedisOptionsError,
    RedisPermissionError,
    RedisSettings,
    RedisTLSError,
    RedisUnreachableError,
    mask_secrets,
    settings_from_params,
    translate_redis_error,
)


def params(**options: Any) -> dict[str, Any]:
    """Return module params as AnsibleModule passes them: every option present, None when not given."""
    values: dict[str, Any] = dict.fromkeys(REDIS_ARGUMENT_SPEC)
    values["redis_tls_verify"] = True
    values["redis_socket_timeout"] = 5.0
    values.update(options)
    return values


def test_defaults_without_options_or_environment() -> None:
    settings = settings_from_params(params(), environ={})

    assert settings == RedisSettings()
    assert settings.describe() == "127.0.0.1:6379 db 0"
    assert settings.key_prefix == ""


def test_redis_url_environment_fallback() -> None:
    settings = settings_from_params(params(), environ={"REDIS_URL": "redis://:pw@cache.internal:6390/2"})

    assert (settings.host, settings.port, settings.db, settings.password) == ("cache.internal", 6390, 2, "pw")


def test_host_option_beats_environment_url() -> None:
    settings = settings_from_params(params(redis_host="10.0.0.5"), environ={"REDIS_URL": "redis://other:1/1"})

    assert (settings.host, settings.port, settings.db) == ("10.0.0.5", 6379, 0)


def test_password_environment_fallback() -> None:
    environ = {"REDIS_USERNAME": "ops", "REDIS_PASSWORD": "from-env"}
    settings = settings_from_params(params(redis_host="h"), environ=environ)

    assert settings.username == "ops"
    assert settings.password == "from-env"


def test_url_with_credentials_and_escapes() -> None:
    settings = settings_from_params(params(redis_url="rediss://sidekiq:p%40ss%2Fword@redis.example.com:6380/4"))

    assert settings.username == "sidekiq"
    assert settings.password == "p@ss/word"
    assert settings.tls is True
    assert (settings.host, settings.port, settings.db) == ("redis.example.com", 6380, 4)
    assert settings.describe() == "redis.example.com:6380 db 4 over TLS"
    assert "p@ss" not in repr(settings)


def test_unix_socket_url() -> None:
    settings = settings_from_params(params(redis_url="unix:///run/redis/redis.sock?db=3"))

    assert settings.unix_socket == "/run/redis/redis.sock"
    assert settings.db == 3
    assert settings.describe() == "socket /run/redis/redis.sock db 3"


def test_ipv6_host_description() -> None:
    settings = settings_from_params(params(redis_url="redis://[::1]:7000/0"))

    assert settings.describe() == "[::1]:7000 db 0"


def test_sentinel_settings() -> None:
    settings = settings_from_params(
        params(
            redis_sentinel_master="sidekiq",
            redis_sentinels=["10.0.1.10", "10.0.2.10:26380", "[fd00::1]:26381"],
            redis_sentinel_password="sentinel-secret",
            redis_password="master-secret",
            redis_db=1,
        )
    )

    assert settings.sentinels == (("10.0.1.10", 26379), ("10.0.2.10", 26380), ("fd00::1", 26381))
    assert settings.describe() == (
        "master 'sidekiq' db 1 through Sentinel 10.0.1.10:26379, 10.0.2.10:26380, fd00::1:26381"
    )
    assert set(settings.secrets) == {"sentinel-secret", "master-secret"}


@pytest.mark.parametrize(
    ("namespace", "prefix"),
    [("shop", "shop:"), ("shop:", "shop:"), ("", ""), (None, "")],
)
def test_namespace_prefix(namespace: str | None, prefix: str) -> None:
    settings = settings_from_params(params(redis_namespace=namespace))

    assert settings.key_prefix == prefix


def test_namespace_in_description() -> None:
    settings = settings_from_params(params(redis_host="h", redis_namespace="shop"))

    assert settings.describe() == "h:6379 db 0, namespace 'shop'"


def test_tls_options_and_warning() -> None:
    verified = settings_from_params(params(redis_host="h", redis_tls=True, redis_tls_ca_file="/etc/ca.pem"))
    unverified = settings_from_params(params(redis_host="h", redis_tls=True, redis_tls_verify=False))

    assert verified.tls_ca_file == "/etc/ca.pem"
    assert verified.warnings() == []
    assert len(unverified.warnings()) == 1
    assert "redis_tls_verify: false" in unverified.warnings()[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redis_url": "redis://h/0", "redis_host": "h"}, "redis_url cannot be combined with redis_host"),
        ({"redis_url": "redis://h/0", "redis_db": 2}, "redis_url cannot be combined with redis_db"),
        ({"redis_host": "h", "redis_sentinel_master": "m", "redis_sentinels": ["s"]}, "cannot be combined"),
        ({"redis_sentinel_master": "m"}, "redis_sentinel_master requires redis_sentinels"),
        ({"redis_sentinels": ["s:1"]}, "redis_sentinels requires redis_sentinel_master"),
        ({"redis_host": "h", "redis_tls": True, "redis_tls_cert_file": "/c"}, "requires redis_tls_key_file"),
        ({"redis_host": "h", "redis_tls_ca_file": "/ca"}, "TLS is off"),
        ({"redis_url": "redis://h/0", "redis_tls": True}, "use a rediss:// URL"),
        ({"redis_url": "rediss://h/0", "redis_tls": False}, "use a redis:// URL"),
        ({"redis_url": "unix:///s.sock", "redis_tls": True}, "TLS is not available over a unix:// socket"),
        ({"redis_url": "http://h/0"}, "scheme 'http'"),
        ({"redis_url": "redis://h/zero"}, "must be a number, got 'zero'"),
        ({"redis_url": "redis://h:99999/0"}, "not a valid URL"),
        ({"redis_url": "redis://h/0?ssl_cert_reqs=none"}, "unsupported query parameters ['ssl_cert_reqs']"),
        ({"redis_url": "redis:///0"}, "names no host"),
        ({"redis_url": "redis://:a@h/0", "redis_password": "b"}, "given twice"),
        ({"redis_host": "h", "redis_port": 0}, "redis_port must be between 1 and 65535, got 0"),
        ({"redis_host": "h", "redis_db": -1}, "redis_db must be 0 or more, got -1"),
        ({"redis_host": "h", "redis_socket_timeout": 0.0}, "redis_socket_timeout must be a number of seconds"),
        ({"redis_sentinel_master": "m", "redis_sentinels": ["h:port"]}, "Invalid port in Sentinel address 'h:port'"),
        ({"redis_sentinel_master": "m", "redis_sentinels": [":1"]}, "Invalid Sentinel address ':1'"),
        ({"redis_namespace": "a:b"}, "must be a single name"),
    ],
)
def test_invalid_options_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(RedisOptionsError) as raised:
        settings_from_params(params(**options), environ={})

    assert message in str(raised.value)


def test_db_with_environment_url_rejected() -> None:
    with pytest.raises(RedisOptionsError) as raised:
        settings_from_params(params(redis_db=3), environ={"REDIS_URL": "redis://h/1"})

    assert "redis_db cannot be combined with the REDIS_URL environment variable" in str(raised.value)


def test_invalid_url_message_hides_password() -> None:
    with pytest.raises(RedisOptionsError) as raised:
        settings_from_params(params(redis_url="redis://:hunter2@h:notaport/0"))

    assert "hunter2" not in str(raised.value)


def test_translate_authentication_error() -> None:
    settings = settings_from_params(params(redis_url="redis://:hunter2@h:6390/0"))
    error = redis.exceptions.AuthenticationError("invalid username-password pair or user is disabled.")

    translated = translate_redis_error(error, settings)

    assert isinstance(translated, RedisAuthenticationError)
    assert str(translated).startswith("Authentication to Redis at h:6390 db 0 failed: invalid username-password pair")
    assert "hunter2" not in str(translated)


def test_translate_masks_password_in_server_text() -> None:
    settings = settings_from_params(params(redis_host="h", redis_password="hunter2"))
    error = redis.exceptions.ResponseError("ERR something echoed hunter2 back")

    translated = translate_redis_error(error, settings)

    assert isinstance(translated, RedisCommandError)
    assert "hunter2" not in str(translated)
    assert "********" in str(translated)


def test_translate_permission_error() -> None:
    error = redis.exceptions.NoPermissionError("this user has no permissions to run the 'evalsha' command")

    translated = translate_redis_error(error)

    assert isinstance(translated, RedisPermissionError)
    assert "+ping +eval +evalsha +time +@read ~*" in str(translated)


def test_translate_denial_inside_script() -> None:
    error = redis.exceptions.ResponseError(
        "The user executing the script can't run this command or subcommand script: 88ee, on @user_script:5."
    )

    assert isinstance(translate_redis_error(error), RedisPermissionError)


def test_translate_connection_refused() -> None:
    settings = settings_from_params(params(redis_host="127.0.0.1", redis_port=1))
    error = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    translated = translate_redis_error(error, settings)

    assert isinstance(translated, RedisUnreachableError)
    assert str(translated).startswith("Could not connect to Redis at 127.0.0.1:1 db 0: Error 111")


def test_translate_closed_connection_hints_tls() -> None:
    settings = settings_from_params(params(redis_host="h"))
    error = redis.exceptions.ConnectionError("Connection closed by server.")

    translated = translate_redis_error(error, settings)

    assert isinstance(translated, RedisUnreachableError)
    assert "set redis_tls: true" in str(translated)


def test_translate_tls_error_from_chain() -> None:
    settings = settings_from_params(params(redis_host="h", redis_tls=True))
    error = redis.exceptions.ConnectionError("Error 1 connecting to h:6379.")
    error.__cause__ = ssl.SSLCertVerificationError(
        1, "certificate verify failed: unable to get local issuer certificate"
    )

    translated = translate_redis_error(error, settings)

    assert isinstance(translated, RedisTLSError)
    assert "redis_tls_ca_file" in str(translated)


def test_translate_handshake_timeout_is_tls() -> None:
    # A TLS client on a plain Redis port: the server waits for a command and the handshake times out.
    settings = settings_from_params(params(redis_host="h", redis_tls=True))
    error = redis.exceptions.TimeoutError("Timeout connecting to server")
    error.__context__ = TimeoutError("_ssl.c:989: The handshake operation timed out")

    translated = translate_redis_error(error, settings)

    assert isinstance(translated, RedisTLSError)
    assert str(translated).startswith("TLS connection to Redis at h:6379 db 0 over TLS failed")


def test_mask_secrets() -> None:
    settings = RedisSettings(password="pw-1", sentinel_password="pw-2")

    assert mask_secrets("a pw-1 b pw-2", settings) == "a ******** b ********"


def test_argument_spec_hides_secrets() -> None:
    assert REDIS_ARGUMENT_SPEC["redis_password"]["no_log"] is True
    assert REDIS_ARGUMENT_SPEC["redis_sentinel_password"]["no_log"] is True
    assert REDIS_ARGUMENT_SPEC["redis_url"]["no_log"] is True
