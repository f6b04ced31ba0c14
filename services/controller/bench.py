"""``argus bench solver``: solve time of the controller's allocation MILP.

For 8/16/64 GPUs x 6/12 tiers and both formulations, solves ``repeats`` seeded synthetic
instances and reports the median (and max) wall time of
:func:`services.controller.solver.solve` in milliseconds, as a JSON list of
``{gpus, tiers, formulation, median_ms, max_ms, repeats}`` (``--json``) or a table.
The same instances as ``bench/solver.py`` (whose logic this is, packaged for the CLI):

- 6 tiers: Argus's artifact profile, SDXL with K in {0,5,...,25} of 50 steps skipped,
  ``1.65 / (0.084 s * (50 - K))`` jobs/s per GPU, qualities 1.0 ... 0.915, one model.
- 12 tiers: those six, three fewer-steps SDXL tiers and three lighter models
  (SDXL-Lightning, SD-Turbo, Tiny-SD) with their published load times (12-47 s).
- Each instance: load uniform in 40-110 % of the cluster's fastest capacity, a Dirichlet
  predicted-tier mix, a random current allocation, and +-5 % jitter on capacities.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import numpy as np

from services.controller.solver import FORMULATIONS, Problem, SolverConfig, TierSpec, solve

STEP_S = 0.084  # SDXL seconds per denoising step (Argus artifact profile)
BATCH_GAIN = 1.65  # the artifact's per-GPU batching factor
LOAD_TIME_S = {"sdxl": 47.0, "sdxl-lightning": 47.0, "sd-turbo": 22.0, "tiny-sd": 12.0}
SIZES = ((8, 6), (8, 12), (16, 6), (16, 12), (64, 6), (64, 12))


def base_tiers(count: int) -> list[tuple[float, float, str]]:
    """``(capacity_per_gpu, quality, model)`` of ``count`` (6 or 12) synthetic tiers."""
    tiers = [(BATCH_GAIN / (STEP_S * (50 - k)), q, "sdxl") for k, q in
             zip((0, 5, 10, 15, 20, 25), (1.0, 0.97046, 0.95808, 0.94378, 0.93235, 0.9152),
                 strict=True)]
    if count == 12:
        tiers += [(BATCH_GAIN / (STEP_S * s), q, "sdxl") for s, q in
                  ((20, 0.90), (15, 0.885), (10, 0.86))]
        tiers += [(BATCH_GAIN / 0.9, 0.85, "sdxl-lightning"),
                  (BATCH_GAIN / 0.4, 0.80, "sd-turbo"), (BATCH_GAIN / 0.25, 0.72, "tiny-sd")]
    return tiers


def instance(rng: np.random.Generator, gpus: int, tiers: int) -> Problem:
    """One seeded synthetic problem."""
    specs = [TierSpec(k, cap * float(rng.uniform(0.95, 1.05)), q, model)
             for k, (cap, q, model) in enumerate(base_tiers(tiers))]
    fastest = max(s.capacity_per_gpu for s in specs) * 0.9  # default headroom
    current = np.bincount(rng.integers(0, tiers, size=gpus), minlength=tiers)
    return Problem(specs=specs, gpus=gpus,
                   load=float(rng.uniform(0.4, 1.1)) * gpus * fastest,
                   mix={k: float(v) for k, v in enumerate(rng.dirichlet(np.ones(tiers)))},
                   current={k: int(v) for k, v in enumerate(current)},
                   load_time_s=LOAD_TIME_S)


def run_bench(repeats: int = 25, seed: int = 0,
              sizes: tuple[tuple[int, int], ...] = SIZES) -> list[dict[str, Any]]:
    """Median and max solve time per (GPUs, tiers, formulation), in milliseconds.

    Raises:
        RuntimeError: An instance was not solved to optimality (a fallback plan).
    """
    config = SolverConfig(switch_horizon_s=60.0)
    out = []
    for gpus, tiers in sizes:
        for formulation in FORMULATIONS:
            rng = np.random.default_rng([seed, gpus, tiers])
            times = []
            for _ in range(repeats):
                sol = solve(instance(rng, gpus, tiers), formulation, config)
                if sol.status != "optimal":
                    raise RuntimeError(f"{gpus}x{tiers} {formulation}: {sol.status}")
                times.append(sol.solve_ms)
            out.append({"gpus": gpus, "tiers": tiers, "formulation": formulation,
                        "median_ms": round(statistics.median(times), 2),
                        "max_ms": round(max(times), 2), "repeats": repeats})
    return out


def cmd_solver(args: argparse.Namespace) -> int:
    """``argus bench solver``: print the timings (JSON with ``--json``)."""
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    rows = run_bench(args.repeats, args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))  # noqa: T201
        return 0
    print(f"{'GPUs':>5} {'tiers':>5} {'formulation':>11} {'median ms':>10} {'max ms':>8}")  # noqa: T201
    for r in rows:
        print(f"{r['gpus']:>5} {r['tiers']:>5} {r['formulation']:>11} "  # noqa: T201
              f"{r['median_ms']:>10.2f} {r['max_ms']:>8.2f}")
    return 0


def register(sub: Any) -> None:
    """Add ``argus bench solver`` to the CLI."""
    bench = sub.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser("solver", help="solve time of the allocation MILP")
    p.add_argument("--repeats", type=int, default=25, help="instances per size (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_solver)
