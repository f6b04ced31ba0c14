"""Solve time of the controller's allocation MILP (``services/controller/solver.py``).

For 8/16/64 GPUs x 6/12 tiers and both formulations, solves ``repeats`` seeded synthetic
instances and reports the median (and max) wall time of :func:`solve` in milliseconds,
as a JSON list of ``{gpus, tiers, formulation, median_ms, max_ms, repeats}``.

Synthetic inputs (seeded, realistic in shape; real profiles replace them later):
- 6 tiers: Argus's artifact profile, SDXL with K in {0,5,...,25} of 50 steps skipped,
  ``1.65 / (0.084 s * (50 - K))`` jobs/s per GPU, qualities 1.0 ... 0.915, one model.
- 12 tiers: those six, three fewer-steps SDXL tiers and three lighter models
  (SDXL-Lightning, SD-Turbo, Tiny-SD) with their published load times (12-47 s).
- Each instance: load uniform in 40-110 % of the cluster's fastest capacity (light load
  to overload), a Dirichlet predicted-tier mix, a random current allocation, and +-5 %
  jitter on capacities.

The instances and timing loop are ``services/controller/bench.py`` (also ``argus bench
solver --json``); this script adds the formulation comparison.

Target (issue 6): median <= 50 ms for 64 GPUs x 12 tiers. Usage::

    python bench/solver.py [--repeats 25]
    python bench/solver.py --compare --repeats 40 --seed 1   # quality, flow vs argus
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.controller.bench import instance, run_bench
from services.controller.solver import SolverConfig, solve


def compare(repeats: int = 40, seed: int = 1) -> list[dict[str, Any]]:
    """Flow versus published formulation on the same synthetic instances.

    ``quality_gain``: flow minus argus expected quality with switch and hysteresis costs
    off (the pure allocation question). ``net_gain``: with the costs on, flow minus argus
    net value per served job, both valued with per-prompt quality ``Q`` and the same
    costs (the published formulation optimises tier-mean quality instead)."""
    out = []
    free = SolverConfig(hysteresis=0.0, switch_weight=0.0)
    for gpus, tiers in ((8, 6), (16, 6), (8, 12), (64, 12)):
        rng = np.random.default_rng([seed, gpus, tiers])
        gains, nets = [], []
        for _ in range(repeats):
            p = instance(rng, gpus, tiers)
            a, f = solve(p, "argus", free), solve(p, "flow", free)
            gains.append(f.expected_quality - a.expected_quality)
            a, f = solve(p, "argus"), solve(p, "flow")
            served = max(p.load - a.unserved, 1e-9)
            costs = sum(p.specs[j].quality * a.served[j] for j in a.served) - a.objective
            nets.append((f.objective - (a.expected_quality * served - costs)) / served)
        out.append({"gpus": gpus, "tiers": tiers, "instances": repeats,
                    "flow_better": sum(g > 1e-6 for g in gains),
                    "flow_worse": sum(g < -1e-6 for g in gains),
                    "quality_gain_mean": round(statistics.mean(gains), 5),
                    "quality_gain_max": round(max(gains), 5),
                    "net_gain_mean": round(statistics.mean(nets), 5),
                    "net_gain_min": round(min(nets), 5)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--compare``, the comparison); print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true",
                        help="compare the formulations' quality instead of timing them")
    args = parser.parse_args(argv)
    result = compare(args.repeats, args.seed) if args.compare else run_bench(args.repeats,
                                                                            args.seed)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
