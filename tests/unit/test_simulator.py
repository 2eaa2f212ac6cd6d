"""Unit tests of the autoscaling benchmark: simulator accounting, queueing theory, baselines and traces."""

from __future__ import annotations

import math
import random
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import policy
from benchmarks.autoscale import run, traces
from benchmarks.autoscale.controllers import HireFire, InstantBound, Judoscale, KedaHpa, OurPolicy, ReactiveBound
from benchmarks.autoscale.simulator import (
    Observation,
    PoolConfig,
    Simulation,
    count_reversals,
    simulate,
)
from benchmarks.autoscale.targets import (
    HIREFIRE_LATENCY,
    HIREFIRE_QUEUE,
    JUDOSCALE,
    KEDA,
    OURS,
    TARGET_FRONTIER,
    TARGET_INTERRUPTED,
    TARGET_KEDA,
    Point,
    check_family,
    check_keda,
    check_targets,
    frontier,
    minutes_at,
)
from benchmarks.autoscale.traces import Trace


@dataclass
class Fixed:
    """A controller that always returns the same count."""

    count: int
    interval: float = 30.0
    name: str = "fixed"

    def desired(self, observation: Observation) -> int:
        return self.count


@dataclass
class Alternating:
    """A controller that switches between two counts on every run, to stress scale-in and scale-out."""

    low: int
    high: int
    interval: float = 20.0
    name: str = "alternating"
    runs: int = 0

    def desired(self, observation: Observation) -> int:
        self.runs += 1
        return self.high if self.runs % 2 else self.low


def make_trace(jobs: list[tuple[float, float, bool]], horizon: float, name: str = "hand-made") -> Trace:
    ordered = sorted(jobs)
    return Trace(
        name=name,
        horizon=horizon,
        times=array("d", [job[0] for job in ordered]),
        durations=array("d", [job[1] for job in ordered]),
        scheduled=bytes(1 if job[2] else 0 for job in ordered),
    )


def poisson_trace(rate: float, mean_service: float, horizon: float, seed: int) -> Trace:
    generator = random.Random(seed)
    jobs = []
    at = generator.expovariate(rate)
    while at < horizon:
        jobs.append((at, generator.expovariate(1.0 / mean_service), False))
        at += generator.expovariate(rate)
    return make_trace(jobs, horizon, "poisson")


def observation(now: float, **overrides: float) -> Observation:
    values: dict[str, float] = {
        "now": now,
        "queued": 0,
        "due_scheduled": 0,
        "latency": 0.0,
        "busy": 0,
        "processes": 1,
        "capacity": 10,
        "requested": 1,
        "idle_processes": 0,
        "longest_running": 0.0,
        "processed": 0,
    }
    values.update(overrides)
    return Observation(**values)  # type: ignore[arg-type]


def erlang_c_wait(servers: int, arrival: float, service: float) -> tuple[float, float]:
    """Return the probability of waiting and the mean wait of an M/M/c queue."""
    load = arrival * service
    waits = policy.erlang_c(servers, load)
    return waits, waits * service / (servers - load)


# Accounting.


def test_every_job_finished_or_still_waiting() -> None:
    generator = random.Random(3)
    jobs = [(generator.uniform(0, 1800), generator.choice([0.5, 2.0, 60.0, 200.0]), generator.random() < 0.2)]
    jobs += [
        (generator.uniform(0, 1800), generator.choice([0.5, 2.0, 60.0, 200.0]), generator.random() < 0.2)
        for _ in range(3000)
    ]
    trace = make_trace(jobs, 1500.0)
    config = PoolConfig(min_processes=1, max_processes=6, stop_timeout=10.0, boot_delay=5.0)
    result = simulate(trace, Alternating(low=1, high=6), config)
    arrived = sum(1 for at in trace.times if at <= trace.horizon)
    assert result.arrived == arrived
    assert result.finished + result.queued_at_end + result.due_at_end + result.running_at_end == arrived
    assert result.finished == len(result.waits)
    # The alternating controller quiets processes with 60 s and 200 s jobs, so some runs are pushed back.
    assert result.interrupted > 0
    assert min(result.waits) >= 0.0


def test_worker_seconds_of_fixed_pool() -> None:
    trace = make_trace([(10.0, 1.0, False)], 600.0)
    result = simulate(trace, Fixed(3), PoolConfig(min_processes=1, max_processes=5, initial_processes=3))
    assert result.worker_seconds == pytest.approx(3 * 600.0)
    assert result.actions == []


