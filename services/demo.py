"""``argus demo``: the whole stack, locally, on the bundled small-world model, replaying a
real arrival trace; prints the report and writes a contact sheet of generated images.

Steps: start redis-server and every service (``argus up``), replay the first part of the
Azure code trace (compressed in time, thinned to what two CPU workers can serve) with
small-world held-out captions as prompts (``loadgen replay``), then fetch a sample of the
images, score them with the world's automatic checker and write
``<out>/contact_sheet.png`` beside the replay's ``summary.json`` and ``requests.jsonl``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common.settings import DEFAULT_TIERS_FILE, REPO_ROOT
from services.up import StackConfig, free_port, running_stack

WORLD_MODEL = REPO_ROOT / "models" / "world" / "pipeline"


def sample_images(url: str, records: list[dict[str, Any]], n: int
                  ) -> tuple[list[str], list[np.ndarray]]:
    """Prompts and decoded images of the first ``n`` succeeded jobs."""
    from PIL import Image

    prompts: list[str] = []
    images: list[np.ndarray] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for rec in records:
            if len(images) >= n:
                break
            if rec.get("status") != "succeeded" or not rec.get("job_id"):
                continue
            resp = client.get(f"/v1/jobs/{rec['job_id']}/image")
            if resp.status_code == 200:
                prompts.append(rec["prompt"])
                images.append(np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")))
    return prompts, images


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when the replay completed and the sheet was written."""
    from loadgen.__main__ import main as loadgen_main
    from loadgen.replay_cli import render

    if not (WORLD_MODEL / "model_index.json").exists():
        print(f"the small-world model is missing at {WORLD_MODEL}; "  # noqa: T201
              "train it with 'argus world train-clip' and 'argus world train-unet'",
              file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = StackConfig(workers=args.workers, backend="diffusers", port=args.port or free_port(),
                         tiers_file=args.tiers, log_dir=out / "logs")
    print(f"starting the stack ({args.workers} workers, model {WORLD_MODEL}; logs in "  # noqa: T201
          f"{out / 'logs'})...", flush=True)
    with running_stack(config, timeout=300) as stack:
        print(f"stack ready at {stack.url}; replaying {args.trace}", flush=True)  # noqa: T201
        rc = loadgen_main([
            "replay", "--url", stack.url, "--trace", args.trace, "--prompts", "world",
            "--time-scale", str(args.time_scale), "--duration", str(args.duration),
            "--rate-scale", str(args.rate_scale), "--seed", str(args.seed),
            "--result-dir", str(out / "replay"), "--drain-timeout", "180"])
        if rc != 0:
            return rc
        summary = json.loads((out / "replay" / "summary.json").read_text())
        records = [json.loads(line) for line in
                   (out / "replay" / "requests.jsonl").read_text().splitlines()]
        prompts, images = sample_images(stack.url, records, args.sheet)
    from world.checker import check
    from world.evaluate import contact_sheet
    from world.scenes import parse_caption

    scores = []
    for prompt, image in zip(prompts, images, strict=True):
        meaning = parse_caption(prompt)
        scores.append(check(image, meaning).score if meaning else float("nan"))
    sheet = out / "contact_sheet.png"
    if images:
        contact_sheet(prompts, np.stack(images), scores).save(sheet)
    print("\n== Argus demo report ==")  # noqa: T201
    print(render(summary))  # noqa: T201
    if scores:
        print(f"checker score of {len(scores)} sampled images: "  # noqa: T201
              f"mean {float(np.nanmean(scores)):.3f}")
    print(f"contact sheet: {sheet}\nper-request results: {out / 'replay'}")  # noqa: T201
    return 0


def register(sub: Any) -> None:
    """Add ``argus demo`` to the CLI."""
    p = sub.add_parser("demo", help="run the stack on the small model and replay a real trace",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    p.add_argument("--tiers", type=Path, default=DEFAULT_TIERS_FILE)
    p.add_argument("--trace", default="traces/AzureLLMInferenceTrace_code.csv",
                   help="arrival trace (relative paths are looked up in the shared data)")
    p.add_argument("--time-scale", type=float, default=0.2,
                   help="compress the trace's time (0.2: 5 trace minutes per replay minute)")
    p.add_argument("--duration", type=float, default=60.0, help="replay seconds")
    p.add_argument("--rate-scale", type=float, default=0.1,
                   help="keep this share of arrivals (shape kept): what 2 CPU workers serve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", type=int, default=18, help="images on the contact sheet")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.set_defaults(func=cmd_demo)
