"""``argus world …`` commands: train-clip, train-unet, export, eval, sheet, approx-report.

Every leaf parser sets ``func(args) -> int``. Heavy imports (torch, diffusers) happen inside
the handlers so that ``argus --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "world" / "pipeline"
DEFAULT_CKPT = Path("models/world/ckpt")


def _threads(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(getattr(args, "threads", 2)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


def _emit(obj: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=1) + "\n")
    else:
        for k, v in obj.items():
            sys.stdout.write(f"{k}: {v}\n")


def _train_clip(args: argparse.Namespace) -> int:
    _threads(args)
    from world.clip import tiny_clip_config
    from world.train_clip import ClipTrainConfig, retrieval_top1, train_clip

    cfg = ClipTrainConfig(
        out_dir=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        max_steps=args.steps,
        time_budget_s=args.time_budget,
        ckpt_every_s=args.ckpt_every,
    )
    if args.tiny:
        cfg.model_cfg = tiny_clip_config()
    path = train_clip(cfg)
    from world.clip import load_clip

    _emit({"model": str(path), "heldout_t2i_top1": retrieval_top1(load_clip(path))}, args.json)
    return 0


def _train_unet(args: argparse.Namespace) -> int:
    _threads(args)
    from world.unet import UNetTrainConfig, train_unet

    cfg = UNetTrainConfig(
        out_dir=args.out,
        clip_path=args.clip,
        seed=args.seed,
        batch_size=args.batch_size,
        max_steps=args.steps,
        time_budget_s=args.time_budget,
        ckpt_every_s=args.ckpt_every,
        lr=args.lr,
        tiny=args.tiny,
    )
    path = train_unet(cfg)
    _emit({"pipeline": str(path)}, args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    _threads(args)
    from world.unet import export_pipeline

    path = export_pipeline(Path(args.ckpt), Path(args.clip), Path(args.out), fp16=not args.fp32)
    _emit({"pipeline": str(path)}, args.json)
    return 0


def _eval(args: argparse.Namespace) -> int:
    _threads(args)
    from world.evaluate import evaluate

    res = evaluate(
        args.model,
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
        seeds_per_prompt=args.seeds,
        sheet=args.sheet,
    )
    _emit(res, args.json)
    return 0


def _sheet(args: argparse.Namespace) -> int:
    _threads(args)
    from world.evaluate import write_sheet

    path = write_sheet(
        args.model,
        args.prompts or None,
        Path(args.out),
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
    )
    _emit({"sheet": str(path)}, args.json)
    return 0


def _approx(args: argparse.Namespace) -> int:
    _threads(args)
    from world.approx import approx_report, format_table

    res = approx_report(
        args.model,
        n=args.n,
        steps=args.steps,
        seeds=args.seeds,
        seed=args.seed,
        guidance=args.guidance,
        bank=args.bank,
    )
    if args.json:
        _emit(res, True)
    else:
        sys.stdout.write(format_table(res))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    _threads(args)
    from world.evaluate import guidance_sweep
    from world.pipeline import load_world_pipeline

    res = guidance_sweep(
        load_world_pipeline(args.model),
        args.n,
        [float(g) for g in args.guidances.split(",")],
        [int(s) for s in args.steps_list.split(",")],
        seed=args.seed,
        seeds_per_prompt=args.seeds,
    )
    _emit(res, args.json)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``world`` command group to the ``argus`` parser."""
    world = subparsers.add_parser("world", help="the embedded shapes world (train/eval)")
    sub = world.add_subparsers(dest="world_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train-clip", help="train the tiny CLIP (resumable)")
    common(p)
    p.add_argument("--out", default=str(DEFAULT_CKPT / "clip_run"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds")
    p.add_argument("--ckpt-every", type=float, default=120.0, help="seconds")
    p.add_argument("--tiny", action="store_true", help="tiny model (tests)")
    p.set_defaults(func=_train_clip)

    p = sub.add_parser("train-unet", help="train the text-conditioned UNet (resumable)")
    common(p)
    p.add_argument("--out", default=str(DEFAULT_CKPT / "unet_run"))
    p.add_argument("--clip", default=str(DEFAULT_CKPT / "clip_run" / "clip"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--time-budget", type=float, default=4200.0, help="seconds")
    p.add_argument("--ckpt-every", type=float, default=300.0, help="seconds")
    p.add_argument("--tiny", action="store_true", help="tiny UNet (tests)")
    p.set_defaults(func=_train_unet)

    p = sub.add_parser("export", help="export a UNet checkpoint (EMA) as a pipeline dir")
    common(p)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT / "unet_run"))
    p.add_argument("--clip", default=str(DEFAULT_CKPT / "clip_run" / "clip"))
    p.add_argument("--out", default=str(DEFAULT_MODEL))
    p.add_argument("--fp32", action="store_true")
    p.set_defaults(func=_export)

    def gen(p: argparse.ArgumentParser, n: int) -> None:
        common(p)
        p.add_argument("--model", default=str(DEFAULT_MODEL))
        p.add_argument("--n", type=int, default=n, help="number of held-out prompts")
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--guidance", type=float, default=None)

    p = sub.add_parser("eval", help="checker + CLIP score on held-out prompts")
    gen(p, 120)
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--sheet", default=None, help="also write a contact sheet PNG here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sweep", help="checker/CLIP over guidance scales x step counts")
    common(p)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--n", type=int, default=48, help="number of held-out prompts")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--guidances", default="1,1.5,2")
    p.add_argument("--steps-list", default="20,10,5")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("sheet", help="contact sheet PNG of prompts and images")
    gen(p, 12)
    p.add_argument("--out", default="world_sheet.png")
    p.add_argument("prompts", nargs="*", help="prompts (default: held-out prompts)")
    p.set_defaults(func=_sheet)

    p = sub.add_parser("approx-report", help="quality of fewer steps / NN latent caching")
    gen(p, 60)
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    p.add_argument("--bank", type=int, default=120, help="extra training prompts cached")
    p.set_defaults(func=_approx)