def test_boot_delay_counts_as_worker_time() -> None:
    trace = make_trace([(1.0, 1.0, False)], 100.0)
    config = PoolConfig(min_processes=1, max_processes=5, initial_processes=1, boot_delay=30.0)
    result = simulate(trace, Fixed(2, interval=40.0), config)
    # One process for 100 s, a second one from the first run at 40 s to the end, booting included.
    assert result.worker_seconds == pytest.approx(100.0 + 60.0)
    assert result.actions == [(40.0, 1, 2)]


# Queueing theory.


def test_fixed_pool_matches_erlang_c() -> None:
    # Two processes of 5 threads, 8 jobs/s of exponential 1 s jobs: M/M/10 at utilization 0.8.
    config = PoolConfig(concurrency=5, min_processes=2, max_processes=2, initial_processes=2)
    trace = poisson_trace(rate=8.0, mean_service=1.0, horizon=20_000.0, seed=11)
    result = simulate(trace, Fixed(2), config)
    expected_wait_probability, expected_mean_wait = erlang_c_wait(10, 8.0, 1.0)
    waits = list(result.waits)
    measured_mean_wait = sum(waits) / len(waits)
    measured_wait_probability = sum(1 for wait in waits if wait > 0) / len(waits)
    # Tolerance: 10 % of the mean wait and 0.03 of the probability. With this seed the 160,000 jobs measure a
    # mean wait 2 % above Erlang C and a probability of waiting 0.002 below it.
    assert measured_mean_wait == pytest.approx(expected_mean_wait, rel=0.10)
    assert measured_wait_probability == pytest.approx(expected_wait_probability, abs=0.03)


def test_single_thread_matches_m_m_1() -> None:
    # M/M/1 at utilization 0.5: mean wait = rho / (mu - lambda) = 0.5 / 0.5 = 1 s.
    config = PoolConfig(concurrency=1, min_processes=1, max_processes=1, initial_processes=1)
    trace = poisson_trace(rate=0.5, mean_service=1.0, horizon=100_000.0, seed=12)
    result = simulate(trace, Fixed(1), config)
    waits = list(result.waits)
    assert sum(waits) / len(waits) == pytest.approx(1.0, rel=0.10)


# Scale-in and scheduled jobs.


def test_scale_in_quiets_idle_process_first() -> None:
    # Process 1 runs a 500 s job; process 2 is idle. Going to one process must stop process 2, interrupting nothing.
    trace = make_trace([(0.5, 500.0, False)], 200.0)
    config = PoolConfig(min_processes=1, max_processes=2, initial_processes=2, stop_timeout=25.0)
    result = simulate(trace, Fixed(1, interval=60.0), config)
    assert result.interrupted == 0
    assert result.running_at_end == 1
    assert result.worker_seconds == pytest.approx(200.0 + 60.0)


def test_stop_timeout_pushes_job_back() -> None:
    # Two 300 s jobs on two processes; scaling to one quiets a busy process, which is stopped 25 s later.
    trace = make_trace([(0.5, 300.0, False), (0.6, 300.0, False)], 1000.0)
    config = PoolConfig(min_processes=1, max_processes=2, initial_processes=2, stop_timeout=25.0)
    result = simulate(trace, Fixed(1, interval=60.0), config)
    assert result.interrupted == 1
    assert result.finished == 2
    # The pushed-back job restarts at once on a free thread of the remaining process, 85 s after it arrived.
    assert max(result.waits) == pytest.approx(84.5, abs=0.2)
    assert result.worker_seconds == pytest.approx(1000.0 + 85.0)


def test_due_jobs_wait_for_a_running_process() -> None:
    # A pool of zero processes never moves due scheduled jobs to the queue.
    trace = make_trace([(10.0, 1.0, True), (20.0, 1.0, True)], 300.0)
    config = PoolConfig(min_processes=0, max_processes=2, initial_processes=0)
    result = simulate(trace, Fixed(0), config)
    assert result.finished == 0
    assert result.due_at_end == 2
    assert result.seconds_above_target > 0


def test_scheduled_jobs_move_on_poll() -> None:
    trace = make_trace([(12.0, 1.0, True)], 100.0)
    config = PoolConfig(min_processes=1, max_processes=1, initial_processes=1, poll_interval=5.0)
    result = simulate(trace, Fixed(1), config)
    assert result.finished == 1
    assert result.waits[0] == pytest.approx(3.0)


