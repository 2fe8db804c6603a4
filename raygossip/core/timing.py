"""Simulated timing, pure and seeded: per-agent slowdown factors, step-time jitter, link delays."""

from __future__ import annotations

import numpy as np

from ..config import TimingConfig


def slowdown_factors(timing: TimingConfig, n: int, seed: int) -> list[float]:
    """One compute slowdown factor per agent: the listed ones, or a seeded `slow_fraction` at `slow_factor`."""
    if timing.slowdown is not None:
        return [float(f) for f in timing.slowdown]
    factors = [1.0] * n
    count = int(round(timing.slow_fraction * n))
    if count and timing.slow_factor > 1.0:
        chosen = np.random.default_rng([seed, 0x510]).choice(n, size=count, replace=False)
        for i in chosen:
            factors[int(i)] = float(timing.slow_factor)
    return factors


class StepClock:
    """How long one simulated local step should take on this agent, given how long it really took."""

    def __init__(self, timing: TimingConfig, factor: float, seed: int, agent_id: int) -> None:
        self.base = timing.step_time_s
        self.jitter = timing.jitter
        self.factor = factor
        self.rng = np.random.default_rng([seed, agent_id, 0x717])

    def extra_delay(self, measured_s: float, factor: float | None = None) -> float:
        """Seconds to sleep after a step that took `measured_s`: base time (or the real one) x factor x jitter.
        factor: the one in force for this step (a timeline's), else the agent's own."""
        nominal = self.base if self.base > 0 else measured_s
        noise = 1.0 + self.jitter * abs(float(self.rng.standard_normal())) if self.jitter > 0 else 1.0
        return max(0.0, nominal * (self.factor if factor is None else factor) * noise - measured_s)

    @property
    def active(self) -> bool:
        return self.factor != 1.0 or self.jitter > 0 or self.base > 0


def link_delay(nbytes: int, timing: TimingConfig) -> float:
    """Seconds a message of `nbytes` spends on a link: latency + bytes / bandwidth."""
    seconds = timing.latency_s
    if timing.bandwidth_mbps is not None:
        seconds += nbytes * 8 / (timing.bandwidth_mbps * 1e6)
    return seconds
