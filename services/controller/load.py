"""Arrival-rate estimation for the controller: Holt's linear (double exponential)
smoothing of per-interval arrival counts, a short-horizon forecast, and the demand the
allocator must plan for (forecast plus the backlog to drain).

Units, throughout: rates in **jobs per second**, trends in jobs per second per second,
times in seconds, backlogs in jobs.

The model. Each control interval of length ``dt`` contributes one observation, the mean
arrival rate ``r = count / dt`` over that interval. With ``a = 1 - exp(-dt / level_tau_s)``
and ``b = 1 - exp(-dt / trend_tau_s)`` (so the smoothing does not depend on how the
period is cut into intervals)::

    level' = a * r + (1 - a) * (level + trend * dt)
    trend' = b * (level' - level) / dt + (1 - b) * trend

The first observation sets ``level = r`` and ``trend = 0``. ``level`` estimates the rate
of the latest interval; ``forecast(h) = max(0, level + trend * h)`` the rate ``h``
seconds later (with equal intervals, ``forecast(dt)`` is the next interval's mean rate).

Guarantees:
- Pure and deterministic: :class:`LoadState` is immutable and every method returns a
  new value computed from its arguments only.
- A constant rate ``r`` is reproduced exactly once observed (level ``r``, trend 0), and
  a series converges geometrically to any constant rate from any starting state.
- A linear ramp is tracked without steady-state bias (Holt's method is exact on lines).
- Forecasts and demands are never negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LoadState:
    """The smoothed arrival process after some observations.

    Attributes:
        level: Smoothed arrival rate of the latest interval, jobs/s.
        trend: Smoothed change of the rate, jobs/s per second.
        samples: Number of observations folded in (0: nothing observed yet).
    """

    level: float = 0.0
    trend: float = 0.0
    samples: int = 0


@dataclass(frozen=True)
class LoadEstimator:
    """Parameters of the estimator; its methods are pure functions of a state.

    Attributes:
        level_tau_s: Time constant of the level smoothing, seconds (smaller: faster
            reaction, more noise).
        trend_tau_s: Time constant of the trend smoothing, seconds.
        horizon_s: Default forecast horizon, seconds (typically one control period).
        drain_horizon_s: The backlog is planned to be drained within this many
            seconds: it adds ``backlog / drain_horizon_s`` jobs/s to the demand.
    """

    level_tau_s: float = 20.0
    trend_tau_s: float = 60.0
    horizon_s: float = 10.0
    drain_horizon_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("level_tau_s", "trend_tau_s", "drain_horizon_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.horizon_s) and self.horizon_s >= 0):
            raise ValueError(f"horizon_s must be a finite number >= 0, got {self.horizon_s}")

    def initial(self) -> LoadState:
        """The state before any observation (rate 0, no trend)."""
        return LoadState()

    def update(self, state: LoadState, count: float, dt: float) -> LoadState:
        """Fold in one interval: ``count`` arrivals during the last ``dt`` seconds.

        Args:
            state: The state after the previous interval.
            count: Arrivals observed in the interval (>= 0; may be fractional).
            dt: Length of the interval in seconds (> 0).

        Returns:
            The new state; ``state`` is not modified.

        Raises:
            ValueError: ``count`` is negative or not finite, or ``dt`` is not a finite
                positive number.
        """
        if not (math.isfinite(count) and count >= 0):
            raise ValueError(f"count must be a finite number >= 0, got {count}")
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a finite number > 0, got {dt}")
        rate = count / dt
        if state.samples == 0:
            return LoadState(level=rate, trend=0.0, samples=1)
        a = 1.0 - math.exp(-dt / self.level_tau_s)
        b = 1.0 - math.exp(-dt / self.trend_tau_s)
        level = a * rate + (1.0 - a) * (state.level + state.trend * dt)
        trend = b * (level - state.level) / dt + (1.0 - b) * state.trend
        return replace(state, level=level, trend=trend, samples=state.samples + 1)

    def forecast(self, state: LoadState, horizon_s: float | None = None) -> float:
        """The arrival rate expected ``horizon_s`` seconds after the latest interval.

        Args:
            state: The current state.
            horizon_s: Seconds ahead (>= 0); defaults to :attr:`horizon_s`.

        Returns:
            ``max(0, level + trend * horizon_s)`` in jobs/s (0 before any observation).
        """
        h = self.horizon_s if horizon_s is None else horizon_s
        if not (math.isfinite(h) and h >= 0):
            raise ValueError(f"horizon_s must be a finite number >= 0, got {h}")
        return max(0.0, state.level + state.trend * h)

    def demand(self, state: LoadState, backlog: float = 0.0,
               horizon_s: float | None = None) -> float:
        """The load the allocator should plan for: forecast plus backlog to drain.

        Args:
            state: The current state.
            backlog: Jobs waiting now (queued, not yet started), >= 0.
            horizon_s: Forecast horizon; defaults to :attr:`horizon_s`.

        Returns:
            ``forecast(state, horizon_s) + backlog / drain_horizon_s`` in jobs/s, >= 0.

        Raises:
            ValueError: ``backlog`` is negative or not finite.
        """
        if not (math.isfinite(backlog) and backlog >= 0):
            raise ValueError(f"backlog must be a finite number >= 0, got {backlog}")
        return self.forecast(state, horizon_s) + backlog / self.drain_horizon_s
