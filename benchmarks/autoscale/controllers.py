"""Autoscalers for the simulator: ours, through the real policy module, and three baselines.

The baselines follow the behaviour their vendors document, reduced to what one Sidekiq pool needs:

- `KedaHpa`: the KEDA Redis-lists scaler feeding a Kubernetes HorizontalPodAutoscaler. The list length (LLEN,
  so neither running nor due scheduled jobs) is an AverageValue metric with target `list_length` (5 by
  default). The HPA syncs every 15 s and, because KEDA's `useCachedMetrics` is false by default, KEDA's
  metrics server reads the list afresh for every sync. The 30 s `pollingInterval` only drives the 0 <-> 1
  activation, which a pool with min 1 never uses. Each sync: desired = ceil(list length / target), no change
  while the ratio is within 10 % of 1, scale-up by at most max(4 pods, 100 %), and scale-down only to the
  highest recommendation of the last 300 s.
- `Judoscale`: queue latency (`Sidekiq::Queue#latency`, so due scheduled jobs are unseen) checked every 10 s.
  Above the upscale threshold it adds one process at once and again only after the upscale interval. After ten
  minutes below the downscale threshold it removes one process, and again after each further ten minutes (its
  "downscale delay").
- `HireFire`: checks every 60 s with either the job-queue strategy (desired = ceil(jobs / ratio), where jobs
  counts queued, due scheduled and running jobs) or the latency strategy (one process up above the maximum
  latency, one down below the minimum, where latency includes due scheduled and retry jobs as the
  hirefire-resource Sidekiq macro measures it). A change needs `sensitivity` consecutive checks that ask for it,
  and the upscale and downscale timeouts allow at most one change per direction in that many seconds.

Sources: keda.sh "Redis Lists" scaler page and "Caching Metrics" (KEDA 2.15 docs), the Kubernetes HPA
documentation (defaults as above), judoscale.com "Tuning your application" and "Autoscaling responsiveness",
help.hirefire.io "Timeout options" and "Checkup frequency", and the hirefire-resource-ruby Sidekiq macro.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.policy import (
    Decision,
    PolicyState,
    PoolSignals,
    decide,
    settings_from_pool,
)

from .simulator import Observation, PoolConfig
from .traces import BURST_STARTS


def _clamp(value: int, config: PoolConfig) -> int:
    return min(max(value, config.min_processes), config.max_processes)


def _floor_text(config: PoolConfig) -> str:
    """Return ", min N" for a pool whose minimum is above 1, the floor that a sweep point adds, else ""."""
    return f", min {config.min_processes}" if config.min_processes > 1 else ""


class OurPolicy:
    """Our policy, called exactly as the autoscale module calls it, with the state stored as JSON.

    With `full_signals` False the policy gets neither `upcoming` nor `longest_running`, as from a reader that
    does not count scheduled jobs coming due or the age of running jobs. With `hide_job_ages` every running job
    looks 0 s old, so the policy never spares busy processes and may interrupt long jobs like the baselines do.
    """

    def __init__(
        self,
        config: PoolConfig,
        interval: float = 30.0,
        autoscale: dict[str, float] | None = None,
        full_signals: bool = True,
        hide_job_ages: bool = False,
        name: str = "",
    ) -> None:
        self.name = name or ("ours" if interval == 30.0 else f"ours ({interval:.0f} s runs)")
        self.interval = interval
        self.settings = settings_from_pool(config.pool_dict(autoscale))
        self.full_signals = full_signals
        self.hide_job_ages = hide_job_ages
        self.stored_state = json.dumps(PolicyState().to_dict())
        self.decisions: list[Decision] = []
        self.keep_decisions = False

    def signals(self, observation: Observation) -> PoolSignals:
        """Build the signals the Redis reader would produce for this observation."""
        return PoolSignals(
            backlog=observation.backlog,
            latency=observation.latency,
            busy=observation.busy,
            processes=observation.processes,
            capacity=observation.capacity,
            now=observation.now,
            processed=observation.processed,
            requested=observation.requested,
            idle_processes=observation.idle_processes,
            longest_running=self._longest_running(observation),
            upcoming=observation.upcoming if self.full_signals else None,
            quiet_busy=observation.quiet_busy,
        )

    def _longest_running(self, observation: Observation) -> float | None:
        if self.hide_job_ages:
            return 0.0
        return observation.longest_running if self.full_signals else None

    def desired(self, observation: Observation) -> int:
        state = PolicyState.from_dict(json.loads(self.stored_state))
        decision = decide(self.signals(observation), self.settings, state)
        self.stored_state = json.dumps(decision.state.to_dict())
        if self.keep_decisions:
            self.decisions.append(decision)
        return decision.desired


class KedaHpa:
    """KEDA's Redis-lists scaler with the default HPA behaviour (see the module docstring)."""

    def __init__(
        self,
        config: PoolConfig,
        list_length: float = 5.0,
        sync_period: float = 15.0,
        tolerance: float = 0.1,
        down_window: float = 300.0,
    ) -> None:
        self.name = f"KEDA/HPA (listLength {list_length:g})"
        self.interval = sync_period
        self.config = config
        self.list_length = list_length
        self.tolerance = tolerance
        self.down_window = down_window
        self.recommendations: list[tuple[float, int]] = []

    def desired(self, observation: Observation) -> int:
        now = observation.now
        current = observation.requested
        total = float(observation.queued)
        ratio = total / (self.list_length * current) if current else math.inf
        if current and abs(ratio - 1.0) <= self.tolerance:
            recommendation = current
        else:
            recommendation = math.ceil(total / self.list_length)
        recommendation = _clamp(recommendation, self.config)
        self.recommendations.append((now, recommendation))
        self.recommendations = [item for item in self.recommendations if item[0] > now - self.down_window]
        # Up: no stabilization window by default. Down: the highest recommendation of the window.
        stabilized = current
        if recommendation > current:
            stabilized = recommendation
        elif recommendation < current:
            stabilized = min(current, max(value for _, value in self.recommendations))
        up_limit = max(current + 4, current * 2)
        return _clamp(min(stabilized, up_limit), self.config)


