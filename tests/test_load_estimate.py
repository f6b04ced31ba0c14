"""The arrival-rate estimator (Holt's linear smoothing) of the controller."""

from __future__ import annotations

import dataclasses

import pytest

from services.controller.load import LoadEstimator, LoadState


def test_first_observation_sets_the_level() -> None:
    est = LoadEstimator()
    s = est.update(est.initial(), count=50, dt=5.0)
    assert (s.level, s.trend, s.samples) == (10.0, 0.0, 1)
    assert est.forecast(s) == 10.0


def test_update_is_pure() -> None:
    est = LoadEstimator()
    s0 = est.update(est.initial(), 10, 1.0)
    s1 = est.update(s0, 20, 1.0)
    assert s0 == LoadState(10.0, 0.0, 1)
    assert s1 != s0
    assert est.update(s0, 20, 1.0) == s1  # deterministic
    with pytest.raises(dataclasses.FrozenInstanceError):
        s0.level = 3.0  # type: ignore[misc]


def test_converges_to_a_constant_rate_from_a_wrong_start() -> None:
    est = LoadEstimator(level_tau_s=10.0, trend_tau_s=30.0)
    s = LoadState(level=100.0, trend=-2.0, samples=5)
    for _ in range(200):
        s = est.update(s, count=20, dt=2.0)  # 10 jobs/s
    assert s.level == pytest.approx(10.0, rel=1e-6)
    assert s.trend == pytest.approx(0.0, abs=1e-6)
    assert est.forecast(s, 30.0) == pytest.approx(10.0, rel=1e-5)


def test_forecast_follows_a_ramp() -> None:
    """Rate 1 + 0.5 t jobs/s; the forecast one interval ahead matches the next
    interval's mean rate (Holt's method has no steady-state lag on a line)."""
    est = LoadEstimator(level_tau_s=10.0, trend_tau_s=20.0)
    dt, s = 5.0, est.initial()

    def mean_rate(t0: float) -> float:  # mean of 1 + 0.5 t over [t0, t0 + dt]
        return 1.0 + 0.5 * (t0 + dt / 2)

    t = 0.0
    for _ in range(60):
        s = est.update(s, count=mean_rate(t) * dt, dt=dt)
        t += dt
    assert s.trend == pytest.approx(0.5, rel=1e-3)
    assert est.forecast(s, dt) == pytest.approx(mean_rate(t), rel=1e-3)
    assert est.forecast(s, 4 * dt) == pytest.approx(mean_rate(t + 3 * dt), rel=1e-3)
    # A plain EWMA (no trend) would lag by about slope * tau = 5 jobs/s here.
    assert est.forecast(s, dt) - s.level == pytest.approx(0.5 * dt, rel=1e-3)


def test_forecast_is_clipped_at_zero_on_a_falling_rate() -> None:
    est = LoadEstimator(level_tau_s=5.0, trend_tau_s=5.0)
    s = est.initial()
    for rate in (40, 30, 20, 10, 0, 0):
        s = est.update(s, rate * 5.0, 5.0)
    assert s.trend < 0
    assert est.forecast(s, 60.0) == 0.0


def test_demand_adds_the_backlog_to_drain() -> None:
    est = LoadEstimator(horizon_s=10.0, drain_horizon_s=30.0)
    s = est.update(est.initial(), 40, 4.0)  # 10 jobs/s
    assert est.demand(s) == 10.0
    assert est.demand(s, backlog=60) == pytest.approx(12.0)
    assert est.demand(est.initial(), backlog=30) == pytest.approx(1.0)


@pytest.mark.parametrize(("count", "dt"), [(-1, 1.0), (1, 0.0), (1, -2.0),
                                           (float("nan"), 1.0), (1, float("inf"))])
def test_invalid_observations_raise(count: float, dt: float) -> None:
    est = LoadEstimator()
    with pytest.raises(ValueError):
        est.update(est.initial(), count, dt)


def test_invalid_parameters_raise() -> None:
    with pytest.raises(ValueError):
        LoadEstimator(level_tau_s=0.0)
    with pytest.raises(ValueError):
        LoadEstimator(horizon_s=-1.0)
    with pytest.raises(ValueError):
        LoadEstimator().demand(LoadState(), backlog=-1)
    with pytest.raises(ValueError):
        LoadEstimator().forecast(LoadState(), horizon_s=float("nan"))
