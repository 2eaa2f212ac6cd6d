"""Filters that expose the pool model to templates and tasks; the logic lives in module_utils/pools.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools as pool_model


def sidekiq_pool_errors(
    pools: Any,
    app_queues: Sequence[str] | None = None,
    singleton_queues: Sequence[str] | None = None,
    margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN,
    stop_budget_cap: int | None = None,
) -> list[str]:
    """Return every problem in the pool definitions; an empty list means they can be deployed."""
    return pool_model.validate_pools(pools, app_queues, singleton_queues, margin, stop_budget_cap)


def sidekiq_config(pool: Mapping[str, Any]) -> dict[str, Any]:
    """Return the data of a pool's sidekiq.yml."""
    return pool_model.sidekiq_config(pool)


def sidekiq_stop_budget(pool: Mapping[str, Any], margin: int = pool_model.DEFAULT_SHUTDOWN_MARGIN) -> int:
    """Return the pool's stop budget in seconds: timeout plus shutdown margin."""
    return pool_model.stop_budget(pool, margin)


def sidekiq_redis_clients(pools: Sequence[Mapping[str, Any]], sidekiq_major: int = 6) -> int:
    """Return the Redis connections every pool needs at its maximum size."""
    return pool_model.redis_clients(pools, sidekiq_major)


def sidekiq_queue_names(pool: Mapping[str, Any]) -> list[str]:
    """Return the names of the queues a pool serves."""
    return pool_model.queue_names(pool)


def sidekiq_instance_counts(total: int, hosts: Sequence[str]) -> dict[str, int]:
    """Spread a pool's processes evenly over hosts."""
    return pool_model.instance_counts(total, hosts)


def sidekiq_redis_version_errors(redis_version: str, sidekiq_major: int) -> list[str]:
    """Return a message when Redis is too old for the Sidekiq major version."""
    return pool_model.redis_version_errors(int(sidekiq_major), str(redis_version))


def redis_url(
    host: str,
    port: int = 6379,
    db: int = 0,
    username: str | None = None,
    password: str | None = None,
    tls: bool = False,
) -> str:
    """Return the REDIS_URL for Sidekiq, with the credentials percent-encoded."""
    return pool_model.redis_url(str(host), int(port), int(db), username, password, bool(tls))


def sidekiq_instance_plan(
    services: Mapping[str, Any], pools: Sequence[Mapping[str, Any]], hosts: Sequence[str], host: str
) -> dict[str, dict[str, list[str]]]:
    """Return, per pool, the running and the wanted instance units on one host."""
    return pool_model.instance_plan(services, pools, list(hosts), str(host))


def sidekiq_kubernetes_autoscaled(
    pools: Sequence[Mapping[str, Any]], kubernetes_pools: Mapping[str, Any] | None = None
) -> list[str]:
    """Return the names of the pools that the sidekiq-ops autoscaler sizes on Kubernetes.

    A pool's autoscaler is the one that ``sidekiq_kubernetes_pools.<pool>.autoscaler`` names, else ``sidekiq-ops``
    when its processes.min differs from processes.max, else none (a fixed size), as roles/sidekiq_kubernetes decides.
    """
    settings = kubernetes_pools or {}
    names: list[str] = []
    for pool in pools:
        if not isinstance(pool, Mapping) or "name" not in pool:
            continue
        processes = pool.get("processes") or {"min": 1, "max": 1}
        fixed = processes.get("min") == processes.get("max")
        default = "none" if fixed else "sidekiq-ops"
        own = settings.get(pool["name"]) or {}
        if own.get("autoscaler", default) == "sidekiq-ops":
            names.append(str(pool["name"]))
    return names


def sidekiq_restart_items(
    plan: Mapping[str, Mapping[str, Sequence[str]]],
    pools: Sequence[Mapping[str, Any]],
    changed_pools: Sequence[str],
    host: str,
) -> list[dict[str, Any]]:
    """Return the running instances on one host that a changed pool must restart."""
    return pool_model.restart_items(plan, pools, list(changed_pools), str(host))


class FilterModule:
    """Pool model filters of sidekiq_ops.fleet."""

    def filters(self) -> dict[str, Any]:
        return {
            "sidekiq_pool_errors": sidekiq_pool_errors,
            "sidekiq_config": sidekiq_config,
            "sidekiq_stop_budget": sidekiq_stop_budget,
            "sidekiq_redis_clients": sidekiq_redis_clients,
            "sidekiq_queue_names": sidekiq_queue_names,
            "sidekiq_instance_counts": sidekiq_instance_counts,
            "sidekiq_redis_version_errors": sidekiq_redis_version_errors,
            "redis_url": redis_url,
            "sidekiq_instance_plan": sidekiq_instance_plan,
            "sidekiq_restart_items": sidekiq_restart_items,
            "sidekiq_kubernetes_autoscaled": sidekiq_kubernetes_autoscaled,
        }
