"""Documentation of the Redis connection options that every sidekiq_ops.fleet module shares."""

from __future__ import annotations


class ModuleDocFragment:
    # Keep in step with REDIS_ARGUMENT_SPEC in plugins/module_utils/redis_connection.py.
    DOCUMENTATION = r"""
options:
  redis_url:
    description:
      - Redis URL, the form Sidekiq reads from C(REDIS_URL).
      - V(redis://[username:password@]host[:port][/db]), V(rediss://...) for TLS, or
        V(unix:///path/to/redis.sock?db=N).
      - Cannot be combined with O(redis_host), O(redis_port), O(redis_db) or O(redis_sentinel_master).
      - When none of O(redis_url), O(redis_host), O(redis_port) and O(redis_sentinel_master) is given, the
        E(REDIS_URL) environment variable of the module's process is used, else V(redis://127.0.0.1:6379/0).
      - Kept out of logs and results because URLs usually carry the password.
    type: str
  redis_host:
    description:
      - Host name or IP address of the Redis server. Default V(127.0.0.1).
    type: str
  redis_port:
    description:
      - TCP port of the Redis server. Default V(6379).
    type: int
  redis_db:
    description:
      - Database number that holds the Sidekiq keys. Default V(0), or the database in O(redis_url).
    type: int
  redis_username:
    description:
      - ACL username. Without it Redis authenticates the C(default) user.
      - Falls back to the E(REDIS_USERNAME) environment variable.
    type: str
  redis_password:
    description:
      - Password of the ACL user, or the C(requirepass) password.
      - Falls back to the E(REDIS_PASSWORD) environment variable. Never shown in messages or results.
    type: str
  redis_tls:
    description:
      - Connect with TLS. Default V(false), or V(true) when O(redis_url) starts with V(rediss://).
    type: bool
  redis_tls_ca_file:
    description:
      - PEM file of the certificate authorities that sign the server certificate.
      - Without it the system's trusted authorities are used.
    type: path
  redis_tls_cert_file:
    description:
      - PEM client certificate, for servers that require one (C(tls-auth-clients yes)).
      - Requires O(redis_tls_key_file).
    type: path
  redis_tls_key_file:
    description:
      - PEM private key of O(redis_tls_cert_file).
    type: path
  redis_tls_verify:
    description:
      - Verify the server certificate and that it names the host.
      - V(false) keeps the traffic encrypted but lets anyone on the network path pose as the server; the
        module then returns a warning. Prefer O(redis_tls_ca_file).
    type: bool
    default: true
  redis_sentinel_master:
    description:
      - Name of the master that Redis Sentinel monitors. The module asks O(redis_sentinels) for its address.
      - Requires O(redis_sentinels). Cannot be combined with O(redis_host) or O(redis_port).
    type: str
  redis_sentinels:
    description:
      - Sentinel addresses as V(host:port) or V([ipv6]:port); the port defaults to V(26379).
      - The TLS options apply to the Sentinels as well as to the master.
    type: list
    elements: str
  redis_sentinel_username:
    description:
      - ACL username on the Sentinels, when they require one.
    type: str
  redis_sentinel_password:
    description:
      - Password on the Sentinels (their C(requirepass)), when they require one.
    type: str
  redis_namespace:
    description:
      - The redis-namespace name the app gives Sidekiq, for example V(myapp) when keys look like V(myapp:queues).
      - A trailing colon is accepted and removed.
    type: str
  redis_socket_timeout:
    description:
      - Seconds to wait for a connection and for each reply.
    type: float
    default: 5.0
requirements:
  - redis (the redis-py package, version 5 or later) for the Python that runs the module
notes:
  - Redis Cluster is not supported, because Sidekiq keeps its keys in one database of one server.
"""
