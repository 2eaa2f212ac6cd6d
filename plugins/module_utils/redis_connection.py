"""Redis connection options shared by every module that talks to Redis, and the client they open.

All modules take the same ``redis_*`` options (``REDIS_ARGUMENT_SPEC``, documented once in the doc fragment
``sidekiq_ops.fleet.redis``). ``connect()`` turns them into a redis-py client, checks it with PING and
raises one of the ``RedisAccessError`` subclasses with a message that names the target and the next
step. Messages never contain a password: targets are described without credentials, and any secret that
shows up in a redis-py error text is masked.

This file imports only the standard library at import time, so it works without Ansible; redis-py is
needed only when a client is opened.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_SOCKET_TIMEOUT = 5.0

# Environment variables read when the matching option is not supplied. REDIS_URL is the variable Sidekiq
# itself reads, so a shell or CI job that runs Sidekiq tools can run these modules unchanged.
ENV_URL = "REDIS_URL"
ENV_USERNAME = "REDIS_USERNAME"
ENV_PASSWORD = "REDIS_PASSWORD"

# ACL rules that let a Redis user run the read-only modules: PING to check the connection, EVAL and EVALSHA
# for the read script, TIME inside it, and read commands on every key.
READER_ACL_RULES = "+ping +eval +evalsha +time +@read ~*"

REDIS_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    # A URL usually carries the password, so the whole option is kept out of logs and results.
    "redis_url": {"type": "str", "no_log": True},
    "redis_host": {"type": "str"},
    "redis_port": {"type": "int"},
    "redis_db": {"type": "int"},
    "redis_username": {"type": "str"},
    "redis_password": {"type": "str", "no_log": True},
    "redis_tls": {"type": "bool"},
    "redis_tls_ca_file": {"type": "path"},
    "redis_tls_cert_file": {"type": "path"},
    "redis_tls_key_file": {"type": "path", "no_log": False},
    "redis_tls_verify": {"type": "bool", "default": True},
    "redis_sentinel_master": {"type": "str"},
    "redis_sentinels": {"type": "list", "elements": "str"},
    "redis_sentinel_username": {"type": "str"},
    "redis_sentinel_password": {"type": "str", "no_log": True},
    "redis_namespace": {"type": "str"},
    "redis_socket_timeout": {"type": "float", "default": DEFAULT_SOCKET_TIMEOUT},
}


class RedisAccessError(Exception):
    """Base class: Redis could not be reached or used with the supplied options."""


class RedisOptionsError(RedisAccessError):
    """The connection options are invalid or contradict each other."""


class RedisDependencyError(RedisAccessError):
    """The redis Python package is not installed where the code runs."""


class RedisUnreachableError(RedisAccessError):
    """No connection could be made, or the server stopped replying."""


class RedisAuthenticationError(RedisAccessError):
    """The server rejected the username or password, or requires one that was not supplied."""


class RedisTLSError(RedisAccessError):
    """The TLS handshake failed: certificate verification, a TLS client on a plain port, or the reverse."""


class RedisPermissionError(RedisAccessError):
    """The ACL user may not run a command or read a key that is needed."""


class RedisCommandError(RedisAccessError):
    """Redis returned an error that none of the other classes describes."""


@dataclass(frozen=True)
class RedisSettings:
    """Validated connection settings, resolved from module options and environment variables."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    unix_socket: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    sentinel_master: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    namespace: str = ""
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT

    @property
    def key_prefix(self) -> str:
        """Prefix of every Sidekiq key: ``"<namespace>:"`` as redis-namespace writes it, or ``""``."""
        return f"{self.namespace}:" if self.namespace else ""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords to mask in any text that leaves this module."""
        return tuple(secret for secret in (self.password, self.sentinel_password) if secret)

    def describe(self) -> str:
        """Describe the target for messages, without credentials.

        The text is deliberately not a URL: Ansible masks every occurrence of the no_log option redis_url in
        results, and a URL without credentials would otherwise turn the description into ``********``.
        """
        if self.sentinel_master:
            addresses = ", ".join(f"{host}:{port}" for host, port in self.sentinels)
            target = f"master '{self.sentinel_master}' db {self.db} through Sentinel {addresses}"
        elif self.unix_socket:
            target = f"socket {self.unix_socket} db {self.db}"
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
            target = f"{host}:{self.port} db {self.db}"
        if self.tls:
            target += " over TLS"
        if self.namespace:
            target += f", namespace '{self.namespace}'"
        return target

    def warnings(self) -> list[str]:
        """Return warnings about unsafe but accepted settings."""
        if self.tls and not self.tls_verify:
            return [
                "TLS certificate verification is off (redis_tls_verify: false): the connection is encrypted "
                "but anyone on the network path can impersonate the Redis server. Set redis_tls_ca_file instead."
            ]
        return []


def settings_from_params(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RedisSettings:
    """Validate the ``redis_*`` options and resolve them into settings.

    The target comes from ``redis_url``, from ``redis_host``/``redis_port``/``redis_db`` or from
    ``redis_sentinel_master``, which exclude each other. Without any of them the ``REDIS_URL`` environment
    variable is used, else ``127.0.0.1:6379``. ``REDIS_USERNAME`` and ``REDIS_PASSWORD`` fill in credentials
    that neither the options nor the URL give. Raises RedisOptionsError naming the options in conflict.
    """
    env = os.environ if environ is None else environ
    supplied = {name: value for name, value in params.items() if name.startswith("redis_") and value is not None}

    _check_exclusive(supplied, "redis_url", ("redis_host", "redis_port", "redis_db", "redis_sentinel_master"))
    _check_exclusive(supplied, "redis_sentinel_master", ("redis_host", "redis_port"))
    _check_together(supplied, ("redis_sentinel_master", "redis_sentinels"))
    _check_together(supplied, ("redis_tls_cert_file", "redis_tls_key_file"))

    url = _resolve_url(supplied, env)
    target: dict[str, Any] = _parse_url(url) if url else {}
    for option, key in (("redis_username", "username"), ("redis_password", "password")):
        if option in supplied and target.get(key):
            raise RedisOptionsError(f"The {key} is given twice, in redis_url and in {option}: keep one.")
    tls = _resolve_tls(supplied, url, target)

    port = supplied.get("redis_port", target.get("port", DEFAULT_PORT))
    db = supplied.get("redis_db", target.get("db", 0))
    _check_range("redis_port", port, 1, 65535)
    _check_range("redis_db", db, 0, None)
    timeout = float(supplied.get("redis_socket_timeout", DEFAULT_SOCKET_TIMEOUT))
    if timeout <= 0:
        raise RedisOptionsError(f"redis_socket_timeout must be a number of seconds above 0, got {timeout}.")

    return RedisSettings(
        host=supplied.get("redis_host", target.get("host", "127.0.0.1")),
        port=port,
        db=db,
        unix_socket=target.get("unix_socket"),
        username=supplied.get("redis_username") or target.get("username") or env.get(ENV_USERNAME) or None,
        password=supplied.get("redis_password") or target.get("password") or env.get(ENV_PASSWORD) or None,
        tls=tls,
        tls_ca_file=supplied.get("redis_tls_ca_file"),
        tls_cert_file=supplied.get("redis_tls_cert_file"),
        tls_key_file=supplied.get("redis_tls_key_file"),
        tls_verify=supplied.get("redis_tls_verify", True),
        sentinel_master=supplied.get("redis_sentinel_master"),
        sentinels=tuple(_parse_sentinel(address) for address in supplied.get("redis_sentinels", ())),
        sentinel_username=supplied.get("redis_sentinel_username"),
        sentinel_password=supplied.get("redis_sentinel_password"),
        namespace=_parse_namespace(supplied.get("redis_namespace", "")),
        socket_timeout=timeout,
    )


def connect(params: Mapping[str, Any] | RedisSettings) -> Any:
    """Open a redis-py client for the options or settings and check it with PING.

    Returns a ``redis.Redis`` with ``decode_responses`` off. Retries are off as well, so a failure
    surfaces at once and the caller decides whether to run again.
    Raises a RedisAccessError subclass: options, dependency, unreachable, authentication, TLS or permission.
    """
    settings = params if isinstance(params, RedisSettings) else settings_from_params(params)
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as error:
        raise RedisDependencyError(
            "The Python package 'redis' (redis-py 5 or later) is not installed for the Python interpreter "
            "that runs this module: install it there, or point ansible_python_interpreter at a Python that has it."
        ) from error

    common: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password,
        "db": settings.db,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
    }
    common.update(_tls_options(settings))

    try:
        if settings.sentinel_master:
            from redis.sentinel import Sentinel

            sentinel_options = {
                "username": settings.sentinel_username,
                "password": settings.sentinel_password,
                "socket_timeout": settings.socket_timeout,
                "socket_connect_timeout": settings.socket_timeout,
                "retry": Retry(NoBackoff(), 0),
                "protocol": 2,
                **_tls_options(settings),
            }
            sentinel = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_options)
            client = sentinel.master_for(settings.sentinel_master, **common)
        elif settings.unix_socket:
            unix_options = {key: value for key, value in common.items() if not key.startswith("ssl")}
            client = redis.Redis(unix_socket_path=settings.unix_socket, **unix_options)
        else:
            client = redis.Redis(host=settings.host, port=settings.port, **common)
        client.ping()
    except redis.exceptions.RedisError as error:
        raise translate_redis_error(error, settings) from error
    return client


def translate_redis_error(error: BaseException, settings: RedisSettings | None = None) -> RedisAccessError:
    """Turn a redis-py exception into the matching RedisAccessError with a message that names the next step.

    Works without redis-py installed, because it goes by class names and message texts.
    """
    where = f"Redis at {settings.describe()}" if settings else "Redis"
    detail = _mask(_error_text(error), settings.secrets if settings else ())
    names = {cls.__name__ for cls in type(error).__mro__}

    # Inside a script, Redis 7 reports an ACL denial as a plain ERR ("The user executing the script can't run
    # this command"), not as NOPERM.
    if "NoPermissionError" in names or detail.startswith("NOPERM") or "user executing the script" in detail:
        return RedisPermissionError(
            f"{where} denied a command or key to this ACL user: {detail} Grant the user the ACL rules "
            f"'{READER_ACL_RULES}'."
        )
    if "AuthenticationError" in names or detail.startswith(("NOAUTH", "WRONGPASS")):
        return RedisAuthenticationError(
            f"Authentication to {where} failed: {detail} Check redis_username and redis_password, "
            "or the credentials in redis_url."
        )
    if _is_tls_failure(error):
        return RedisTLSError(
            f"TLS connection to {where} failed: {detail} Check that the port serves TLS, that redis_tls_ca_file "
            "signs the server certificate, that the certificate names the host, and whether the server requires "
            "a client certificate (redis_tls_cert_file and redis_tls_key_file)."
        )
    if "MasterNotFoundError" in names:
        return RedisUnreachableError(
            f"No Sentinel could name a master for {where}: {detail} Check redis_sentinel_master and redis_sentinels."
        )
    if "TimeoutError" in names or "ConnectionError" in names or "InvalidResponse" in names:
        hint = ""
        if settings and not settings.tls and ("closed" in detail.lower() or "reset" in detail.lower()):
            hint = " If the port serves TLS, set redis_tls: true or use a rediss:// URL."
        return RedisUnreachableError(
            f"Could not connect to {where}: {detail} Check the host, port and database, that Redis "
            f"runs, and that no firewall blocks the port.{hint}"
        )
    if "invalid db index" in detail.lower() or "DB index is out of range" in detail:
        return RedisOptionsError(f"{where} has no such database: {detail} Check redis_db.")
    return RedisCommandError(f"{where} returned an error: {detail}")


def mask_secrets(text: str, settings: RedisSettings) -> str:
    """Replace every password of the settings that occurs in ``text`` with ``********``."""
    return _mask(text, settings.secrets)


def _resolve_url(supplied: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """Return redis_url, or REDIS_URL from the environment when no option names a target."""
    if "redis_url" in supplied:
        return str(supplied["redis_url"])
    if {"redis_host", "redis_port", "redis_sentinel_master"} & supplied.keys():
        return None
    url = env.get(ENV_URL) or None
    if url is not None and "redis_db" in supplied:
        raise RedisOptionsError(
            f"redis_db cannot be combined with the {ENV_URL} environment variable: put the database in the "
            "URL or give redis_host and redis_db."
        )
    return url


def _resolve_tls(supplied: Mapping[str, Any], url: str | None, target: dict[str, Any]) -> bool:
    """Decide whether to use TLS from redis_tls and the URL scheme, rejecting combinations that contradict."""
    tls = bool(target.pop("tls", False))
    if supplied.get("redis_tls") and target.get("unix_socket"):
        raise RedisOptionsError(
            "TLS is not available over a unix:// socket: use rediss://host:port or turn redis_tls off."
        )
    if "redis_tls" in supplied:
        if url and supplied["redis_tls"] != tls:
            scheme = "rediss://" if supplied["redis_tls"] else "redis://"
            raise RedisOptionsError(f"redis_tls: {supplied['redis_tls']} contradicts redis_url: use a {scheme} URL.")
        tls = bool(supplied["redis_tls"])
    tls_files = [
        name for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file") if name in supplied
    ]
    if tls_files and not tls:
        raise RedisOptionsError(
            f"{', '.join(tls_files)} supplied but TLS is off: set redis_tls: true or use rediss://."
        )
    return tls


def _tls_options(settings: RedisSettings) -> dict[str, Any]:
    if not settings.tls:
        return {}
    options: dict[str, Any] = {
        "ssl": True,
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    if settings.tls_verify:
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
    else:
        options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    return options


def _parse_url(url: str) -> dict[str, Any]:
    """Split a redis://, rediss:// or unix:// URL into settings fields; the URL itself never goes in a message."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RedisOptionsError(
            "redis_url (or REDIS_URL) is not a valid URL: expected redis://[user:password@]host[:port][/db], "
            "rediss://... for TLS or unix:///path/to/socket[?db=N]."
        ) from None

    target: dict[str, Any] = {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise RedisOptionsError(
            f"redis_url has unsupported query parameters {unknown}: give TLS and timeout settings as redis_* options."
        )

    if parts.scheme == "unix":
        if not parts.path:
            raise RedisOptionsError("redis_url uses unix:// but names no socket path: use unix:///path/to/redis.sock.")
        target["unix_socket"] = parts.path
        target["db"] = _parse_db(query.get("db", ["0"])[0])
        return target
    if parts.scheme not in ("redis", "rediss"):
        raise RedisOptionsError(f"redis_url has the scheme '{parts.scheme}': use redis://, rediss:// (TLS) or unix://.")
    if not parts.hostname:
        raise RedisOptionsError("redis_url names no host: use redis://host:port/db.")

    target["tls"] = parts.scheme == "rediss"
    target["host"] = parts.hostname
    target["port"] = port or DEFAULT_PORT
    path = parts.path.strip("/")
    target["db"] = _parse_db(path or query.get("db", ["0"])[0])
    return target


def _parse_db(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RedisOptionsError(f"The database in redis_url must be a number, got '{text}'.") from None


def _parse_sentinel(address: str) -> tuple[str, int]:
    """Parse ``host``, ``host:port`` or ``[ipv6]:port`` into a Sentinel address."""
    text = address.strip()
    if text.startswith("["):
        host, _bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _colon, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise RedisOptionsError(f"Invalid Sentinel address '{address}' in redis_sentinels: expected host:port.")
    try:
        port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise RedisOptionsError(f"Invalid port in Sentinel address '{address}': expected host:port.") from None
    _check_range("port in redis_sentinels", port, 1, 65535)
    return host, port


def _parse_namespace(namespace: str) -> str:
    """Strip the colon that redis-namespace puts between the namespace and each key, if the user wrote it."""
    name = namespace[:-1] if namespace.endswith(":") else namespace
    if ":" in name or any(character.isspace() for character in name):
        raise RedisOptionsError(
            f"redis_namespace '{namespace}' must be a single name such as 'myapp' (keys then look like "
            "'myapp:queues'), without spaces or inner colons."
        )
    return name


def _check_exclusive(supplied: Mapping[str, Any], option: str, others: tuple[str, ...]) -> None:
    conflicts = [other for other in others if other in supplied]
    if option in supplied and conflicts:
        raise RedisOptionsError(f"{option} cannot be combined with {', '.join(conflicts)}: give one way to connect.")


def _check_together(supplied: Mapping[str, Any], options: tuple[str, ...]) -> None:
    present = [option for option in options if option in supplied]
    if present and len(present) != len(options):
        missing = [option for option in options if option not in supplied]
        raise RedisOptionsError(f"{', '.join(present)} requires {', '.join(missing)} as well.")


def _check_range(name: str, value: int, minimum: int, maximum: int | None) -> None:
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"{minimum} or more"
        raise RedisOptionsError(f"{name} must be {bounds}, got {value}.")


def _error_text(error: BaseException) -> str:
    """Return the error's text as a sentence that ends with a full stop or question mark."""
    text = str(error).strip() or type(error).__name__
    return text if text.endswith((".", "?", "!")) else text + "."


def _is_tls_failure(error: BaseException) -> bool:
    """Tell TLS failures from plain network failures by the exception chain and its texts."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return True
        text = str(current).lower()
        if "ssl" in text or "handshake" in text or "certificate" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "********")
    return text