def test_observation_separates_queue_latency() -> None:
    # A pool of zero processes never moves the due scheduled job, so only `latency` includes its age.
    trace = make_trace([(10.0, 1.0, True), (12.0, 1.0, False)], 100.0)
    simulation = Simulation(trace, Fixed(0), PoolConfig(min_processes=0, initial_processes=0))
    simulation.run()
    seen = simulation.observe()
    assert seen.latency == pytest.approx(90.0)
    assert seen.queue_latency == pytest.approx(88.0)
    assert (seen.queued, seen.due_scheduled) == (1, 1)


def test_observation_counts_upcoming_scheduled_jobs() -> None:
    trace = make_trace([(50.0, 1.0, True), (70.0, 1.0, True), (200.0, 1.0, True), (60.0, 1.0, False)], 300.0)
    simulation = Simulation(trace, Fixed(1), PoolConfig(upcoming_window=60.0))
    assert simulation.upcoming(0.0) == 1
    assert simulation.upcoming(10.0) == 2
    assert simulation.upcoming(150.0) == 1
    assert simulation.upcoming(200.0) == 0


# Baselines.


def test_keda_hpa_steps() -> None:
    config = PoolConfig(min_processes=1, max_processes=30)
    keda = KedaHpa(config)
    # 100 jobs in the list: ceil(100 / 5) = 20 pods, but one sync adds at most max(4 pods, 100 %).
    assert keda.desired(observation(15.0, queued=100, requested=2)) == 6
    # At the next sync 6 pods may double to 12.
    assert keda.desired(observation(30.0, queued=100, requested=6)) == 12
    # A fresh scaler reads 21 jobs for 4 pods: the ratio 21 / 20 = 1.05 is within the 10 % tolerance.
    keda_tolerant = KedaHpa(config)
    assert keda_tolerant.desired(observation(15.0, queued=21, requested=4)) == 4


def test_keda_hpa_reads_list_at_every_sync() -> None:
    # KEDA's useCachedMetrics is false by default, so each HPA sync reads the list length of that moment.
    keda = KedaHpa(PoolConfig(min_processes=1, max_processes=30))
    assert keda.desired(observation(15.0, queued=10, requested=2)) == 2
    assert keda.desired(observation(30.0, queued=40, requested=2)) == 6


def test_keda_hpa_ignores_running_and_due_jobs() -> None:
    keda = KedaHpa(PoolConfig(min_processes=1, max_processes=30))
    assert keda.desired(observation(15.0, queued=0, due_scheduled=500, busy=100, requested=1)) == 1


def test_keda_hpa_scale_down_waits_for_window() -> None:
    config = PoolConfig(min_processes=1, max_processes=30)
    keda = KedaHpa(config)
    # 50 jobs for 10 pods is exactly the target: the recommendation is 10 at 15 s.
    assert keda.desired(observation(15.0, queued=50, requested=10)) == 10
    # From 30 s the empty list recommends the minimum, but the highest recommendation of the last 300 s (10, made
    # at 15 s) keeps the count until it leaves the window at 315 s.
    for now in range(30, 315, 15):
        assert keda.desired(observation(float(now), queued=0, requested=10)) == 10
    assert keda.desired(observation(315.0, queued=0, requested=10)) == 1


def test_judoscale_upscale_interval() -> None:
    judoscale = Judoscale(PoolConfig(max_processes=10), upscale_threshold=10.0, upscale_interval=60.0)
    assert judoscale.desired(observation(10.0, queued=50, queue_latency=12.0, requested=2)) == 3
    assert judoscale.desired(observation(20.0, queued=50, queue_latency=15.0, requested=3)) == 3
    assert judoscale.desired(observation(70.0, queued=50, queue_latency=15.0, requested=3)) == 4


def test_judoscale_ignores_due_scheduled_jobs() -> None:
    # Judoscale's Sidekiq adapter reports queue latency, which due scheduled jobs do not have yet.
    judoscale = Judoscale(PoolConfig(max_processes=10), upscale_threshold=10.0)
    assert judoscale.desired(observation(10.0, due_scheduled=500, latency=40.0, requested=2)) == 2


