"""``argus profile latency``: seconds per batch of every tier at each batch size, on the
present device, written into the registry file.

What is timed is the worker's own generation path for one batch
(``services.worker.generation.run_pipeline`` plus PNG encoding): text encoding, the
N - K denoising steps (cache tiers resume from a real captured latent), decoding and
encoding. Not timed: the cache lookup and latent fetch (one local top-1 search and one
Redis GET, about a millisecond; see ``docs/tiers.md``) and Redis traffic of the job.

Guarantees: ``warmup`` untimed rounds then the median of ``repeats`` timed runs per
(tier, batch size), the rounds interleaving all tiers (robust to a shared machine's slow
periods); on CUDA every timed run is bracketed by ``torch.cuda.synchronize``.
``write_latency`` updates only the measured batch sizes of ``tiers[i].latency[device_key]``
(and ``load_time_s``) in the YAML and keeps every other field, the tier order and the
file's leading comment block.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from common.tiers import Registry, Strategy, Tier, load_registry
from services.worker.backends.diffusers_backend import to_png
from services.worker.generation import initial_latents, run_pipeline

PROMPTS = ("a red circle on the left", "two blue squares", "a large green triangle",
           "a yellow square above a purple circle")


def device_key(device: str) -> str:
    """Profile key of a device: ``cpu``, or the CUDA device's name as a slug
    (e.g. ``nvidia-h100-80gb-hbm3``)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def _batch_call(pipe: Any, tier: Tier, batch: int, device: str, start: Any | None,
                size: int | None) -> Callable[[], float]:
    """A closure running one timed batch of ``batch`` images at ``tier`` (seconds).

    ``start``: the latent after ``tier.skip`` steps (cache tiers), one image.
    """
    import torch

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    kwargs: dict[str, Any] = {"steps": tier.steps, "guidance": tier.guidance,
                              "width": size, "height": size}
    if tier.strategy is Strategy.CACHE:
        assert start is not None
        kwargs.update(start_step=tier.skip, latents=start.repeat(batch, 1, 1, 1).to(device))
    else:
        kwargs["latents"] = initial_latents(pipe, gens, size, size).to(device)

    def run() -> float:
        _sync(device)
        t = time.perf_counter()
        images, _ = run_pipeline(pipe, prompts, **kwargs)
        for im in images:
            to_png(im)
        _sync(device)
        return time.perf_counter() - t

    return run


def _start_latent(pipe: Any, tier: Tier, device: str, size: int | None) -> Any:
    import torch

    noise = initial_latents(pipe, [torch.Generator().manual_seed(0)], size, size)
    _, cap = run_pipeline(pipe, PROMPTS[:1], steps=tier.steps, guidance=tier.guidance,
                          latents=noise.to(device), capture=[tier.skip],
                          output_type="latent", width=size, height=size)
    return cap[tier.skip]


def measure(registry: Registry, pipes: Callable[[Tier], Any], device: str,
            batch_sizes: Sequence[int] | None = None, repeats: int = 5, warmup: int = 2,
            size: int | None = None, tiers: Sequence[int] | None = None,
            log: Callable[[str], None] | None = None) -> dict[int, dict[int, float]]:
    """``{tier id: {batch size: median seconds}}`` for the selected tiers.

    Repeats are interleaved: each round times every (tier, batch size) once, so a slow
    period of a shared machine hits all tiers alike instead of biasing one.
    ``batch_sizes``: None measures each tier's own ``batch_sizes``.
    """
    calls: dict[tuple[int, int], Callable[[], float]] = {}
    starts: dict[tuple[str, int, int], Any] = {}
    for tier in registry.tiers:
        if tiers is not None and tier.id not in tiers:
            continue
        pipe = pipes(tier)
        start = None
        if tier.strategy is Strategy.CACHE:
            key = (tier.model, tier.steps, tier.skip)
            if key not in starts:
                starts[key] = _start_latent(pipe, tier, device, size)
            start = starts[key]
        for b in batch_sizes or tier.batch_sizes:
            calls[(tier.id, b)] = _batch_call(pipe, tier, b, device, start, size)
    times: dict[tuple[int, int], list[float]] = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for k, call in calls.items():
            t = call()
            if r >= warmup:
                times[k].append(t)
    out: dict[int, dict[int, float]] = {}
    for (tid, b), ts in times.items():
        out.setdefault(tid, {})[b] = float(statistics.median(ts))
        if log:
            log(f"tier {tid} batch {b}: {out[tid][b]:.4f} s (min {min(ts):.4f}, "
                f"max {max(ts):.4f}, n={len(ts)})")
    return out


def load_times(registry: Registry, load: Callable[[str], Any], model_of: Callable[[Tier], str],
               repeats: int = 3) -> dict[int, float]:
    """Median seconds to load each tier's model from disk onto the device (the switch
    cost), ``{tier id: seconds}``; one measurement per distinct model."""
    per_model: dict[str, float] = {}
    out: dict[int, float] = {}
    for tier in registry.tiers:
        model = model_of(tier)
        if model not in per_model:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                load(model)
                times.append(time.perf_counter() - t)
            per_model[model] = float(statistics.median(times))
        out[tier.id] = per_model[model]
    return out


def write_latency(path: Path, key: str, profile: dict[int, dict[int, float]],
                  loads: dict[int, float] | None = None) -> None:
    """Store ``profile`` as ``latency[key]`` of each tier in the registry file (and
    ``loads`` as ``load_time_s``).

    Raises:
        common.tiers.RegistryError: The result does not validate (the file is then
            left as it was).
    """
    text = path.read_text()
    head = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            head.append(line)
        else:
            break
    raw: Any = yaml.safe_load(text)
    for t in raw["tiers"]:
        if t["id"] in profile:
            lat = t.setdefault("latency", {}) or {}
            merged = {int(b): float(v) for b, v in (lat.get(key) or {}).items()}
            merged.update({int(b): round(s, 5) for b, s in profile[t["id"]].items()})
            lat[key] = dict(sorted(merged.items()))
            t["latency"] = lat
        if loads and t["id"] in loads:
            t["load_time_s"] = round(loads[t["id"]], 3)
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=100)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(head) + ("\n" if head else "") + body)
    try:
        load_registry(tmp)  # validate before replacing
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
