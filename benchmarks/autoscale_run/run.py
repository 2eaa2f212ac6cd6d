"""Benchmark one scheduled autoscaling run against the same playbook with a no-op in place of the autoscale task.

    .venv/bin/python benchmarks/autoscale_run/run.py [--pools 1,5,20] [--repeats 9] [--prefix as4]

Creates podman test hosts (<prefix>-redis, <prefix>-worker1, <prefix>-worker2, through scripts/testhosts.sh; it
replaces hosts of the same prefix, so never run it while tests/e2e/test_autoscale_on_hosts.py runs) and deploys
playbooks/site.yml with 1 pool, then 5, then 20 (pool p01 to pNN, one process each, idle). For each size it times
whole runs of `ansible-playbook playbooks/autoscale.yml` and of two floors on the same inventory, in alternating
order after warm-up runs:

- debug: the same playbook with `ansible.builtin.debug` in place of the autoscale task, which runs inside the
  controller and transfers no module;
- no-op module: the same playbook with a Python module that returns an empty plan at once (library/autoscale_noop.py),
  so the floor includes Ansible's cost of running any module on the control host.

In an idle fleet every pool keeps its size, so every run ends after the decision play, as most runs of a timer do.
Prints a Markdown table and writes the raw timings as JSON. Removes the hosts at the end unless --keep-hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))

import local_fleet

PLAYBOOK = ROOT / "playbooks" / "autoscale.yml"
DECIDE_TASK = "Decide every pool and plan the units to start and stop"
VARIANTS = ("autoscale", "debug", "noop_module")


def environment(prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "CONTAINERS_CONF": str(ROOT / "tests" / "hosts" / "containers.conf"),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        "SIDEKIQ_OPS_HOSTS_PREFIX": prefix,
    }


def run(command: list[str], env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-2000:]}")
    return completed


def pools(count: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"p{index:02d}",
            "queues": [f"q{index:02d}"],
            "concurrency": 2,
            "timeout": 5,
            "processes": {"min": 1, "max": 3},
            "autoscale": {"target_latency": 10},
        }
        for index in range(1, count + 1)
    ]


def write_inventory(directory: Path, prefix: str, redis_url: str) -> Path:
    inventory = directory / "inventory"
    group_vars = inventory / "group_vars" / "all"
    group_vars.mkdir(parents=True, exist_ok=True)
    hosts = {
        "all": {
            "vars": {
                "ansible_connection": "containers.podman.podman",
                "ansible_python_interpreter": "/usr/bin/python3",
            },
            "children": {
                "redis": {"hosts": {f"{prefix}-redis": None}},
                "sidekiq_workers": {"hosts": {f"{prefix}-worker1": None, f"{prefix}-worker2": None}},
            },
        }
    }
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    local_vars = ROOT / "inventories" / "local" / "group_vars" / "all"
    (group_vars / "redis.yml").write_text((local_vars / "redis.yml").read_text())
    return inventory


def write_pools(inventory: Path, count: int, redis_url: str) -> None:
    sidekiq = {
        "sidekiq_app": "bench",
        "sidekiq_app_src": str(ROOT / "examples" / "demo-app"),
        "sidekiq_app_require": "app.rb",
        "sidekiq_pools": pools(count),
        "sidekiq_redis_password": "{{ redis_sidekiq_password }}",
        "autoscale_redis_url": redis_url,
    }
    (inventory / "group_vars" / "all" / "sidekiq.yml").write_text(yaml.safe_dump(sidekiq, sort_keys=False))


def floor_playbooks(directory: Path) -> dict[str, Path]:
    """Write the two floors: playbooks/autoscale.yml with the autoscale task replaced, nothing else changed."""
    plays = yaml.safe_load(PLAYBOOK.read_text())
    tasks = plays[1]["tasks"]
    index = next(number for number, task in enumerate(tasks) if "sidekiq_ops.fleet.autoscale" in task)
    arguments = tasks[index]["sidekiq_ops.fleet.autoscale"]
    # Both floors get the task's arguments, so Ansible templates the same values (pools, the unit readings of
    # every host from hostvars, the Redis URL); no_log keeps the URL's password out of the debug output.
    replacements = {
        "debug": {"ansible.builtin.debug": {"msg": arguments}, "no_log": True},
        "noop_module": {"autoscale_noop": arguments, "no_log": True},
    }
    paths: dict[str, Path] = {}
    for variant, action in replacements.items():
        changed = json.loads(json.dumps(plays))
        changed[1]["tasks"][index] = {"name": DECIDE_TASK, **action, "register": "_autoscale_plan"}
        folder = directory / variant
        (folder / "library").mkdir(parents=True)
        shutil.copy(HERE / "library" / "autoscale_noop.py", folder / "library" / "autoscale_noop.py")
        path = folder / "autoscale.yml"
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        paths[variant] = path
    paths["autoscale"] = PLAYBOOK
    return paths


def timed_run(playbook: Path, inventory: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one playbook and return its wall time and the decide task's own time, both in seconds."""
    started = time.perf_counter()
    completed = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(playbook)],
        cwd=ROOT,
        env={**env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{playbook} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-2000:]}")
    report = json.loads(completed.stdout)
    task = next(task for play in report["plays"] for task in play["tasks"] if task["task"]["name"] == DECIDE_TASK)
    duration = task["task"]["duration"]
    result = task["hosts"]["localhost"]
    return {
        "wall": wall,
        "decide_task": _seconds(duration["end"]) - _seconds(duration["start"]),
        "actions_planned": result.get("actions_planned", False),
    }


