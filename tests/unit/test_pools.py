"""Unit tests of the pool model: validation messages, derived values and instance planning."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from redis.connection import parse_url

from ansible_collections.sidekiq_ops.fleet.plugins.filter import pools as pool_filters
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import pools


def make_pool(**overrides: Any) -> dict[str, Any]:
    """Return a valid pool, with the given keys replaced (a value of None removes the key)."""
    pool: dict[str, Any] = {
        "name": "bulk",
        "queues": [["default", 3], ["low", 1]],
        "concurrency": 5,
        "timeout": 15,
        "processes": {"min": 2, "max": 6},
        "autoscale": {"target_latency": 10},
    }
    for key, value in overrides.items():
        if value is None:
            pool.pop(key, None)
        else:
            pool[key] = value
    return pool


def running(*units: str) -> dict[str, dict[str, str]]:
    """Build service_facts entries in which each given unit is running."""
    return {unit: {"name": unit, "state": "running", "status": "enabled", "source": "systemd"} for unit in units}


# --- queues, processes and derived numbers ---


def test_queue_entries_plain_and_weighted() -> None:
    assert pools.queue_entries({"queues": ["critical", "mailers"]}) == [("critical", None), ("mailers", None)]
    assert pools.queue_entries({"queues": [["default", 3], ["low", 1]]}) == [("default", 3), ("low", 1)]
    assert pools.queue_entries({"queues": [("default", 2)]}) == [("default", 2)]


def test_queue_entries_missing_or_odd() -> None:
    assert pools.queue_entries({}) == []
    assert pools.queue_entries({"queues": None}) == []
    assert pools.queue_entries({"queues": [7]}) == [("7", None)]


def test_queue_names_keep_order() -> None:
    assert pools.queue_names(make_pool()) == ["default", "low"]
    assert pools.queue_names({"queues": ["b", "a", "c"]}) == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, (1, 1)),
        ({}, (1, 1)),
        ({"min": 2, "max": 6}, (2, 6)),
        ({"min": 3}, (3, 3)),
        ({"min": 0}, (0, 1)),
        ({"max": 4}, (1, 4)),
    ],
)
def test_processes_defaults(spec: dict[str, int] | None, expected: tuple[int, int]) -> None:
    assert pools.processes({"name": "bulk", "queues": ["default"], "processes": spec}) == expected


def test_processes_without_key() -> None:
    assert pools.processes(make_pool(processes=None)) == (1, 1)


def test_stop_budget_timeout_plus_margin() -> None:
    assert pools.stop_budget(make_pool(timeout=8), 5) == 13
    assert pools.stop_budget(make_pool(timeout=None)) == pools.DEFAULT_TIMEOUT + pools.DEFAULT_SHUTDOWN_MARGIN
    assert pools.stop_budget(make_pool(timeout=25), "12") == 37  # type: ignore[arg-type]


@pytest.mark.parametrize(("major", "expected"), [(6, 15), (7, 20), (8, 20)])
def test_redis_connections_per_process(major: int, expected: int) -> None:
    assert pools.redis_connections_per_process(10, major) == expected


def test_redis_clients_sum_at_max_size() -> None:
    fleet = [
        make_pool(name="critical", queues=["critical"], processes={"min": 2, "max": 2}),
        make_pool(name="bulk", processes={"min": 2, "max": 6}),
    ]
    assert pools.redis_clients(fleet) == 2 * (5 + 5) + 6 * (5 + 5)
    assert pools.redis_clients(fleet, sidekiq_major=7) == 2 * (5 + 10) + 6 * (5 + 10)


def test_redis_clients_defaults() -> None:
    assert pools.redis_clients([{"name": "solo", "queues": ["default"]}]) == pools.DEFAULT_CONCURRENCY + 5
    assert pools.redis_clients([]) == 0


def test_sidekiq_config_content() -> None:
    config = pools.sidekiq_config(make_pool(tag="bulk-jobs", env={"SECRET": "x"}))
    assert config == {
        "concurrency": 5,
        "timeout": 15,
        "tag": "bulk-jobs",
        "queues": [["default", 3], ["low", 1]],
    }


def test_sidekiq_config_defaults() -> None:
    config = pools.sidekiq_config({"name": "solo", "queues": ["critical", "default"]})
    assert config["concurrency"] == pools.DEFAULT_CONCURRENCY
    assert config["timeout"] == pools.DEFAULT_TIMEOUT
    assert config["tag"] == "solo"
    assert config["queues"] == ["critical", "default"]


def test_sidekiq_config_renders_integers() -> None:
    rendered = yaml.safe_dump(pools.sidekiq_config(make_pool()), sort_keys=False)
    loaded = yaml.safe_load(rendered)
    assert "concurrency: 5\n" in rendered
    assert type(loaded["concurrency"]) is int
    assert type(loaded["timeout"]) is int
    assert all(type(weight) is int for _, weight in loaded["queues"])
    assert list(loaded) == ["concurrency", "timeout", "tag", "queues"]


def test_sidekiq_config_leaves_out_env() -> None:
    config = pools.sidekiq_config(make_pool(env={"DATABASE_PASSWORD": "hunter2"}))
    assert "env" not in config
    assert "hunter2" not in yaml.safe_dump(config)


def test_database_pool_size() -> None:
    assert pools.database_pool_size(make_pool(concurrency=5)) == 6
    assert pools.database_pool_size({"name": "solo"}) == pools.DEFAULT_CONCURRENCY + 1


# --- instance counts and plans ---


@pytest.mark.parametrize(
    ("total", "hosts", "expected"),
    [
        (5, ["w1", "w2"], {"w1": 3, "w2": 2}),
        (4, ["w1", "w2"], {"w1": 2, "w2": 2}),
        (2, ["w1", "w2", "w3"], {"w1": 1, "w2": 1, "w3": 0}),
        (0, ["w1", "w2"], {"w1": 0, "w2": 0}),
        (-3, ["w1"], {"w1": 0}),
        (3, [], {}),
    ],
)
def test_instance_counts(total: int, hosts: list[str], expected: dict[str, int]) -> None:
    assert pools.instance_counts(total, hosts) == expected


@pytest.mark.parametrize("total", range(0, 12))
def test_instance_counts_sum_to_total(total: int) -> None:
    counts = pools.instance_counts(total, ["w1", "w2", "w3"])
    assert sum(counts.values()) == total
    assert max(counts.values()) - min(counts.values()) <= 1


def test_target_instances_fills_lowest_free() -> None:
    services = running("sidekiq-bulk@2.service", "sidekiq-bulk@5.service")
    plan = pools.target_instances("bulk", services, 4)
    assert plan["running"] == ["sidekiq-bulk@2.service", "sidekiq-bulk@5.service"]
    assert plan["target"] == [
        "sidekiq-bulk@1.service",
        "sidekiq-bulk@2.service",
        "sidekiq-bulk@3.service",
        "sidekiq-bulk@5.service",
    ]


def test_target_instances_never_shrinks() -> None:
    services = running("sidekiq-bulk@1.service", "sidekiq-bulk@2.service", "sidekiq-bulk@3.service")
    plan = pools.target_instances("bulk", services, 1)
    assert plan["target"] == plan["running"]
    assert len(plan["target"]) == 3


def test_target_instances_share_zero() -> None:
    assert pools.target_instances("bulk", {}, 0) == {"running": [], "target": []}
    plan = pools.target_instances("bulk", running("sidekiq-bulk@4.service"), 0)
    assert plan["target"] == ["sidekiq-bulk@4.service"]


def test_target_instances_reuses_stopped_numbers() -> None:
    services: dict[str, Any] = {
        "sidekiq-bulk@1.service": {"state": "stopped"},
        "sidekiq-bulk@2.service": {"state": "failed"},
    }
    plan = pools.target_instances("bulk", services, 2)
    assert plan["running"] == []
    assert plan["target"] == ["sidekiq-bulk@1.service", "sidekiq-bulk@2.service"]


def test_target_instances_ignores_other_units() -> None:
    services: dict[str, Any] = {
        **running("sidekiq-bulk-2@1.service", "sidekiq-bulkx@3.service", "sidekiq-critical@1.service"),
        **running("sidekiq-bulk@.service", "sidekiq-bulk@a.service", "sidekiq-bulk@1.timer"),
        "sidekiq-bulk@7.service": "running",
    }
    plan = pools.target_instances("bulk", services, 1)
    assert plan["running"] == []
    assert plan["target"] == ["sidekiq-bulk@1.service"]


def test_target_instances_numeric_order() -> None:
    services = running("sidekiq-bulk@10.service", "sidekiq-bulk@2.service")
    plan = pools.target_instances("bulk", services, 3)
    assert plan["running"] == ["sidekiq-bulk@2.service", "sidekiq-bulk@10.service"]
    assert plan["target"] == ["sidekiq-bulk@1.service", "sidekiq-bulk@2.service", "sidekiq-bulk@10.service"]


def test_instance_plan_shares_min_over_hosts() -> None:
    fleet = [
        make_pool(name="critical", queues=["critical"], processes={"min": 2, "max": 2}),
        make_pool(name="bulk", processes={"min": 3, "max": 6}),
    ]
    hosts = ["w1", "w2"]
    first = pools.instance_plan({}, fleet, hosts, "w1")
    second = pools.instance_plan({}, fleet, hosts, "w2")
    assert first["critical"]["target"] == ["sidekiq-critical@1.service"]
    assert first["bulk"]["target"] == ["sidekiq-bulk@1.service", "sidekiq-bulk@2.service"]
    assert second["critical"]["target"] == ["sidekiq-critical@1.service"]
    assert second["bulk"]["target"] == ["sidekiq-bulk@1.service"]


def test_instance_plan_keeps_autoscaled_instances() -> None:
    fleet = [make_pool(name="bulk", processes={"min": 2, "max": 6})]
    services = running("sidekiq-bulk@1.service", "sidekiq-bulk@2.service", "sidekiq-bulk@3.service")
    plan = pools.instance_plan(services, fleet, ["w1", "w2"], "w1")
    assert plan["bulk"]["running"] == [f"sidekiq-bulk@{number}.service" for number in (1, 2, 3)]
    assert plan["bulk"]["target"] == plan["bulk"]["running"]


def test_instance_plan_host_outside_group() -> None:
    fleet = [make_pool(name="bulk", processes={"min": 4, "max": 6})]
    plan = pools.instance_plan({}, fleet, ["w1", "w2"], "elsewhere")
    assert plan == {"bulk": {"running": [], "target": []}}


def test_restart_items_only_changed_pools() -> None:
    fleet = [
        make_pool(name="critical", queues=["critical"], timeout=10, processes={"min": 1, "max": 1}),
        make_pool(name="bulk", timeout=None),
    ]
    plan = {
        "critical": {"running": ["sidekiq-critical@1.service"], "target": ["sidekiq-critical@1.service"]},
        "bulk": {
            "running": ["sidekiq-bulk@1.service", "sidekiq-bulk@3.service"],
            "target": ["sidekiq-bulk@1.service", "sidekiq-bulk@2.service", "sidekiq-bulk@3.service"],
        },
    }
    items = pools.restart_items(plan, fleet, ["bulk"], "w1")
    assert items == [
        {"host": "w1", "pool": "bulk", "unit": "sidekiq-bulk@1.service", "timeout": pools.DEFAULT_TIMEOUT},
        {"host": "w1", "pool": "bulk", "unit": "sidekiq-bulk@3.service", "timeout": pools.DEFAULT_TIMEOUT},
    ]
    both = pools.restart_items(plan, fleet, ["critical", "bulk"], "w1")
    assert [item["unit"] for item in both] == [
        "sidekiq-critical@1.service",
        "sidekiq-bulk@1.service",
        "sidekiq-bulk@3.service",
    ]
    assert both[0]["timeout"] == 10


def test_restart_items_nothing_to_restart() -> None:
    fleet = [make_pool(name="bulk")]
    assert pools.restart_items({"bulk": {"running": ["sidekiq-bulk@1.service"]}}, fleet, [], "w1") == []
    assert pools.restart_items({}, fleet, ["bulk"], "w1") == []
    assert pools.restart_items({"bulk": {"running": [], "target": ["x"]}}, fleet, ["bulk"], "w1") == []


# --- validation ---


def test_validate_pools_accepts_valid() -> None:
    fleet = [
        make_pool(name="critical", queues=["critical", "mailers"], processes={"min": 2, "max": 2}, autoscale=None),
        make_pool(name="default"),
        make_pool(name="scheduler", queues=["scheduler"], processes={"min": 1, "max": 1}, tag="cron"),
    ]
    errors = pools.validate_pools(
        fleet,
        app_queues=["critical", "mailers", "default", "low", "scheduler"],
        singleton_queues=["scheduler"],
        margin=5,
        stop_budget_cap=30,
    )
    assert errors == []


def test_validate_pools_accepts_minimal_pool() -> None:
    assert pools.validate_pools([{"name": "default", "queues": ["default"]}]) == []


def test_validate_pools_name_length_boundary() -> None:
    assert pools.validate_pools([make_pool(name="a" * pools.POOL_NAME_MAX_LENGTH)]) == []
    assert pools.validate_pools([make_pool(name="a1-b2")]) == []
    assert pools.validate_pools([make_pool(name="7")]) == []


NAME_FIX = "use lowercase letters, digits and '-'"

# Each case lists the pools, the keyword arguments of validate_pools and the fragments that the one error message
# must contain, which are the offending value and the fix.
INVALID_CASES: dict[str, tuple[Any, dict[str, Any], list[str]]] = {
    "pools-none": (None, {}, ["sidekiq_pools must be a non-empty list", "got None"]),
    "pools-empty": ([], {}, ["sidekiq_pools must be a non-empty list", "got []"]),
    "pools-mapping": ({"name": "bulk"}, {}, ["must be a non-empty list", "got {'name': 'bulk'}"]),
    "pool-not-mapping": (["bulk"], {}, ["pool #1", "must be a mapping with name, queues and processes", "'bulk'"]),
    "unknown-key": (
        [make_pool(concurency=5)],
        {},
        ["pool 'bulk'", "unknown keys ['concurency']", "known keys are ['autoscale', 'concurrency'"],
    ),
    "name-missing": ([make_pool(name=None)], {}, ["pool '#1'", "missing 'name'", "give each pool a name"]),
    "name-empty": ([make_pool(name="")], {}, ["missing 'name'", "give each pool a name"]),
    "name-not-str": ([make_pool(name=5)], {}, ["pool 5", "missing 'name'"]),
    "name-uppercase": ([make_pool(name="Bulk")], {}, ["invalid name 'Bulk'", NAME_FIX]),
    "name-underscore": ([make_pool(name="bulk_jobs")], {}, ["invalid name 'bulk_jobs'", NAME_FIX]),
    "name-too-long": (
        [make_pool(name="b" * 41)],
        {},
        [f"invalid name '{'b' * 41}'", "at most 40 characters"],
    ),
    "name-leading-dash": ([make_pool(name="-bulk")], {}, ["invalid name '-bulk'", "starting and ending with a letter"]),
    "name-trailing-dash": (
        [make_pool(name="bulk-")],
        {},
        ["invalid name 'bulk-'", "starting and ending with a letter"],
    ),
    "name-dot": ([make_pool(name="bulk.jobs")], {}, ["invalid name 'bulk.jobs'", NAME_FIX]),
    "name-duplicate": (
        [make_pool(), make_pool(queues=["other"])],
        {},
        ["pool 'bulk'", "used by more than one pool", "give each pool a unique name"],
    ),
    "queues-missing": ([make_pool(queues=None)], {}, ["'queues' must be a non-empty list", "got None"]),
    "queues-empty": ([make_pool(queues=[])], {}, ["'queues' must be a non-empty list", "got []"]),
    "queues-string": ([make_pool(queues="default")], {}, ["'queues' must be a non-empty list", "got 'default'"]),
    "queue-triple": (
        [make_pool(queues=[["default", 3, 1]])],
        {},
        ["invalid queue entry ['default', 3, 1]", "write a name ('default') or a pair ['default', 3]"],
    ),
    "queue-mapping": (
        [make_pool(queues=[{"default": 3}])],
        {},
        ["invalid queue entry {'default': 3}", "or a pair ['default', 3]"],
    ),
    "queue-weight-first": ([make_pool(queues=[[3, "default"]])], {}, ["invalid queue entry [3, 'default']"]),
    "queue-name-space": (
        [make_pool(queues=["my queue"])],
        {},
        ["invalid queue name 'my queue'", "use letters, digits"],
    ),
    "queue-name-empty": ([make_pool(queues=[""])], {}, ["invalid queue name ''", "use letters, digits"]),
    "weight-zero": ([make_pool(queues=[["default", 0]])], {}, ["queue 'default' has weight 0", "an integer >= 1"]),
    "weight-negative": ([make_pool(queues=[["default", -2]])], {}, ["has weight -2", "an integer >= 1"]),
    "weight-quoted": ([make_pool(queues=[["default", "3"]])], {}, ["has weight '3'", "an integer >= 1"]),
    "weight-bool": ([make_pool(queues=[["default", True]])], {}, ["has weight True", "an integer >= 1"]),
    "queue-duplicate": (
        [make_pool(queues=["default", "low", "default"])],
        {},
        ["queue 'default' is listed twice", "list it once"],
    ),
    "queue-duplicate-weighted": (
        [make_pool(queues=[["default", 3], ["default", 1]])],
        {},
        ["queue 'default' is listed twice", "list it once"],
    ),
    "queues-mixed": (
        [make_pool(queues=[["default", 3], "low"])],
        {},
        ["queues [['default', 3], 'low'] mix weighted and plain entries", "give every queue a weight", "or none"],
    ),
    "concurrency-quoted": ([make_pool(concurrency="5")], {}, ["concurrency '5' is invalid", "not a quoted string"]),
    "concurrency-zero": ([make_pool(concurrency=0)], {}, ["concurrency 0 is invalid", "a positive integer"]),
    "concurrency-negative": ([make_pool(concurrency=-1)], {}, ["concurrency -1 is invalid", "a positive integer"]),
    "concurrency-float": ([make_pool(concurrency=2.5)], {}, ["concurrency 2.5 is invalid", "a positive integer"]),
    "concurrency-bool": ([make_pool(concurrency=True)], {}, ["concurrency True is invalid", "a positive integer"]),
    "timeout-quoted": ([make_pool(timeout="25")], {}, ["timeout '25' is invalid", "not a quoted string"]),
    "timeout-zero": ([make_pool(timeout=0)], {}, ["timeout 0 is invalid", "a positive integer"]),
    "timeout-negative": ([make_pool(timeout=-5)], {}, ["timeout -5 is invalid", "a positive integer"]),
    "processes-list": ([make_pool(processes=[1, 2])], {}, ["'processes' must be a mapping", "got [1, 2]"]),
    "processes-number": ([make_pool(processes=2)], {}, ["'processes' must be a mapping such as {min: 1, max: 4}"]),
    "min-negative": (
        [make_pool(processes={"min": -1, "max": 2})],
        {},
        ["processes.min -1 is invalid", "an integer >= 0"],
    ),
    "min-quoted": ([make_pool(processes={"min": "1", "max": 2})], {}, ["processes.min '1' is invalid", ">= 0"]),
    "max-zero": ([make_pool(processes={"min": 0, "max": 0})], {}, ["processes.max 0 is invalid", "an integer >= 1"]),
    "max-missing": ([make_pool(processes={"min": 1})], {}, ["processes.max None is invalid", "an integer >= 1"]),
    "min-above-max": (
        [make_pool(processes={"min": 3, "max": 2})],
        {},
        ["processes.min 3 is above processes.max 2", "lower min or raise max"],
    ),
    "app-queue-unserved": (
        [make_pool()],
        {"app_queues": ["default", "low", "mailers"]},
        ["queue 'mailers' is used by the app but served by no pool", "add it to a pool's queues"],
    ),
    "singleton-scaled": (
        [make_pool(queues=["scheduler"], processes={"min": 1, "max": 4})],
        {"singleton_queues": ["scheduler"]},
        ["serves singleton queue 'scheduler' with up to 4 processes", "processes.max 1"],
    ),
    "margin-small": ([make_pool()], {"margin": 4}, ["shutdown margin 4 is too small", "an integer >= 5 seconds"]),
    "margin-zero": ([make_pool()], {"margin": 0}, ["shutdown margin 0 is too small", ">= 5"]),
    "margin-quoted": ([make_pool()], {"margin": "12"}, ["shutdown margin '12' is invalid", "not a quoted string"]),
    "stop-budget-cap": (
        [make_pool(timeout=25)],
        {"margin": 10, "stop_budget_cap": 30},
        ["stop budget 35 s (timeout 25 + margin 10)", "cap of 30 s", "lower the pool's timeout to at most 20"],
    ),
    "stop-budget-no-room": (
        [make_pool(timeout=25)],
        {"margin": 10, "stop_budget_cap": 10},
        ["stop budget 35 s", "cap of 10 s", "lower the shutdown margin or use a platform with a larger cap"],
    ),
}


@pytest.mark.parametrize(("fleet", "options", "fragments"), INVALID_CASES.values(), ids=INVALID_CASES.keys())
def test_validate_pools_rejects(fleet: Any, options: dict[str, Any], fragments: list[str]) -> None:
    errors = pools.validate_pools(fleet, **options)
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0]


def test_validate_pools_reports_every_problem() -> None:
    fleet = [
        make_pool(name="Bulk", concurrency="5"),
        make_pool(name="other", queues=["default", "default"], processes={"min": 3, "max": 1}),
    ]
    errors = pools.validate_pools(fleet, app_queues=["default", "mailers"])
    assert any("invalid name 'Bulk'" in error for error in errors)
    assert any("concurrency '5'" in error for error in errors)
    assert any("queue 'default' is listed twice" in error for error in errors)
    assert any("processes.min 3 is above processes.max 1" in error for error in errors)
    assert any("queue 'mailers'" in error for error in errors)
    assert len(errors) == 5


def test_validate_pools_margin_boundary() -> None:
    assert pools.validate_pools([make_pool()], margin=pools.MIN_SHUTDOWN_MARGIN) == []


def test_validate_pools_stop_budget_boundary() -> None:
    assert pools.validate_pools([make_pool(timeout=20)], margin=10, stop_budget_cap=30) == []


def test_validate_pools_singleton_fixed_pool() -> None:
    fleet = [
        make_pool(name="scheduler", queues=["scheduler"], processes={"min": 1, "max": 1}),
        make_pool(name="solo", queues=["cron"], processes=None),
    ]
    assert pools.validate_pools(fleet, singleton_queues=["scheduler", "cron"]) == []


def test_validate_pools_queue_served_by_second_pool() -> None:
    fleet = [make_pool(name="critical", queues=["critical"]), make_pool(name="bulk", queues=["low"])]
    assert pools.validate_pools(fleet, app_queues=["low", "critical"]) == []


# --- Redis versions ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7.0.15", (7, 0, 15)),
        ("7.2", (7, 2)),
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0", (7, 0, 15)),
        ("6.2.14-alpine", (6, 2, 14)),
        ("10.0.1", (10, 0, 1)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert pools.parse_version(text) == expected


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="cannot read a version number from 'unknown'"):
        pools.parse_version("unknown")


@pytest.mark.parametrize(
    ("major", "version"),
    [
        (6, "4.0.0"),
        (6, "5.0.14"),
        (6, "7.0.15"),
        (7, "6.2.0"),
        (7, "6.2"),
        (7, "7.0.15"),
        (8, "7.0.0"),
        (8, "7.2.4"),
        (8, "10.0.0"),
    ],
)
def test_redis_version_compatible(major: int, version: str) -> None:
    assert pools.redis_version_errors(major, version) == []


@pytest.mark.parametrize(
    ("major", "version", "needed"),
    [
        (6, "3.2.12", "4.0"),
        (7, "6.0.16", "6.2"),
        (7, "6.1.9", "6.2"),
        (7, "5.0.14", "6.2"),
        (8, "6.2.14", "7.0"),
        (8, "6.9.99", "7.0"),
    ],
)
def test_redis_version_too_old(major: int, version: str, needed: str) -> None:
    errors = pools.redis_version_errors(major, version)
    assert len(errors) == 1
    assert f"Redis {version} is too old for Sidekiq {major}" in errors[0]
    assert f"needs Redis >= {needed}" in errors[0]
    assert "upgrade Redis" in errors[0]


def test_redis_version_from_server_output() -> None:
    errors = pools.redis_version_errors(7, "Redis server v=6.0.16 sha=00000000:0 malloc=jemalloc-5.1.0 bits=64")
    assert len(errors) == 1
    assert "too old for Sidekiq 7" in errors[0]


@pytest.mark.parametrize("major", [5, 9])
def test_redis_version_unsupported_major(major: int) -> None:
    errors = pools.redis_version_errors(major, "7.0.15")
    assert errors == [f"Sidekiq major version {major} is not supported; use one of [6, 7, 8]"]


def test_redis_version_unreadable() -> None:
    errors = pools.redis_version_errors(7, "latest")
    assert len(errors) == 1
    assert "'latest'" in errors[0]
    assert "for example '7.0.15'" in errors[0]


# --- REDIS_URL ---


def test_redis_url_without_credentials() -> None:
    assert pools.redis_url("127.0.0.1") == "redis://127.0.0.1:6379/0"
    assert pools.redis_url("redis.internal", port=6380, db=2) == "redis://redis.internal:6380/2"
    assert pools.redis_url("10.0.0.5", port="6381", db="3") == "redis://10.0.0.5:6381/3"  # type: ignore[arg-type]


def test_redis_url_tls_scheme() -> None:
    assert pools.redis_url("redis.internal", tls=True).startswith("rediss://")


@pytest.mark.parametrize(
    ("password", "encoded"),
    [
        ("p@ss", "p%40ss"),
        ("a/b", "a%2Fb"),
        ("a:b", "a%3Ab"),
        ("100%", "100%25"),
        ("x#y", "x%23y"),
        ("local-sidekiq-p@ss/word", "local-sidekiq-p%40ss%2Fword"),
        ("@/:%#?[]+ ", "%40%2F%3A%25%23%3F%5B%5D%2B%20"),
    ],
)
def test_redis_url_encodes_password(password: str, encoded: str) -> None:
    url = pools.redis_url("127.0.0.1", username="sidekiq", password=password)
    assert url == f"redis://sidekiq:{encoded}@127.0.0.1:6379/0"
    parsed = parse_url(url)
    assert parsed["password"] == password
    assert parsed["username"] == "sidekiq"
    assert parsed["host"] == "127.0.0.1"


def test_redis_url_encodes_username() -> None:
    url = pools.redis_url("127.0.0.1", username="team:a@b", password="secret")
    assert url == "redis://team%3Aa%40b:secret@127.0.0.1:6379/0"
    assert parse_url(url)["username"] == "team:a@b"


def test_redis_url_username_without_password() -> None:
    assert pools.redis_url("127.0.0.1", username="sidekiq") == "redis://sidekiq@127.0.0.1:6379/0"
    assert pools.redis_url("127.0.0.1", username="sidekiq", password="") == "redis://sidekiq@127.0.0.1:6379/0"


def test_redis_url_password_without_username() -> None:
    url = pools.redis_url("127.0.0.1", password="p@ss")
    assert url == "redis://:p%40ss@127.0.0.1:6379/0"
    assert parse_url(url)["password"] == "p@ss"


@pytest.mark.parametrize(
    ("host", "bracketed"),
    [("::1", "[::1]"), ("2001:db8::5", "[2001:db8::5]"), ("[::1]", "[::1]"), ("fd00::6379", "[fd00::6379]")],
)
def test_redis_url_ipv6_host(host: str, bracketed: str) -> None:
    url = pools.redis_url(host, port=6390, db=1, username="sidekiq", password="a:b@c")
    assert url == f"redis://sidekiq:a%3Ab%40c@{bracketed}:6390/1"
    parsed = parse_url(url)
    assert parsed["host"] == bracketed.strip("[]")
    assert parsed["port"] == 6390
    assert parsed["db"] == 1
    assert parsed["password"] == "a:b@c"


# --- filters ---


def test_filters_are_registered() -> None:
    filters = pool_filters.FilterModule().filters()
    assert set(filters) == {
        "sidekiq_pool_errors",
        "sidekiq_config",
        "sidekiq_stop_budget",
        "sidekiq_redis_clients",
        "sidekiq_queue_names",
        "sidekiq_instance_counts",
        "sidekiq_redis_version_errors",
        "redis_url",
        "sidekiq_instance_plan",
        "sidekiq_restart_items",
        "sidekiq_kubernetes_autoscaled",
    }


def test_kubernetes_autoscaled_follows_the_worker_role() -> None:
    pools = [
        {"name": "default", "processes": {"min": 1, "max": 4}},
        {"name": "critical", "processes": {"min": 2, "max": 2}},
        {"name": "bulk", "processes": {"min": 1, "max": 8}},
        {"name": "reports"},
        {"name": "pinned", "processes": {"min": 3, "max": 3}},
    ]
    settings = {"bulk": {"autoscaler": "keda"}, "pinned": {"autoscaler": "sidekiq-ops"}}

    assert pool_filters.sidekiq_kubernetes_autoscaled(pools, settings) == ["default", "pinned"]
    assert pool_filters.sidekiq_kubernetes_autoscaled(pools) == ["default", "bulk"]


def test_filter_redis_version_errors_argument_order() -> None:
    assert pool_filters.sidekiq_redis_version_errors("6.0.16", 6) == []
    assert len(pool_filters.sidekiq_redis_version_errors("6.0.16", "7")) == 1  # type: ignore[arg-type]


def test_filter_redis_url_converts_strings() -> None:
    url = pool_filters.redis_url("127.0.0.1", port="6380", db="1", password="p@ss", tls="")  # type: ignore[arg-type]
    assert url == "redis://:p%40ss@127.0.0.1:6380/1"


def test_filter_pool_errors_passes_options() -> None:
    errors = pool_filters.sidekiq_pool_errors([make_pool()], app_queues=["mailers"], margin=5, stop_budget_cap=12)
    assert len(errors) == 2
    assert "queue 'mailers'" in errors[1]
    assert "cap of 12 s" in errors[0]
