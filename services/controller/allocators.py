"""The load- and mix-driven controller policies: Argus and the baselines built on the
same inputs (Proteus, NIRVANA, DiffServe). Pure: no I/O after construction.

Each ``plan`` turns an :class:`~services.controller.policies.Observation` into a
:class:`~services.controller.policies.Draft` whose routing rows are non-negative and sum
to 1 and whose GPU counts sum to the live workers (``tests/test_policies.py``).
Capacities are ``b / latency(b)`` at each tier's serving batch (``specs_from_registry``)
on the planning device (``T2I_PROFILE_DEVICE``, default the registry's), with the
solver's headroom; model load times (the switch cost) from the tiers' ``load_time_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.messages import AllocationPlan
from common.settings import ControllerSettings
from common.tiers import Registry
from services.controller.aligner import fallback_row
from services.controller.policies import (
    Draft,
    Observation,
    Policy,
    PolicyError,
    assign,
    clean_routing,
    current_allocation,
)
from services.controller.quality import QualitySource, load_quality
from services.controller.solver import (
    Formulation,
    Problem,
    SolverConfig,
    TierSpec,
    solve,
    specs_from_registry,
)


@dataclass(frozen=True)
class Planning:
    """What every solver-based policy needs: tiers, quality, tunables."""

    specs: list[TierSpec]
    quality: QualitySource
    config: SolverConfig
    device: str
    load_time_s: dict[str, float]

    @property
    def capacity(self) -> list[float]:
        """Jobs/s one GPU plans for at each tier (after headroom)."""
        return [s.capacity_per_gpu * (1 - self.config.headroom) for s in self.specs]


def planning(settings: ControllerSettings, registry: Registry) -> Planning:
    """Tier specs and quality for ``registry``.

    Raises:
        PolicyError: A tier has no latency profile for the planning device.
    """
    device = settings.profile_device or registry.device
    quality = load_quality(registry, settings.quality_file, settings.quality_tolerance)
    try:
        specs = specs_from_registry(registry, device, quality.q,
                                    budget_s=registry.batch_budget_s(settings.batch_slo_share))
    except ValueError as exc:
        raise PolicyError(f"policy {settings.policy!r} needs latency profiles: {exc} "
                          "(run the latency profiling, or set T2I_PROFILE_DEVICE)") from exc
    config = SolverConfig(headroom=settings.headroom, switch_horizon_s=settings.switch_horizon_s,
                          switch_weight=settings.switch_weight, hysteresis=settings.hysteresis)
    load_times = {t.model: t.load_time_s for t in registry.tiers if t.load_time_s is not None}
    return Planning(specs, quality, config, device, load_times)


def proportional_split(gpus: int, weights: Sequence[float]) -> list[int]:
    """``gpus`` split in proportion to ``weights`` by largest remainder.

    Guarantees: the counts sum to ``gpus``; each is ``floor`` or ``ceil`` of its exact
    share; ties go to the lower index; all-zero weights put every GPU on index 0.
    """
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return [gpus if k == 0 else 0 for k in range(len(weights))]
    exact = [gpus * max(0.0, w) / total for w in weights]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - out[k]), k))
    for k in order[:gpus - sum(out)]:
        out[k] += 1
    return out


@dataclass(frozen=True)
class Cascade:
    """A light/heavy split: ``heavy`` GPUs at the heavy tier, ``light`` at the light one,
    a share ``deferral`` of the load deferred to heavy, ``unserved`` jobs/s left over."""

    heavy: int
    light: int
    deferral: float
    unserved: float


def cascade_split(gpus: int, c_heavy: float, c_light: float, load: float) -> Cascade:
    """DiffServe's allocation in closed form: maximise the deferral share ``f`` (the
    quality proxy: DiffServe maximises its confidence threshold) subject to
    ``f load <= heavy c_heavy`` and ``(1 - f) load <= light c_light``.

    Guarantees: ``heavy + light == gpus``; among splits reaching the largest feasible
    ``f`` the one with the most heavy GPUs (lowest heavy queueing); when no split keeps up
    (overload) every GPU is light, ``f = 0``, and ``unserved = load - gpus c_light``.
    """
    if load <= 0:
        return Cascade(gpus, 0, 1.0, 0.0)
    best: Cascade | None = None
    for heavy in range(gpus + 1):
        f_hi = min(1.0, heavy * c_heavy / load)
        f_lo = max(0.0, 1.0 - (gpus - heavy) * c_light / load)
        if f_lo <= f_hi + 1e-12 and (best is None or f_hi >= best.deferral - 1e-12):
            best = Cascade(heavy, gpus - heavy, f_hi, 0.0)
    if best is not None:
        return best
    return Cascade(0, gpus, 0.0, max(0.0, load - gpus * c_light))


def serving_rows(gpus: Mapping[int, int], n_tiers: int) -> dict[int, dict[int, float]]:
    """Each predicted tier served at itself when it has GPUs, else at the nearest less
    approximate tier with GPUs (lossless), else the nearest more approximate one."""
    cap = [float(gpus.get(k, 0)) for k in range(n_tiers)]
    return {i: {j: v for j, v in enumerate(fallback_row(i, cap)) if v > 0}
            for i in range(n_tiers)}


class _Base:
    name = ""

    def __init__(self, p: Planning) -> None:
        self.p = p
        self.n_tiers = len(p.specs)

    def _detail(self, **extra: object) -> dict[str, object]:
        return {"quality_source": self.p.quality.source, "quality": self.p.quality.detail,
                "device": self.p.device, **extra}

    def _draft(self, obs: Observation, previous: AllocationPlan | None, gpus: dict[int, int],
               routing: Mapping[int, Mapping[int, float]], **kw: object) -> Draft:
        prev = previous.assignments if previous else {}
        names = [w.instance for w in obs.workers]
        detail = self._detail(**{k: v for k, v in kw.items()
                                 if k not in ("unserved", "served", "solve_ms")})
        unserved = kw.get("unserved")
        served = kw.get("served")
        solve_ms = kw.get("solve_ms")
        return Draft(gpus, assign(names, gpus, prev), clean_routing(routing), detail,
                     float(unserved) if isinstance(unserved, int | float) else None,
                     dict(served) if isinstance(served, dict) else {},
                     float(solve_ms) if isinstance(solve_ms, int | float) else None)


class ArgusPolicy(_Base):
    """Argus: the allocation MILP (``flow`` or ``argus`` formulation) on the forecast
    demand and the classifier's predicted-tier mix; its routing matrix is the plan's."""

    name = "argus"

    def __init__(self, p: Planning, formulation: Formulation) -> None:
        super().__init__(p)
        self.formulation = formulation

    def plan(self, obs: Observation, previous: AllocationPlan | None) -> Draft:
        """Solve this period's problem (see :func:`services.controller.solver.solve`)."""
        sol = solve(Problem(self.p.specs, len(obs.workers), obs.demand, obs.mix,
                            current_allocation(obs.workers, previous),
                            load_time_s=self.p.load_time_s,
                            prompt_quality=self.p.quality.prompt_quality),
                    self.formulation, self.p.config)
        return self._draft(obs, previous, sol.gpus_per_tier, sol.routing,
                           formulation=self.formulation, status=sol.status,
                           expected_quality=round(sol.expected_quality, 5),
                           unserved=sol.unserved, served=sol.served, solve_ms=sol.solve_ms)


