"""``loadgen simulate``: a discrete-event simulation of an Argus cluster on a trace.

The workload is built exactly as ``loadgen replay`` builds it (same trace transformations,
prompt assignment and image seeds from ``--seed``), then served in simulated time by the
services' own decision code (:mod:`loadgen.sim_engine`): the classifier's policies, routing
and deadline handling, the controller's load estimator, allocation policies, re-homing
and overload estimate, the gateway's admission rules, the worker's batching, with the
registry's per-batch latency, the control period and the model-switch cost. The summary
has the replay summary's keys (:mod:`loadgen.sim_report`) plus ``mean_quality`` and
``p99_latency_s``; with ``--out DIR`` it writes ``requests.jsonl``, ``control.jsonl`` and
``summary.json`` as a replay's ``--result-dir`` does.

Without ``--prompts`` the prompts are the small world's held-out captions that the quality
table covers (all of them when it covers none), assigned by seeded shuffles. Guarantees:
the same command line gives the same summary, byte for byte (wall time goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.settings import (
    DEFAULT_TIERS_FILE,
    ClassifierSettings,
    ControllerSettings,
    GatewaySettings,
)
from common.tiers import RegistryError, load_registry
from loadgen import prompts as P
from loadgen import traces as T
from loadgen.replay_cli import (
    MAX_SEED,
    _clean,
    add_scaling_args,
    build_prompts,
    build_trace,
    default_slo_ms,
)
from loadgen.sim_engine import SimConfig, Simulator
from loadgen.sim_quality import (
    PREDICTORS,
    classifier_policy,
    load_quality_model,
    read_table,
    world_heldout_prompts,
)
from loadgen.sim_report import records, summary, write
from services.controller.policies import POLICIES, PolicyError, make_policy


def add_parser(sub: Any) -> None:
    """Add the ``simulate`` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("simulate", help="simulate an Argus cluster on an arrival trace",
                       description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", required=True,
                   help="Azure CSV or 'arrival_s[,prompt_id]' CSV (relative paths are also "
                        "looked up in the shared data directory)")
    p.add_argument("--prompts", default=None,
                   help="prompt file or 'world' (default: the small world's held-out "
                        "captions covered by the quality table)")
    p.add_argument("--policy", default="argus", choices=sorted(POLICIES),
                   help="system policy (docs/policies.md)")
    p.add_argument("--predictor", default="table", choices=PREDICTORS,
                   help="per-prompt tier predictor of argus/proteus/diffserve: the quality "
                        "table's oracle label, the trained LightGBM model, or fixed")
    p.add_argument("--formulation", default=None, choices=("flow", "argus"),
                   help="allocation MILP (default: the controller's setting)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (one worker each)")
    p.add_argument("--tiers", type=Path, default=DEFAULT_TIERS_FILE, help="tier registry")
    p.add_argument("--device", default=None, help="latency profile (default: registry's)")
    add_scaling_args(p)
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="simulate only the first S seconds of the trace (after time scaling)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--slo-ms", type=int, default=None,
                   help="latency SLO (default: the registry's, 3x exact batch-1 latency)")
    p.add_argument("--control-period", type=float, default=None, metavar="S",
                   help="controller period (default: T2I_CONTROL_PERIOD_S)")
    p.add_argument("--deadline-policy", default=None, choices=("degrade", "expire"),
                   help="default: T2I_DEADLINE_POLICY")
    p.add_argument("--max-backlog", type=int, default=None,
                   help="gateway cap on unfinished jobs (default: T2I_MAX_BACKLOG)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds simulated after the last arrival; open jobs are unfinished")
    p.add_argument("--quality-file", type=Path, default=None,
                   help="per-prompt quality table (default: T2I_QUALITY_FILE)")
    p.add_argument("--json", action="store_true", help="print the summary JSON")
    p.add_argument("--out", type=Path, default=None,
                   help="write requests.jsonl, control.jsonl and summary.json here")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the options that argparse cannot see, or None."""
    if args.gpus < 1:
        return f"--gpus must be >= 1, got {args.gpus}"
    positive = {"--time-scale": args.time_scale, "--drain-timeout": args.drain_timeout}
    for name in ("rate_scale", "target_utilization", "duration", "slo_ms",
                 "control_period", "max_backlog"):
        if getattr(args, name) is not None:
            positive["--" + name.replace("_", "-")] = getattr(args, name)
    for name, value in positive.items():
        if not value > 0:
            return f"{name} must be > 0, got {value}"
    return None


def simulate(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                 Any, float]:
    """Build the workload and the services' policies, run the simulation.

    Returns:
        The summary, the records, the raw result and the wall time in seconds.

    Raises:
        TraceError, PromptError, RegistryError, PolicyError, ValueError: Bad input.
    """
    registry = load_registry(args.tiers)
    device = args.device or registry.device
    over: dict[str, Any] = {"policy": args.policy, "tiers_file": args.tiers,
                            "profile_device": device}
    for key, value in (("control_period_s", args.control_period),
                       ("formulation", args.formulation), ("quality_file", args.quality_file),
                       ("deadline_policy", args.deadline_policy)):
        if value is not None:
            over[key] = value
    csettings = ControllerSettings(**over)
    clsettings = ClassifierSettings(policy=args.policy, tiers_file=args.tiers,
                                    profile_device=device,
                                    deadline_policy=csettings.deadline_policy)
    gateway = GatewaySettings()
    trace, trace_info = build_trace(args)
    if not len(trace):
        raise T.TraceError("the scaled trace has no arrivals")
    if args.prompts is None:
        table = read_table(csettings.quality_file)
        pool = world_heldout_prompts(set(table.rel) if table else None)
        per_arrival = (P.assign_ids(pool, [int(i) for i in trace.prompt_ids])
                       if trace.prompt_ids is not None else P.assign(pool, len(trace), args.seed))
    else:
        per_arrival = build_prompts(args, trace)
    distinct = list(dict.fromkeys(per_arrival))
    index = {p: i for i, p in enumerate(distinct)}
    seeds = np.random.default_rng([args.seed, 1]).integers(0, MAX_SEED, len(trace)).tolist()
    slo = default_slo_ms(args)
    controller = make_policy(csettings, registry)
    model = load_quality_model(registry, distinct, csettings.quality_file,
                               csettings.quality_tolerance)
    classifier = classifier_policy(args.policy, args.predictor, registry, model, clsettings)
    config = SimConfig(
        gpus=args.gpus, device=device, slo_ms=slo, deadline_policy=csettings.deadline_policy,
        max_backlog=args.max_backlog or gateway.max_backlog,
        overload_max_delay_s=gateway.overload_max_delay_s,
        backlog_retry_after_s=gateway.backlog_retry_after_s,
        drain_timeout_s=args.drain_timeout, seed=args.seed)
    sim = Simulator(registry, csettings, controller, classifier, config,
                    trace.arrivals.tolist(), [index[p] for p in per_arrival], distinct)
    start = time.perf_counter()
    result = sim.run()
    wall = time.perf_counter() - start
    recs = records(result, distinct, seeds, slo, model.quality, model.unclipped,
                   args.seed)
    extra = {"policy": args.policy, "predictor": args.predictor,
             "formulation": csettings.formulation, "gpus": args.gpus, "device": device,
             "registry": registry.name, "control_period_s": csettings.control_period_s,
             "deadline_policy": csettings.deadline_policy, "max_backlog": config.max_backlog,
             "quality_source": model.source, "tier_mean_quality": model.tier_mean,
             "prompts": {"distinct": len(distinct),
                         "in_quality_table": int(model.in_table.sum()),
                         "source": args.prompts or "world held-out captions"}}
    summ = summary(recs, result, slo, len(registry.tiers), extra)
    summ["trace"] = trace_info
    summ["config"] = {k: str(v) if isinstance(v, Path) else v
                      for k, v in vars(args).items() if k != "func"}
    return summ, recs, result, wall


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(s: dict[str, Any]) -> str:
    """A short human summary of a simulated run."""
    lat, sim = s["latency_s"], s["sim"]
    return (f"{sim['policy']} on {sim['gpus']} GPUs ({sim['registry']}, {sim['device']}): "
            f"offered {s['offered']} ({_fmt(s['offered_per_min'], '.1f')}/min), "
            f"completed {s['completed']}, rejected {s['rejected']}, expired {s['expired']}, "
            f"unfinished {s['unfinished']}\n"
            f"throughput {_fmt(s['throughput_per_min'], '.1f')}/min, goodput "
            f"{_fmt(s['goodput_per_min'], '.1f')}/min, SLO {s['slo_ms']} ms, violations "
            f"{_fmt(s['slo_violation_ratio'])}, mean quality {_fmt(s['mean_quality'], '.4f')}\n"
            f"latency p50/p90/p99 {_fmt(lat['p50'])}/{_fmt(lat['p90'])}/{_fmt(lat['p99'])} s, "
            f"tier mix {s['tier_mix']}, plans {sim['plans']}, "
            f"model switches {sim['model_switches']}\n")


def run(args: argparse.Namespace) -> int:
    """Run ``loadgen simulate``: 0, or 2 for bad input."""
    problem = _check(args)
    if problem:
        sys.stderr.write(f"loadgen simulate: {problem}\n")
        return 2
    try:
        summ, recs, result, wall = simulate(args)
    except (T.TraceError, P.PromptError, RegistryError, PolicyError, ValueError) as exc:
        sys.stderr.write(f"loadgen simulate: {exc}\n")
        return 2
    sys.stderr.write(f"loadgen simulate: {summ['offered']} arrivals, "
                     f"{summ['sim']['control_periods']} control periods in {wall:.2f} s\n")
    if args.out is not None:
        write(args.out, recs, result, summ)
    if args.json:
        sys.stdout.write(json.dumps(_clean(summ), indent=2, allow_nan=False) + "\n")
    else:
        sys.stdout.write(render(summ))
    return 0