def test_judoscale_downscale_after_ten_minutes() -> None:
    judoscale = Judoscale(PoolConfig(max_processes=10), downscale_threshold=2.0, downscale_delay=600.0)
    steps = {now: judoscale.desired(observation(float(now), requested=5)) for now in range(10, 1210, 10)}
    assert all(count == 5 for now, count in steps.items() if now < 610)
    assert steps[610] == 4
    assert all(count == 5 for now, count in steps.items() if 610 < now < 1210)
    assert judoscale.desired(observation(1210.0, requested=4)) == 3


def test_judoscale_latency_between_thresholds_resets_delay() -> None:
    judoscale = Judoscale(PoolConfig(max_processes=10), downscale_threshold=2.0, downscale_delay=600.0)
    judoscale.desired(observation(10.0, requested=5))
    judoscale.desired(observation(500.0, queued=5, queue_latency=5.0, requested=5))
    # Below the threshold again from 650 s: the ten minutes start over there.
    assert judoscale.desired(observation(650.0, requested=5)) == 5
    assert judoscale.desired(observation(1240.0, requested=5)) == 5
    assert judoscale.desired(observation(1250.0, requested=5)) == 4


def test_baselines_respect_floor() -> None:
    config = PoolConfig(min_processes=3, max_processes=10)
    assert Judoscale(config).desired(observation(10.0, requested=1)) == 3
    assert HireFire(config, strategy="latency").desired(observation(60.0, requested=1)) == 3
    assert HireFire(config, strategy="job_queue").desired(observation(60.0, requested=1)) == 3
    assert "min 3" in Judoscale(config).name
    assert "min" not in Judoscale(PoolConfig()).name


def test_hirefire_job_queue_ratio_and_sensitivity() -> None:
    hirefire = HireFire(PoolConfig(max_processes=20), strategy="job_queue", ratio=10.0, downscale_sensitivity=2)
    # 30 queued and 15 running jobs: ceil(45 / 10) = 5 processes at once.
    assert hirefire.desired(observation(60.0, queued=30, busy=15, requested=2)) == 5
    # Fewer jobs need two consecutive checks before a scale-down.
    assert hirefire.desired(observation(180.0, queued=0, busy=8, requested=5)) == 5
    assert hirefire.desired(observation(240.0, queued=0, busy=8, requested=5)) == 1


def test_hirefire_timeouts_space_changes() -> None:
    hirefire = HireFire(PoolConfig(max_processes=20), strategy="job_queue", ratio=10.0, upscale_timeout=300.0)
    assert hirefire.desired(observation(60.0, queued=50, requested=1)) == 5
    assert hirefire.desired(observation(120.0, queued=100, requested=5)) == 5
    assert hirefire.desired(observation(360.0, queued=100, requested=5)) == 10


def test_hirefire_latency_steps() -> None:
    hirefire = HireFire(PoolConfig(max_processes=20), strategy="latency", downscale_sensitivity=2)
    assert hirefire.desired(observation(60.0, queued=10, latency=30.0, requested=3)) == 4
    assert hirefire.desired(observation(120.0, queued=0, latency=0.0, requested=4)) == 4
    assert hirefire.desired(observation(180.0, queued=0, latency=0.0, requested=4)) == 3


def test_hirefire_latency_counts_due_scheduled_jobs() -> None:
    # The hirefire-resource Sidekiq macro measures the latency of due scheduled and retry jobs too.
    hirefire = HireFire(PoolConfig(max_processes=20), strategy="latency")
    assert hirefire.desired(observation(60.0, due_scheduled=500, latency=40.0, requested=2)) == 3


def test_hirefire_rejects_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="strategy 'magic' is invalid"):
        HireFire(PoolConfig(), strategy="magic")


# Our policy in the simulator.