class ProteusPolicy(_Base):
    """Proteus-style accuracy scaling: the tier split is load-aware (Argus's MILP on
    tier-mean quality, blind to the mix), routing is prompt-agnostic: every row is the
    same, each tier's share of the load the allocation serves."""

    name = "proteus"

    def plan(self, obs: Observation, previous: AllocationPlan | None) -> Draft:
        """Solve with an all-exact mix; every routing row = served shares."""
        sol = solve(Problem(self.p.specs, len(obs.workers), obs.demand, {},
                            current_allocation(obs.workers, previous),
                            load_time_s=self.p.load_time_s),
                    "argus", self.p.config)
        total = sum(sol.served.values())
        cap = self.p.capacity
        shares = ({k: v / total for k, v in sol.served.items() if v > 0} if total > 0 else
                  {k: cap[k] * n for k, n in sol.gpus_per_tier.items() if n > 0})
        if not shares:
            shares = {0: 1.0}
        row_total = sum(shares.values())
        row = {k: v / row_total for k, v in shares.items()}
        return self._draft(obs, previous, sol.gpus_per_tier,
                           {i: dict(row) for i in range(self.n_tiers)},
                           formulation="argus", status=sol.status, unserved=sol.unserved,
                           served=sol.served, solve_ms=sol.solve_ms)


class NirvanaPolicy(_Base):
    """NIRVANA: each prompt is served at the K its cache similarity allows (the
    classifier's prediction), whatever the load. GPUs are split in proportion to the
    work of the predicted-tier mix (``h_k / capacity_k``); routing is the identity where
    a tier has GPUs (else the nearest lossless tier). Load never enters."""

    name = "nirvana"

    def plan(self, obs: Observation, previous: AllocationPlan | None) -> Draft:
        """Proportional split of the live workers; identity routing."""
        cap = self.p.capacity
        weights = [obs.mix.get(k, 0.0) / cap[k] for k in range(self.n_tiers)]
        split = proportional_split(len(obs.workers), weights)
        gpus = dict(enumerate(split))
        return self._draft(obs, previous, gpus, serving_rows(gpus, self.n_tiers))


class DiffServePolicy(_Base):
    """DiffServe's cascade in tier terms: the exact tier is the heavy model, the cheapest
    tier the light one. :func:`cascade_split` picks the split and the deferral share from
    the demand; every routing row is ``{exact: f, cheapest: 1 - f}`` and the classifier
    defers the ``f`` least confident prompts (``services.classifier.baselines``)."""

    name = "diffserve"

    def plan(self, obs: Observation, previous: AllocationPlan | None) -> Draft:
        """Cascade split of the live workers for ``obs.demand``."""
        cap, light = self.p.capacity, self.n_tiers - 1
        c = cascade_split(len(obs.workers), cap[0], cap[light], obs.demand)
        gpus = {k: 0 for k in range(self.n_tiers)}
        gpus[0] += c.heavy
        gpus[light] += c.light
        f = round(c.deferral, 3)
        row = {0: f, light: 1 - f} if 0 < f < 1 else {0 if f >= 1 else light: 1.0}
        served = {0: min(obs.demand * f, c.heavy * cap[0]),
                  light: min(obs.demand * (1 - f), c.light * cap[light])}
        return self._draft(obs, previous, gpus, {i: dict(row) for i in range(self.n_tiers)},
                           deferral=f, unserved=c.unserved, served=served)


def make(name: str, settings: ControllerSettings, registry: Registry) -> Policy:
    """The solver-based controller policy ``name`` (argus, proteus, nirvana, diffserve).

    Raises:
        PolicyError: Missing latency profiles, or an unknown name.
    """
    p = planning(settings, registry)
    if name == "argus":
        return ArgusPolicy(p, settings.formulation)
    if name == "proteus":
        return ProteusPolicy(p)
    if name == "nirvana":
        return NirvanaPolicy(p)
    if name == "diffserve":
        if len(p.specs) < 2:
            raise PolicyError("diffserve needs at least two tiers (heavy and light)")
        return DiffServePolicy(p)
    raise PolicyError(f"{name!r} is not a solver-based policy")
