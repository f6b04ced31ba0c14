"""The controller's allocation problem, solved exactly as a MILP with
``scipy.optimize.milp`` (HiGHS): how many GPUs each tier gets, and how prompts are routed.

Two formulations (``docs/controller.md`` has the mathematics):

- ``"argus"``, Argus as published: integer GPUs per tier ``n_k`` and served load per tier
  ``x_k``, maximising tier-mean quality ``sum_k q_k x_k``; the routing matrix then comes
  from the distribution aligner (:func:`services.controller.aligner.align`).
- ``"flow"``, prompt-aware: the load of each predicted tier ``i`` flows to serving tiers
  ``j`` (``y_ij``) with per-prompt quality ``Q_ij``; the flows are the routing matrix.

Both share the rest of the model. Units: loads and capacities in jobs/s; the objective
in quality-weighted jobs/s. Guarantees of :func:`solve` (for valid inputs):

- Every alive GPU is given exactly one tier: ``sum_k n_k == gpus``.
- Throughput first: the unserved load is exactly ``max(0, L - gpus * max_k c_k)`` with
  ``c_k = capacity_per_gpu_k * (1 - headroom)``, i.e. it is positive only when even
  every GPU at the fastest tier cannot keep up (an infinite unserved-load penalty,
  enforced as a bound rather than a large coefficient).
- Within that, the solution maximises quality-weighted served load minus the model-switch
  cost and the hysteresis cost (below), to HiGHS's optimality tolerances (and up to the
  tie-break and the flow's :data:`DEMOTION_COST`, both far below 0.1 % of a GPU).
- Switch cost: a GPU that must load model ``M`` (more GPUs on ``M``'s tiers than GPUs
  holding ``M`` now) costs ``switch_weight * load_time_s[M] / switch_horizon_s *
  max_{k on M} c_k q_k``: the quality-weighted load it cannot serve while loading,
  amortised over the horizon a new plan is expected to hold (uncapped: a load longer
  than the horizon costs more than one GPU's value). Tiers of one model (cache/steps
  variants) switch for free.
- Hysteresis: each GPU that changes tier costs ``hysteresis * max_k c_k``, so a plan
  is only replaced by one that is better by more than that.
- Ties (e.g. idle GPUs at light load on a fresh start) go to the least approximate tier:
  a bonus of at most ``min(0.001, hysteresis / 4) * max_k c_k`` per GPU, smaller than
  one move's hysteresis (when that is > 0), so it never moves a GPU by itself.
  Deterministic: the same input gives the same plan.
- ``gpus == 0`` or ``load == 0`` never raise: all load unserved, resp. no load served.
- Routing rows sum to 1 (prompts of unloaded classes go to the nearest tier with GPUs,
  lossless first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from common.tiers import Registry
from services.controller.aligner import align, fallback_row

Formulation = Literal["argus", "flow"]
FORMULATIONS: tuple[Formulation, ...] = ("argus", "flow")

_TOL = 1e-9
DEMOTION_COST = 1e-5
"""Flow formulation: cost per tier of demotion, per unit of normalised load, so that
among lossless choices a prompt stays at its predicted tier."""


@dataclass(frozen=True)
class TierSpec:
    """What the solver needs to know about one tier.

    Attributes:
        id: Tier id (0 = exact; higher = more approximate).
        capacity_per_gpu: Jobs/s one GPU sustains at this tier (> 0).
        quality: Mean quality relative to the exact tier (exact = 1.0).
        model: The model the tier runs (tiers sharing a model switch for free).
    """

    id: int
    capacity_per_gpu: float
    quality: float
    model: str


def specs_from_registry(registry: Registry, device: str, quality: Mapping[int, float],
                        batch: int | None = None, budget_s: float | None = None
                        ) -> list[TierSpec]:
    """Tier specs from the registry's latency profiles.

    ``capacity_per_gpu = b / batch_latency(device, b)`` where ``b`` is ``batch`` capped at
    the tier's largest batch size, or, when ``batch`` is None, the tier's serving batch
    (:meth:`common.tiers.Tier.serving_batch` within ``budget_s``; the largest size without
    a budget): a saturated GPU runs full batches of the size the workers use.

    Raises:
        ValueError: A tier has no profile for ``device``, no quality, or ``batch < 1``.
    """
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    specs = []
    for tier in registry.tiers:
        b = tier.serving_batch(device, budget_s) if batch is None else \
            min(batch, tier.max_batch)
        seconds = tier.batch_latency(device, b)
        if seconds is None:
            raise ValueError(f"tier {tier.id} ({tier.name}) has no latency profile for "
                             f"device {device!r}")
        if tier.id not in quality:
            raise ValueError(f"no quality given for tier {tier.id} ({tier.name})")
        specs.append(TierSpec(tier.id, b / seconds, float(quality[tier.id]), tier.model))
    return specs


def default_prompt_quality(specs: Sequence[TierSpec]) -> list[list[float]]:
    """``Q[i][j]``: quality of a prompt predicted at tier ``i`` served at tier ``j``;
    1 for ``j <= i`` (lossless), ``min(1, q_j / q_i)`` for ``j > i``."""
    return [[1.0 if j <= i else min(1.0, b.quality / a.quality) if a.quality > 0 else 0.0
             for j, b in enumerate(specs)] for i, a in enumerate(specs)]


@dataclass(frozen=True)
class SolverConfig:
    """Tunables of the allocation problem.

    Attributes:
        headroom: Fraction of each GPU's capacity kept free (0 <= headroom < 1).
        switch_horizon_s: Seconds over which a model load's lost work is amortised
            (the time a new plan is expected to hold); scales the switch cost.
        switch_weight: Multiplier of the model-switch cost (0 disables it).
        hysteresis: Cost per GPU changing tier, as a fraction of the capacity (jobs/s)
            of one GPU at the fastest tier (0 disables it).
        time_limit_s: HiGHS time limit; on failure a fallback plan is returned.
    """

    headroom: float = 0.1
    switch_horizon_s: float = 60.0
    switch_weight: float = 1.0
    hysteresis: float = 0.02
    time_limit_s: float = 2.0


@dataclass(frozen=True)
class Problem:
    """One control period's input.

    Attributes:
        specs: Tiers, ids ``0..K-1`` in order.
        gpus: Alive GPUs (N_alive >= 0).
        load: Demand to plan for, jobs/s (e.g. ``LoadEstimator.demand``).
        mix: Share of the load per predicted tier ``h_i`` (normalised here; missing tiers
            are 0; all-zero means "all exact").
        current: GPUs per tier now, among the alive ones (empty: a fresh start).
        loaded_models: GPUs holding each model now; defaults to ``current`` summed over
            each model's tiers.
        load_time_s: Seconds to load each model (absent models load for free).
        prompt_quality: ``Q[i][j]``; defaults to :func:`default_prompt_quality`.
    """

    specs: Sequence[TierSpec]
    gpus: int
    load: float
    mix: Mapping[int, float] = field(default_factory=dict)
    current: Mapping[int, int] = field(default_factory=dict)
    loaded_models: Mapping[str, int] | None = None
    load_time_s: Mapping[str, float] = field(default_factory=dict)
    prompt_quality: Sequence[Sequence[float]] | None = None


@dataclass(frozen=True)
class Solution:
    """A plan: GPUs per tier and routing, with what the solver expects of it.

    Attributes:
        gpus_per_tier: ``n_k`` for every tier id (sums to the alive GPUs).
        served: Load expected to be served at each tier, jobs/s.
        unserved: Load beyond the planned capacity, jobs/s (queues up).
        routing: ``P[i][j]`` for every predicted tier ``i``; non-zero entries, rows sum to 1.
        objective: Quality-weighted served load minus switch and hysteresis costs.
        expected_quality: Mean relative quality of served prompts under ``Q``.
        model_loads: GPUs that must load a model for this plan.
        tier_moves: GPUs given a tier they did not serve before (new GPUs included).
        solve_ms: Wall time of the whole solve, milliseconds.
        formulation: ``"argus"`` or ``"flow"``.
        status: ``"optimal"``, or ``"fallback: <reason>"`` when HiGHS failed.
    """

    gpus_per_tier: dict[int, int]
    served: dict[int, float]
    unserved: float
    routing: dict[int, dict[int, float]]
    objective: float
    expected_quality: float
    model_loads: int
    tier_moves: int
    solve_ms: float
    formulation: str
    status: str


class _Milp:
    """A tiny builder for ``scipy.optimize.milp`` (maximisation)."""

    def __init__(self) -> None:
        self.gain: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, gain: float = 0.0, lb: float = 0.0, ub: float = math.inf,
            integer: bool = False) -> int:
        self.gain.append(gain)
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(int(integer))
        return len(self.gain) - 1

    def row(self, coefs: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append((coefs, lo, hi))

    def solve(self, time_limit_s: float) -> np.ndarray | str:
        a = np.zeros((len(self.rows), len(self.gain)))
        for r, (coefs, _, _) in enumerate(self.rows):
            for j, v in coefs.items():
                a[r, j] += v
        res = milp(-np.asarray(self.gain), integrality=np.asarray(self.integer),
                   bounds=Bounds(self.lb, self.ub),
                   constraints=LinearConstraint(a, [r[1] for r in self.rows],
                                                [r[2] for r in self.rows]),
                   options={"time_limit": time_limit_s, "mip_rel_gap": 1e-7})
        if res.status != 0 or res.x is None:
            return str(res.message)
        return np.asarray(res.x)


def _validate(p: Problem, cfg: SolverConfig) -> tuple[list[float], list[list[float]]]:
    """Checked mix ``h`` (sums to 1) and ``Q``; ValueError on invalid input."""
    k_n = len(p.specs)
    if k_n == 0 or [s.id for s in p.specs] != list(range(k_n)):
        raise ValueError("specs must be non-empty with ids 0..K-1 in order")
    if any(not (s.capacity_per_gpu > 0 and math.isfinite(s.capacity_per_gpu))
           or not (s.quality >= 0 and math.isfinite(s.quality)) for s in p.specs):
        raise ValueError("capacity_per_gpu must be finite > 0 and quality finite >= 0")
    if p.gpus < 0 or not (math.isfinite(p.load) and p.load >= 0):
        raise ValueError(f"gpus and load must be >= 0, got {p.gpus}, {p.load}")
    if not 0 <= cfg.headroom < 1 or cfg.switch_horizon_s <= 0:
        raise ValueError("headroom must be in [0, 1) and switch_horizon_s > 0")
    h = [float(p.mix.get(k, 0.0)) for k in range(k_n)]
    if any(not (math.isfinite(v) and v >= 0) for v in h):
        raise ValueError(f"mix must be finite and >= 0, got {dict(p.mix)}")
    total = sum(h)
    h = [v / total for v in h] if total > 0 else [1.0] + [0.0] * (k_n - 1)
    q = [list(map(float, r)) for r in p.prompt_quality] if p.prompt_quality is not None \
        else default_prompt_quality(p.specs)
    if len(q) != k_n or any(len(r) != k_n for r in q):
        raise ValueError(f"prompt_quality must be {k_n}x{k_n}")
    return h, q


def _sparse_row(row: Sequence[float], specs: Sequence[TierSpec]) -> dict[int, float]:
    """A routing row as ``{tier id: share}`` without negligible entries, summing to 1."""
    kept = {specs[j].id: v for j, v in enumerate(row) if v > _TOL}
    total = sum(kept.values())
    return {j: v / total for j, v in kept.items()}


@dataclass(frozen=True)
class _Context:
    """Derived inputs shared by model building and solution reporting."""

    h: list[float]  # predicted-tier mix, sums to 1
    q: list[list[float]]  # Q[i][j]
    cap: list[float]  # jobs/s per GPU after headroom
    scale: float  # jobs/s of one GPU at the fastest tier: the MILP's unit of load
    u_min: float  # unserved load, in units of ``scale``
    cur: list[int]  # GPUs per tier now
    held: Mapping[str, int]  # GPUs holding each model now
    switch_cost: dict[str, float]  # per GPU loading the model, quality-weighted jobs/s
    eta: float  # hysteresis per GPU move, in units of ``scale``


def _context(p: Problem, cfg: SolverConfig) -> _Context:
    h, q = _validate(p, cfg)
    k_n, specs = len(p.specs), p.specs
    cap = [s.capacity_per_gpu * (1 - cfg.headroom) for s in specs]
    scale = max(cap)
    cur = [max(0, int(p.current.get(k, 0))) for k in range(k_n)]
    models = list(dict.fromkeys(s.model for s in specs))
    held = p.loaded_models if p.loaded_models is not None else {
        m: sum(cur[k] for k in range(k_n) if specs[k].model == m) for m in models}
    horizon = cfg.switch_horizon_s
    switch_cost = {m: cfg.switch_weight * max(0.0, p.load_time_s.get(m, 0.0))
                   / horizon * max(cap[k] * specs[k].quality
                                  for k in range(k_n) if specs[k].model == m)
                   for m in models}
    return _Context(h, q, cap, scale, max(0.0, p.load / scale - p.gpus), cur, held,
                    switch_cost, cfg.hysteresis)


def _build(p: Problem, c: _Context, formulation: Formulation
           ) -> tuple[_Milp, list[int], list[list[int]]]:
    """The MILP (loads in units of ``c.scale``); returns it, the ``n`` and ``y`` indices."""
    specs, k_n, load = p.specs, len(p.specs), p.load / c.scale
    eps = min(1e-3, c.eta / 4) if c.eta > 0 else 1e-3  # tie-break: less approximate
    m = _Milp()
    n = [m.var(eps * (1 - k / max(1, k_n - 1)), ub=p.gpus, integer=True) for k in range(k_n)]
    m.row(dict.fromkeys(n, 1.0), p.gpus, p.gpus)
    for k in range(k_n):  # d_k >= |n_k - cur_k|
        d = m.var(-c.eta / 2)
        m.row({d: 1.0, n[k]: -1.0}, -c.cur[k], math.inf)
        m.row({d: 1.0, n[k]: 1.0}, c.cur[k], math.inf)
    for mod, cost in c.switch_cost.items():  # s_M >= sum_{k on M} n_k - held_M
        if cost > 0:  # s_M is integral at the optimum (n and held are): continuous
            s = m.var(-cost / c.scale)
            m.row({s: 1.0, **{n[k]: -1.0 for k in range(k_n) if specs[k].model == mod}},
                  -float(c.held.get(mod, 0)), math.inf)
    u = m.var(0.0, lb=c.u_min, ub=c.u_min + _TOL * max(1.0, load))
    y: list[list[int]] = []
    if formulation == "argus":
        x = [m.var(specs[k].quality) for k in range(k_n)]
        for k in range(k_n):
            m.row({x[k]: 1.0, n[k]: -c.cap[k] / c.scale}, -math.inf, 0.0)
        m.row({**dict.fromkeys(x, 1.0), u: 1.0}, load, load)
    else:
        h = c.h
        y = [[m.var(c.q[i][j] - DEMOTION_COST * max(0, i - j),
                    ub=math.inf if h[i] > 0 else 0.0) for j in range(k_n)] for i in range(k_n)]
        for i in range(k_n):
            m.row({**dict.fromkeys(y[i], 1.0), u: h[i]}, h[i] * load, h[i] * load)
        for j in range(k_n):
            m.row({**{y[i][j]: 1.0 for i in range(k_n)}, n[j]: -c.cap[j] / c.scale},
                  -math.inf, 0.0)
    return m, n, y


def solve(problem: Problem, formulation: Formulation = "flow",
          config: SolverConfig | None = None) -> Solution:
    """Solve one control period's allocation exactly (see the module guarantees).

    Args:
        problem: The inputs.
        formulation: ``"argus"`` (published: tier-mean quality, then the aligner) or
            ``"flow"`` (prompt-aware flows).
        config: Tunables; defaults to ``SolverConfig()``.

    Returns:
        The plan. A HiGHS failure (time limit) yields a fallback plan, never an exception:
        the current allocation when it covers every alive GPU, else every GPU at the
        fastest tier; its routing comes from the aligner.

    Raises:
        ValueError: Invalid inputs (ids, negative load or GPUs, malformed mix or Q).
    """
    t0 = time.perf_counter()
    cfg = config or SolverConfig()
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    c = _context(problem, cfg)
    specs, k_n, h = problem.specs, len(problem.specs), c.h
    m, n, y = _build(problem, c, formulation)
    result = m.solve(cfg.time_limit_s)
    flows = None
    if isinstance(result, str):
        status = f"fallback: {result}"
        gpus = list(c.cur) if sum(c.cur) == problem.gpus else [0] * k_n
        if sum(c.cur) != problem.gpus:
            gpus[max(range(k_n), key=lambda k: c.cap[k])] = problem.gpus
    else:
        status = "optimal"
        gpus = [round(result[v]) for v in n]
        if formulation == "flow":
            flows = [[max(0.0, float(result[v])) for v in row] for row in y]
    capacity = [c.cap[k] * gpus[k] for k in range(k_n)]
    if flows is not None:
        routing = [[v / sum(r) for v in r] if h[i] > 0 and sum(r) > _TOL
                   else fallback_row(i, capacity) for i, r in enumerate(flows)]
    else:
        routing = align([v * problem.load for v in h], capacity)
    unserved = c.u_min * c.scale if problem.load > 0 else 0.0
    served_total = problem.load - unserved
    served = [sum(h[i] * routing[i][j] for i in range(k_n)) * served_total
              for j in range(k_n)]
    expected = sum(h[i] * routing[i][j] * c.q[i][j] for i in range(k_n) for j in range(k_n))
    quality_value = expected * served_total if formulation == "flow" \
        else sum(specs[j].quality * served[j] for j in range(k_n))
    loads = {mod: max(0, sum(gpus[k] for k in range(k_n) if specs[k].model == mod)
                      - int(c.held.get(mod, 0))) for mod in c.switch_cost}
    changes = sum(abs(gpus[k] - c.cur[k]) for k in range(k_n))
    objective = quality_value - sum(c.switch_cost[mod] * v for mod, v in loads.items()) \
        - c.eta * c.scale * changes / 2
    return Solution(
        gpus_per_tier={s.id: gpus[k] for k, s in enumerate(specs)},
        served={s.id: served[k] for k, s in enumerate(specs)},
        unserved=unserved,
        routing={specs[i].id: _sparse_row(row, specs) for i, row in enumerate(routing)},
        objective=objective,
        expected_quality=expected,
        model_loads=sum(loads.values()),
        tier_moves=sum(max(0, gpus[k] - c.cur[k]) for k in range(k_n)),
        solve_ms=(time.perf_counter() - t0) * 1e3,
        formulation=formulation,
        status=status,
    )
