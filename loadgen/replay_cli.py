"""``loadgen replay``: options, workload preparation, the run, and the result files.

The workload is built in a fixed order, so a command line always means one workload:
read the trace, ``--time-scale``, cut to ``--duration``, then ``--rate-scale`` or
``--target-utilization`` (the peak is measured on the window actually replayed), then
prompts and per-request seeds, all derived from ``--seed``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.settings import DEFAULT_TIERS_FILE
from common.tiers import RegistryError, load_registry
from loadgen import prompts as P
from loadgen import traces as T
from loadgen.replay import ReplayConfig, Replayer, RequestRecord
from loadgen.summary import summarize

DEFAULT_PROMPTS = "prompts/PartiPrompts.tsv"
MAX_SEED = 2**31 - 1


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    """The trace-scaling options shared by ``replay`` and ``simulate``: ``--time-scale``
    and one of ``--rate-scale`` / ``--target-utilization``."""
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival offsets (2: twice as slow)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate-scale", type=float, default=None,
                      help="thin (<1) or replicate (>1) arrivals")
    rate.add_argument("--target-utilization", type=float, default=None, metavar="X",
                      help="scale so peak arrivals/min = X x exact-tier capacity on --gpus")


def add_parser(sub: Any) -> None:
    """Add the ``replay`` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("replay", help="replay an arrival trace against the gateway",
                       description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    p.add_argument("--trace", required=True,
                   help="Azure CSV or 'arrival_s[,prompt_id]' CSV (relative paths are also "
                        "looked up in the shared data directory)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help="prompt file (.tsv/.json/.jsonl/text) or 'world'")
    add_scaling_args(p)
    p.add_argument("--tiers", type=Path, default=DEFAULT_TIERS_FILE,
                   help="tier registry (capacity and default SLO)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs, for --target-utilization")
    p.add_argument("--device", default=None, help="latency profile (default: registry's)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="replay only the first S seconds (after time scaling)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--slo-ms", type=int, default=None,
                   help="latency SLO sent with each job and used to judge it "
                        "(default: the registry's SLO when it loads)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="cap on jobs outstanding (default: open loop)")
    p.add_argument("--size", default=None, help="image size 'WxH' (default: server's)")
    p.add_argument("--result-dir", type=Path, default=None,
                   help="write requests.jsonl and summary.json here")
    p.add_argument("--disable-progress", action="store_true", help="no progress bar")
    p.add_argument("--poll-interval", type=float, default=0.2, help="seconds between polls")
    p.add_argument("--max-pollers", type=int, default=32,
                   help="concurrent status polls (in a separate, lower-priority process)")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds to wait for jobs after the last arrival")
    p.add_argument("--request-timeout", type=float, default=30.0, help="HTTP timeout (s)")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the options that argparse cannot see, or None."""
    if args.target_utilization is not None and not args.gpus:
        return "--target-utilization needs --gpus N"
    positive = {"--time-scale": args.time_scale, "--poll-interval": args.poll_interval,
                "--drain-timeout": args.drain_timeout, "--max-pollers": args.max_pollers}
    for name in ("rate_scale", "target_utilization", "duration", "max_concurrency"):
        if getattr(args, name) is not None:
            positive["--" + name.replace("_", "-")] = getattr(args, name)
    for name, value in positive.items():
        if not value > 0:
            return f"{name} must be > 0, got {value}"
    return None


def build_trace(args: argparse.Namespace) -> tuple[T.Trace, dict[str, Any]]:
    """Read and transform the trace as the options say; returns it with what was done."""
    trace = T.load_trace(args.trace)
    info: dict[str, Any] = {"original": T.describe(trace)}
    if args.time_scale != 1.0:
        trace = T.time_scale(trace, args.time_scale)
    if args.duration is not None:
        trace = T.cut(trace, args.duration)
    if args.rate_scale is not None:
        trace = T.rate_scale(trace, args.rate_scale, args.seed)
        info["rate_scale"] = args.rate_scale
    elif args.target_utilization is not None:
        capacity = T.exact_capacity_per_min(load_registry(args.tiers), args.gpus, args.device)
        trace, factor = T.target_utilization(trace, args.target_utilization, capacity,
                                             args.seed)
        info.update(rate_scale=factor, capacity_per_min=capacity, gpus=args.gpus,
                    target_utilization=args.target_utilization,
                    peak_utilization=T.peak_per_min(trace) / capacity)
    info["replayed"] = T.describe(trace)
    return trace, info


def build_prompts(args: argparse.Namespace, trace: T.Trace) -> list[str]:
    """One prompt per arrival: by the trace's prompt ids if any, else a seeded assignment."""
    pool = P.load_prompts(args.prompts, n=len(trace), seed=args.seed)
    if trace.prompt_ids is not None:
        return P.assign_ids(pool, [int(i) for i in trace.prompt_ids])
    return P.assign(pool, len(trace), args.seed)


def default_slo_ms(args: argparse.Namespace) -> int | None:
    """``--slo-ms``, else the registry's default SLO, else None (no SLO judged)."""
    if args.slo_ms is not None:
        return int(args.slo_ms)
    try:
        return load_registry(args.tiers).default_slo_ms()
    except RegistryError:
        return None


def _clean(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_results(result_dir: Path, records: list[RequestRecord],
                  summary: dict[str, Any]) -> None:
    """Write ``requests.jsonl`` (one line per request, arrival order) and ``summary.json``."""
    result_dir.mkdir(parents=True, exist_ok=True)
    with (result_dir / "requests.jsonl").open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(_clean(rec.to_json()), allow_nan=False) + "\n")
    (result_dir / "summary.json").write_text(
        json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(summary: dict[str, Any]) -> str:
    """A short human summary of a run."""
    lat, lag = summary["latency_s"], summary["send_lag_ms"]
    lines = [
        f"offered {summary['offered']} ({_fmt(summary['offered_per_min'], '.1f')}/min), "
        f"completed {summary['completed']}, rejected {summary['rejected']}, "
        f"failed {summary['failed']}, errors {summary['error']}, "
        f"unfinished {summary['unfinished']}",
        f"throughput {_fmt(summary['throughput_per_min'], '.1f')}/min, goodput "
        f"{_fmt(summary['goodput_per_min'], '.1f')}/min, SLO {summary['slo_ms']} ms, "
        f"violations {_fmt(summary['slo_violation_ratio'], '.3f')}",
        f"latency p50/p90/p99 {_fmt(lat['p50'])}/{_fmt(lat['p90'])}/{_fmt(lat['p99'])} s, "
        f"tier mix {summary['tier_mix']}",
        f"send lag p50/p99/max {_fmt(lag['p50'], '.2f')}/{_fmt(lag['p99'], '.2f')}/"
        f"{_fmt(lag['max'], '.2f')} ms",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run ``loadgen replay``: 0, 1 when no request was accepted, 2 for bad input."""
    problem = _check(args)
    if problem:
        sys.stderr.write(f"loadgen replay: {problem}\n")
        return 2
    try:
        trace, trace_info = build_trace(args)
        prompts = build_prompts(args, trace)
    except (T.TraceError, P.PromptError, RegistryError) as exc:
        sys.stderr.write(f"loadgen replay: {exc}\n")
        return 2
    if not len(trace):
        sys.stderr.write("loadgen replay: the scaled trace has no arrivals\n")
        return 2
    seeds = np.random.default_rng([args.seed, 1]).integers(0, MAX_SEED, len(trace)).tolist()
    slo = default_slo_ms(args)
    config = ReplayConfig(url=args.url, slo_ms=slo, size=args.size,
                          max_concurrency=args.max_concurrency,
                          poll_interval_s=args.poll_interval, max_pollers=args.max_pollers,
                          drain_timeout_s=args.drain_timeout,
                          request_timeout_s=args.request_timeout,
                          progress=not args.disable_progress)
    replayer = Replayer(trace.arrivals.tolist(), prompts, seeds, config)
    try:
        records = asyncio.run(replayer.run())
    except KeyboardInterrupt:
        sys.stderr.write("loadgen replay: interrupted, keeping the partial results\n")
        records = replayer.finish()
    summary = summarize([r.to_json() for r in records], slo)
    summary["trace"] = trace_info
    summary["config"] = {k: str(v) if isinstance(v, Path) else v
                         for k, v in vars(args).items() if k != "func"}
    if args.result_dir is not None:
        write_results(args.result_dir, records, summary)
    sys.stdout.write(render(summary))
    return 0 if summary["accepted"] else 1