def test_our_policy_runs_the_module_policy() -> None:
    config = PoolConfig(max_processes=10)
    controller = OurPolicy(config)
    controller.keep_decisions = True
    trace = poisson_trace(rate=10.0, mean_service=2.0, horizon=1800.0, seed=5)
    result = simulate(trace, controller, config)
    assert controller.settings == policy.settings_from_pool(config.pool_dict())
    assert len(controller.decisions) == (1800 // 30)
    assert all(decision.reason for decision in controller.decisions)
    assert result.interrupted == 0
    # 10 jobs/s of 2 s jobs keep 20 threads busy: the policy settles at 3 or 4 processes.
    assert result.series_processes[-1] in (3, 4)


def test_our_policy_without_upcoming_and_job_ages() -> None:
    config = PoolConfig()
    seen = observation(60.0, longest_running=300.0, upcoming=50)
    partial = OurPolicy(config, full_signals=False).signals(seen)
    assert (partial.upcoming, partial.longest_running) == (None, None)
    hidden = OurPolicy(config, hide_job_ages=True).signals(seen)
    assert (hidden.upcoming, hidden.longest_running) == (50, 0.0)
    full = OurPolicy(config).signals(seen)
    assert (full.upcoming, full.longest_running) == (50, 300.0)


def test_reactive_bound_jumps_to_max_and_back() -> None:
    bound = ReactiveBound(PoolConfig(max_processes=20), base=3, trigger=50, hold=90.0)
    assert bound.desired(observation(30.0, queued=10, requested=3)) == 3
    assert bound.desired(observation(60.0, queued=51, requested=3)) == 20
    assert bound.desired(observation(120.0, queued=0, requested=20)) == 20
    assert bound.desired(observation(150.0, queued=0, requested=20)) == 3


def test_instant_bound_maximum_during_burst() -> None:
    bound = InstantBound(PoolConfig(max_processes=20), base=3, hold=60.0, starts=(100.0,))
    assert bound.interval == 1.0
    assert bound.desired(observation(99.0, queued=500)) == 3
    assert bound.desired(observation(100.0)) == 20
    assert bound.desired(observation(159.0)) == 20
    assert bound.desired(observation(160.0, queued=500)) == 3


def test_count_reversals() -> None:
    assert count_reversals([1, 1, -1, 1]) == 2
    assert count_reversals([2, 0, 3, -1, 0, -2]) == 1
    assert count_reversals([]) == 0


# Traces.


def test_generated_traces_repeat_with_their_seed() -> None:
    first, second = traces.scheduled_hourly(), traces.scheduled_hourly()
    assert first.times == second.times
    assert first.durations == second.durations
    other = traces.scheduled_hourly(seed=999)
    assert other.times != first.times


def test_scheduled_trace_has_hourly_bursts() -> None:
    trace = traces.scheduled_hourly()
    scheduled_times = [at for at, flag in zip(trace.times, trace.scheduled, strict=True) if flag]
    assert len(scheduled_times) == 5 * 2000
    assert set(scheduled_times) == {3600.0 * hour for hour in range(1, 6)}
    assert list(trace.times) == sorted(trace.times)


def test_bursts_trace_rate() -> None:
    trace = traces.bursts()
    start = traces.BURST_STARTS[0]
    in_burst = sum(1 for at in trace.times if start <= at < start + 300)
    before = sum(1 for at in trace.times if start - 300 <= at < start)
    assert in_burst == pytest.approx(40 * 300, rel=0.05)
    assert before == pytest.approx(4 * 300, rel=0.15)


def test_bursts_shift_moves_every_burst() -> None:
    shift = 20.0
    trace = traces.bursts(shift=shift)
    for start in traces.BURST_STARTS:
        before = sum(1 for at in trace.times if start <= at < start + shift)
        inside = sum(1 for at in trace.times if start + shift <= at < start + 2 * shift)
        assert before == pytest.approx(4 * shift, abs=20)
        assert inside == pytest.approx(40 * shift, rel=0.2)


def test_load_csv(tmp_path: Path) -> None:
    source = tmp_path / "jobs.csv"
    source.write_text("at,duration,scheduled\n5,2.5,0\n1,1.0,\n3,4,1\n", encoding="utf-8")
    trace = traces.load_csv(source, tail=100.0)
    assert list(trace.times) == [1.0, 3.0, 5.0]
    assert list(trace.durations) == [1.0, 4.0, 2.5]
    assert trace.scheduled == bytes([0, 1, 0])
    assert trace.horizon == 105.0
    assert trace.name == "jobs"


def test_load_csv_names_bad_line(tmp_path: Path) -> None:
    source = tmp_path / "bad.csv"
    source.write_text("at,duration\n1,2\n3,soon\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.csv:3: invalid row"):
        traces.load_csv(source)


def test_load_csv_needs_columns(tmp_path: Path) -> None:
    source = tmp_path / "columns.csv"
    source.write_text("time,length\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing columns \['at', 'duration'\]"):
        traces.load_csv(source)


def test_poisson_helper_rate() -> None:
    trace = poisson_trace(rate=8.0, mean_service=1.0, horizon=1000.0, seed=1)
    assert len(trace) == pytest.approx(8000, rel=0.05)
    assert math.isclose(sum(trace.durations) / len(trace), 1.0, rel_tol=0.05)


# Target checks.


def row(family: str, worker: float, minutes: float, **figures: float) -> dict[str, Any]:
    values: dict[str, Any] = {
        "family": family,
        "controller": f"{family} {worker:g} h",
        "worker_hours": worker,
        "minutes_above_target": minutes,
        "p95_wait": 1.0,
        "interrupted": 0,
    }
    values.update(figures)
    return values


def test_frontier_drops_dominated_points() -> None:
    points = [Point(10.0, 5.0, "a"), Point(12.0, 6.0, "b"), Point(14.0, 2.0, "c"), Point(14.0, 3.0, "d")]
    assert [point.name for point in frontier(points)] == ["a", "c"]


def test_minutes_at_interpolates_frontier() -> None:
    points = [Point(10.0, 6.0, "a"), Point(20.0, 2.0, "b"), Point(30.0, 4.0, "c")]
    assert minutes_at(points, 15.0) == (4.0, [points[0], points[1]])
    # Below the cheapest point its minutes count; above the frontier's last point the line stays flat.
    assert minutes_at(points, 5.0) == (6.0, [points[0]])
    assert minutes_at(points, 25.0) == (2.0, [points[1]])
    assert minutes_at(points, 31.0) is None


def test_family_check_compares_at_equal_worker_time() -> None:
    sweep = [row(JUDOSCALE, 10.0, 6.0), row(JUDOSCALE, 20.0, 2.0)]
    passed = check_family(row(OURS, 15.0, 3.9), JUDOSCALE, sweep)
    assert passed.passed
    assert "3.9 min vs 4.0 min at 15.0 h" in passed.detail
    assert not check_family(row(OURS, 15.0, 4.0), JUDOSCALE, sweep).passed
    # A point that costs less and spends no more minutes beats ours, wherever the other points are.
    assert not check_family(row(OURS, 15.0, 1.0), JUDOSCALE, [*sweep, row(JUDOSCALE, 14.0, 1.0)]).passed


def test_family_check_fails_beyond_sweep() -> None:
    check = check_family(row(OURS, 25.0, 0.0), JUDOSCALE, [row(JUDOSCALE, 10.0, 6.0), row(JUDOSCALE, 20.0, 2.0)])
    assert not check.passed
    assert "more than every sweep point (at most 20.0 h)" in check.detail


def test_keda_check_needs_both_figures() -> None:
    keda = row(KEDA, 20.0, 5.0, p95_wait=10.0)
    assert check_keda(row(OURS, 15.0, 0.0, p95_wait=10.0), keda).passed
    assert not check_keda(row(OURS, 15.1, 0.0, p95_wait=1.0), keda).passed
    assert not check_keda(row(OURS, 10.0, 0.0, p95_wait=10.5), keda).passed


def test_check_targets_covers_every_target() -> None:
    rows = [
        row(OURS, 15.0, 1.0, interrupted=2),
        row(KEDA, 30.0, 5.0, p95_wait=20.0),
        row(JUDOSCALE, 20.0, 2.0),
        row(HIREFIRE_QUEUE, 20.0, 0.5),
    ]
    checks = {(check.target, check.against): check.passed for check in check_targets(rows)}
    assert checks == {
        (TARGET_KEDA, rows[1]["controller"]): True,
        (TARGET_FRONTIER, JUDOSCALE): True,
        (TARGET_FRONTIER, HIREFIRE_QUEUE): False,
        (TARGET_INTERRUPTED, OURS): False,
    }


def test_sweep_floors_raise_minimum() -> None:
    floors = [entry for entry in run.entries() if entry.config.min_processes > 1]
    assert {entry.family for entry in floors} == {JUDOSCALE, HIREFIRE_LATENCY}
    for entry in floors:
        controller = entry.build(entry.config)
        assert f"min {entry.config.min_processes}" in controller.name
        assert entry.config.initial_processes == entry.config.min_processes
    names = [entry.build(entry.config).name for entry in run.entries()]
    assert len(names) == len(set(names))
    assert set(run.PLOTTED) <= set(names)