def _seconds(stamp: str) -> float:
    """Parse the json callback's ISO time stamp (UTC, microseconds, trailing Z) into epoch seconds."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def measure(size: int, inventory: Path, playbooks: dict[str, Path], env: dict[str, str], repeats: int) -> dict:
    for variant in VARIANTS:
        for _ in range(2):
            timed_run(playbooks[variant], inventory, env)
    samples: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for repeat in range(repeats):
        order = VARIANTS if repeat % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            samples[variant].append(timed_run(playbooks[variant], inventory, env))
    planned = [sample for sample in samples["autoscale"] if sample["actions_planned"]]
    if planned:
        raise SystemExit(f"{len(planned)} runs with {size} pools planned unit changes; the fleet was not idle")
    medians = {variant: statistics.median(sample["wall"] for sample in samples[variant]) for variant in VARIANTS}
    decide = {variant: statistics.median(sample["decide_task"] for sample in samples[variant]) for variant in VARIANTS}
    return {
        "pools": size,
        "median_wall_s": medians,
        "median_decide_task_s": decide,
        "ratio_to_debug": medians["autoscale"] / medians["debug"],
        "ratio_to_noop_module": medians["autoscale"] / medians["noop_module"],
        "samples": samples,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| pools | autoscale: median s | debug floor: median s | no-op module floor: median s "
        "| ratio to debug | ratio to no-op module | decide task: autoscale s | decide task: no-op module s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        wall = result["median_wall_s"]
        decide = result["median_decide_task_s"]
        lines.append(
            f"| {result['pools']} | {wall['autoscale']:.2f} | {wall['debug']:.2f} | {wall['noop_module']:.2f} "
            f"| {result['ratio_to_debug']:.2f} | {result['ratio_to_noop_module']:.2f} "
            f"| {decide['autoscale']:.2f} | {decide['noop_module']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="1,5,20", help="pool counts to measure, ascending (default 1,5,20)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each variant per pool count")
    parser.add_argument("--prefix", default="as4", help="test host prefix; hosts of that prefix are replaced")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "results.json", help="JSON output file")
    parser.add_argument("--keep-hosts", action="store_true", help="leave the test hosts running at the end")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.pools.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1 or args.repeats < 1:
        parser.error("--pools must be ascending counts of 1 or more, and --repeats at least 1")

    env = environment(args.prefix)
    run(["scripts/testhosts.sh", "up"], env)
    results = []
    try:
        redis_url = local_fleet.local_redis_url(f"{args.prefix}-redis")
        with tempfile.TemporaryDirectory(prefix="autoscale-run-bench-") as temporary:
            directory = Path(temporary)
            inventory = write_inventory(directory, args.prefix, redis_url)
            playbooks = floor_playbooks(directory)
            for size in sizes:
                write_pools(inventory, size, redis_url)
                run(["ansible-playbook", "-i", str(inventory), "playbooks/site.yml"], env)
                result = measure(size, inventory, playbooks, env, args.repeats)
                print(f"{size} pools: {json.dumps(result['median_wall_s'])}", flush=True)
                results.append(result)
    finally:
        if not args.keep_hosts:
            run(["scripts/testhosts.sh", "down"], env)

    report = {
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "repeats": args.repeats,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