@dataclass
class Judoscale:
    """Judoscale-style latency thresholds (see the module docstring)."""

    config: PoolConfig
    upscale_threshold: float = 10.0
    downscale_threshold: float = 2.0
    upscale_interval: float = 60.0
    downscale_delay: float = 600.0
    interval: float = 10.0
    name: str = ""
    last_upscale: float = -math.inf
    last_downscale: float = -math.inf
    below_since: float | None = None

    def __post_init__(self) -> None:
        thresholds = f"up >{self.upscale_threshold:g} s, down <{self.downscale_threshold:g} s"
        self.name = self.name or f"Judoscale-style ({thresholds}{_floor_text(self.config)})"

    def desired(self, observation: Observation) -> int:
        return _clamp(self._step(observation), self.config)

    def _step(self, observation: Observation) -> int:
        now = observation.now
        current = observation.requested
        # Judoscale's Sidekiq adapter reports queue latency from enqueued_at, so due scheduled jobs are unseen.
        latency = observation.queue_latency
        if latency > self.upscale_threshold:
            self.below_since = None
            if now - self.last_upscale >= self.upscale_interval and current < self.config.max_processes:
                self.last_upscale = now
                return current + 1
            return current
        if latency >= self.downscale_threshold:
            self.below_since = None
            return current
        if self.below_since is None:
            self.below_since = now
        quiet_since = max(self.below_since, self.last_downscale)
        if now - quiet_since >= self.downscale_delay and current > self.config.min_processes:
            self.last_downscale = now
            return current - 1
        return current


