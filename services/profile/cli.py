"""``argus profile latency|quality|report``: measure the tiers of a registry.

- ``latency``: seconds per batch for every tier and batch size on this device; printed
  as JSON, or written into the registry with ``--write`` (``latency[<device key>]``).
- ``quality``: every tier on a prompt set with the same seeds, scored per image, one CSV
  row per (prompt, tier), resumable (``services.profile.quality``).
- ``report``: the per-tier summary table of a quality CSV and the registry's latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.settings import DEFAULT_TIERS_FILE, REPO_ROOT, WorkerSettings
from common.tiers import RegistryError, Tier, load_registry

log = logging.getLogger("services.profile")


def _tiers_file(args: argparse.Namespace) -> Path:
    if args.tiers:
        return Path(args.tiers)
    return Path(WorkerSettings().tiers_file or DEFAULT_TIERS_FILE)


def _backend(args: argparse.Namespace) -> Any:
    import torch

    from services.worker.backends.diffusers_backend import DiffusersBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    return DiffusersBackend(WorkerSettings(device=args.device, dtype=args.dtype,
                                           cache_enabled=False))


def cmd_latency(args: argparse.Namespace) -> int:
    """Measure and print (or ``--write``) the latency profile."""
    from services.profile.latency import device_key, load_times, measure, write_latency

    path = _tiers_file(args)
    registry = load_registry(path)
    backend = _backend(args)
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    tiers = [int(t) for t in args.only.split(",")] if args.only else None
    profile = measure(registry, backend.pipeline, args.device, sizes, args.repeats,
                      args.warmup, args.size, tiers, log=log.info)
    key = args.device_key or device_key(args.device)
    loads = (load_times(registry, backend.load_model, backend.model_for, args.load_repeats)
             if args.load_repeats else None)
    print(json.dumps({"device": key, "latency": profile, "load_time_s": loads},  # noqa: T201
                     indent=1))
    if args.write:
        write_latency(path, key, profile, loads)
        log.info("wrote latency[%s] of %d tiers into %s", key, len(profile), path)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    """Run (or resume) the quality profile."""
    from services.profile.quality import QualityConfig, QualityProfiler, run_quality
    from services.profile.scoring import (
        OpenClipScorer,
        Scorer,
        WorldScorer,
        default_bank,
        default_prompts,
        prompts_from_file,
    )
    from services.worker.embed import embedder_for_pipeline
    from services.worker.generation import is_world

    registry = load_registry(_tiers_file(args))
    backend = _backend(args)
    exact = backend.pipeline(registry.tiers[0])
    src = Path(args.prompts)
    prompts = prompts_from_file(src) if src.is_file() else default_prompts(int(args.prompts))
    bank = (prompts_from_file(Path(args.bank)) if Path(args.bank).is_file()
            else default_bank(int(args.bank), {p for p, _ in prompts}))
    scorer: Scorer
    if is_world(exact) and not args.clip_model:
        scorer = WorldScorer(exact.text_encoder)
    else:
        scorer = OpenClipScorer(args.clip_model or "ViT-L-14", args.clip_pretrained,
                                args.device)
    cfg = QualityConfig(seeds=args.seeds, seed_offset=args.seed_offset,
                        batch_size=args.batch_size, chunk=args.chunk,
                        floor=args.floor, width=args.size, height=args.size)

    def pipes(tier: Tier) -> Any:
        return backend.pipeline(tier)

    profiler = QualityProfiler(registry, pipes, scorer, embedder_for_pipeline(exact).embed,
                               cfg)
    out = Path(args.out)
    floor_out = Path(args.floor_out) if args.floor_out else out.with_name(
        out.stem + "_noise_floor.csv")
    work = Path(args.work_dir) if args.work_dir else Path.home() / ".cache" / "argus"
    i, n = (int(x) for x in args.shard.split("/"))
    res = run_quality(profiler, prompts, bank, out, floor_out, work, resume=args.resume,
                      progress=not args.no_progress, shard=(i, n),
                      meta=Path(args.meta) if args.meta else None)
    log.info("quality profile: %s -> %s", res, out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the per-tier summary (markdown, or JSON with ``--json``)."""
    from services.profile.report import markdown, summarize

    registry = load_registry(_tiers_file(args))
    floor = Path(args.floor) if args.floor else Path(args.quality).with_name(
        Path(args.quality).stem + "_noise_floor.csv")
    summary = summarize(registry, Path(args.quality), floor, args.device_key)
    print(json.dumps(summary, indent=1) if args.json else markdown(summary))  # noqa: T201
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge shard CSVs with one reference score (``services.profile.report.merge``)."""
    from services.profile.report import merge

    c = merge([Path(p) for p in args.parts], Path(args.out),
              [Path(p) for p in args.floor_parts or []],
              Path(args.floor_out) if args.floor_out else None)
    log.info("merged %d parts into %s (reference CLIP %.3f)", len(args.parts), args.out, c)
    return 0


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        try:
            return int(func(args))
        except RegistryError as exc:
            print(str(exc), file=sys.stderr)  # noqa: T201
            return 2
    return wrapped


def register(sub: Any) -> None:
    """Add ``argus profile ...`` to the CLI."""
    p = sub.add_parser("profile", help="measure tiers: latency, quality, report")
    ps = p.add_subparsers(dest="profile_cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--tiers", default=None, help="registry (default: T2I_TIERS_FILE)")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        q.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
        q.add_argument("--size", type=int, default=None, help="image size (default: model's)")
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")

    lat = ps.add_parser("latency", help="seconds per batch of every tier and batch size")
    common(lat)
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--batch-sizes", default=None, help="e.g. 1,4,16 (default: per tier)")
    lat.add_argument("--only", default=None, help="tier ids, e.g. 0,3")
    lat.add_argument("--device-key", default=None, help="profile key (default: derived)")
    lat.add_argument("--write", action="store_true", help="write into the registry file")
    lat.add_argument("--load-repeats", type=int, default=3,
                     help="time each model's load this many times (0: skip)")
    lat.set_defaults(func=_run(cmd_latency))

    q = ps.add_parser("quality", help="per-prompt quality of every tier (CSV)")
    common(q)
    q.add_argument("--prompts", default="2000", help="N (default world set) or a FILE")
    q.add_argument("--bank", default="600", help="cache bank: N other prompts or a FILE")
    q.add_argument("--seeds", type=int, default=4)
    q.add_argument("--seed-offset", type=int, default=0, help="use seeds OFF..OFF+S-1")
    q.add_argument("--floor", type=int, default=300, help="prompts with a reseed run")
    q.add_argument("--out", default=str(REPO_ROOT / "profiles" / "world_quality.csv"))
    q.add_argument("--floor-out", default=None)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--chunk", type=int, default=128, help="prompts per written chunk")
    q.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--work-dir", default=None, help="bank cache (default ~/.cache/argus)")
    q.add_argument("--clip-model", default=None, help="open_clip scorer for real models")
    q.add_argument("--clip-pretrained", default=None)
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--shard", default="0/1", help="I/N: every N-th prompt from the I-th")
    q.add_argument("--meta", default=None, help="reference-score file shared by shards "
                   "(default <out>.meta.json)")
    q.set_defaults(func=_run(cmd_quality))

    m = ps.add_parser("merge", help="merge quality shards with one reference score")
    m.add_argument("parts", nargs="+", help="shard CSVs")
    m.add_argument("--out", required=True)
    m.add_argument("--floor-parts", nargs="*", default=[])
    m.add_argument("--floor-out", default=None)
    m.set_defaults(func=_run(cmd_merge))

    r = ps.add_parser("report", help="per-tier summary of a quality CSV + latency")
    r.add_argument("--tiers", default=None)
    r.add_argument("--quality", default=str(REPO_ROOT / "profiles" / "world_quality.csv"))
    r.add_argument("--floor", default=None)
    r.add_argument("--device-key", default="cpu")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_run(cmd_report))