@dataclass
class HireFire:
    """HireFire-style manager with the job-queue or the latency strategy (see the module docstring)."""

    config: PoolConfig
    strategy: str = "job_queue"
    ratio: float = 10.0
    maximum_latency: float = 10.0
    minimum_latency: float = 2.0
    upscale_quantity: int = 1
    downscale_quantity: int = 1
    upscale_sensitivity: int = 1
    downscale_sensitivity: int = 2
    upscale_timeout: float = 60.0
    downscale_timeout: float = 120.0
    interval: float = 60.0
    name: str = ""
    up_streak: int = 0
    down_streak: int = 0
    last_up: float = -math.inf
    last_down: float = -math.inf

    def __post_init__(self) -> None:
        if self.strategy not in ("job_queue", "latency"):
            raise ValueError(f"strategy {self.strategy!r} is invalid; use job_queue or latency")
        if not self.name:
            if self.strategy == "job_queue":
                self.name = f"HireFire-style job queue (ratio {self.ratio:g}{_floor_text(self.config)})"
            else:
                thresholds = f"up >{self.maximum_latency:g} s, down <{self.minimum_latency:g} s"
                self.name = f"HireFire-style latency ({thresholds}{_floor_text(self.config)})"

    def _target(self, observation: Observation, current: int) -> int:
        if self.strategy == "job_queue":
            jobs = observation.queued + observation.due_scheduled + observation.busy
            return _clamp(math.ceil(jobs / self.ratio), self.config)
        latency = observation.latency
        if latency > self.maximum_latency:
            return _clamp(current + self.upscale_quantity, self.config)
        if latency < self.minimum_latency:
            return _clamp(current - self.downscale_quantity, self.config)
        return current

    def desired(self, observation: Observation) -> int:
        now = observation.now
        current = observation.requested
        target = self._target(observation, current)
        self.up_streak = self.up_streak + 1 if target > current else 0
        self.down_streak = self.down_streak + 1 if target < current else 0
        if self.up_streak >= self.upscale_sensitivity and now - self.last_up >= self.upscale_timeout:
            self.last_up = now
            self.up_streak = 0
            return target
        if self.down_streak >= self.downscale_sensitivity and now - self.last_down >= self.downscale_timeout:
            self.last_down = now
            self.down_streak = 0
            return target
        return _clamp(current, self.config)


@dataclass
class ReactiveBound:
    """A bound for any autoscaler that runs every `interval` seconds and learns of a burst from the queue.

    It keeps `base` processes outside bursts. At the first run that reads more than `trigger` waiting jobs it requests
    the maximum at once, with no step limit and no estimate to build up, and holds it for `hold` seconds after
    the last such run. A policy that reads the pool at the same interval and keeps the same count between bursts
    cannot start processes earlier or more at once, so the bound's p95 wait is the lowest such a policy reaches.
    It knows the trace (the burst rate needs the maximum, and bursts last 300 s), so it is a yardstick, not an
    autoscaler.
    """

    config: PoolConfig
    base: int = 2
    trigger: int = 50
    hold: float = 330.0
    interval: float = 30.0
    name: str = ""
    until: float = -math.inf

    def __post_init__(self) -> None:
        self.name = self.name or f"reactive bound ({self.interval:g} s runs, base {self.base})"

    def desired(self, observation: Observation) -> int:
        if observation.backlog > self.trigger:
            self.until = observation.now + self.hold
        if observation.now < self.until:
            return self.config.max_processes
        return _clamp(self.base, self.config)


@dataclass
class InstantBound:
    """A bound for any autoscaler that does not know of a burst before it starts.

    It keeps `base` processes outside bursts and requests the maximum in the very second a burst of the `bursts`
    trace starts, which it reads from the trace (BURST_STARTS), holding it for `hold` seconds. No autoscaler that
    learns of a burst from the pool's queue can react sooner, because the queue first has to grow. Its processes
    still boot for the full boot delay, so the jobs of each burst's first seconds wait for them. It is a yardstick,
    not an autoscaler, and runs only on `bursts`.
    """

    config: PoolConfig
    base: int = 2
    hold: float = 330.0
    interval: float = 1.0
    starts: tuple[float, ...] = BURST_STARTS
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"instant bound (base {self.base})"

    def desired(self, observation: Observation) -> int:
        if any(start <= observation.now < start + self.hold for start in self.starts):
            return self.config.max_processes
        return _clamp(self.base, self.config)
