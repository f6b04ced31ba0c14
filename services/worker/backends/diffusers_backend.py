"""The diffusers backend: any diffusers text-to-image pipeline, CPU or CUDA.

Models load from a local directory or a hub id (``common.tiers.resolve_model``; run with
``HF_HUB_OFFLINE=1`` where there is no network). A directory whose ``model_index.json``
names a class diffusers does not know is loaded with the project's own
``world.pipeline`` module (imported only then).

Guarantees:
- Loaded pipelines are kept by model path (at most ``MAX_LOADED``, least recently used
  evicted): tiers of one model share one pipeline, so moving between them is free.
  Every real load counts as a model switch (``t2i_model_switches_total``,
  ``t2i_model_load_seconds``).
- Determinism: image ``i`` of a job starts from noise drawn by a CPU ``torch.Generator``
  seeded with ``job.seed + i``: the same job gets the same starting noise on any device
  and in any batch, hence the same image up to the numerics of the kernels.
- Strategies ``exact``, ``steps`` and ``model`` run; ``cache`` tiers are refused with a
  clear error until the approximate cache exists.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from common import metrics
from common.messages import ClassifiedJob
from common.settings import WorkerSettings
from common.tiers import Strategy, Tier, resolve_model
from services.worker.backends import BackendError, StepCallback

log = logging.getLogger(__name__)
# diffusers logs at INFO on every call that draws CPU noise for a GPU pipeline (on purpose).
logging.getLogger("diffusers.utils.torch_utils").setLevel(logging.WARNING)

MAX_LOADED = 2
WORLD_MODULE = "world.pipeline"
_DTYPES = ("float32", "float16", "bfloat16")


def pipeline_class_name(model_path: str) -> str | None:
    """``_class_name`` of a local pipeline directory, or None (hub id, no index)."""
    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name")
    return str(name) if name else None


def size_multiple(pipe: Any) -> int:
    """The multiple every width/height must be: lcm of the VAE factor and diffusers' 8."""
    factor = int(getattr(pipe, "vae_scale_factor", 1) or 1)
    return math.lcm(factor, 8) if getattr(pipe, "vae", None) is not None else factor


def check_size(pipe: Any, width: int, height: int) -> None:
    """Raise :class:`BackendError` when a size is not one the pipeline can produce."""
    multiple = size_multiple(pipe)
    if width % multiple or height % multiple:
        raise BackendError(
            f"size {width}x{height} is not a multiple of {multiple} (VAE factor of "
            f"{type(pipe).__name__}); use e.g. {width // multiple * multiple or multiple}x"
            f"{height // multiple * multiple or multiple}")


def to_png(image: Any) -> bytes:
    """PNG bytes of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class DiffusersBackend:
    """Runs tiers with diffusers pipelines, loading each model once."""

    name = "diffusers"

    def __init__(self, settings: WorkerSettings) -> None:
        if settings.dtype not in _DTYPES:
            raise BackendError(f"unknown dtype {settings.dtype!r}; choose one of {_DTYPES}")
        self.device = settings.device
        self.dtype = settings.dtype
        self.model_override = settings.model
        self.model_switches = 0
        self._pipes: OrderedDict[str, Any] = OrderedDict()
        self._loaded: str | None = None

    def model_for(self, tier: Tier) -> str:
        """``settings.model`` if set, else the tier's model, resolved against the repo."""
        return resolve_model(self.model_override or tier.model)

    @property
    def loaded_model(self) -> str | None:
        """The model of the last tier prepared."""
        return self._loaded

    def prepare(self, tier: Tier) -> None:
        """Load the tier's model unless already loaded.

        Raises:
            BackendError: ``cache`` tier, or the model cannot be loaded.
        """
        self._pipeline(tier)

    def _pipeline(self, tier: Tier) -> Any:
        if tier.strategy is Strategy.CACHE:
            raise BackendError(
                f"tier {tier.id} ({tier.name}): cache tiers arrive with the approximate "
                "cache (issue 4)")
        model = self.model_for(tier)
        if model in self._pipes:
            self._pipes.move_to_end(model)
            self._loaded = model
            return self._pipes[model]
        while len(self._pipes) >= MAX_LOADED:
            evicted, _ = self._pipes.popitem(last=False)
            log.info("unloading model %s", evicted)
        start = time.monotonic()
        pipe = self._load(model)
        seconds = time.monotonic() - start
        self._pipes[model] = pipe
        self._loaded = model
        self.model_switches += 1
        metrics.MODEL_SWITCHES.labels(model=model).inc()
        metrics.MODEL_LOAD.labels(model=model).observe(seconds)
        log.info("loaded model %s (%s) on %s/%s in %.2f s", model, type(pipe).__name__,
                 self.device, self.dtype, seconds)
        return pipe

    def _load(self, model: str) -> Any:
        import diffusers
        import torch

        dtype = getattr(torch, self.dtype)
        class_name = pipeline_class_name(model)
        if class_name is None and Path(model).is_absolute() and not Path(model).exists():
            raise BackendError(f"model {model!r} not found")
        try:
            if class_name is None or hasattr(diffusers, class_name):
                loader: Any = diffusers.DiffusionPipeline
                pipe = loader.from_pretrained(model, dtype=dtype)
            else:
                world = importlib.import_module(WORLD_MODULE)
                cls = getattr(world, class_name, None)
                if cls is None:
                    raise BackendError(
                        f"model {model!r}: pipeline class {class_name!r} is neither in "
                        f"diffusers nor in {WORLD_MODULE}")
                pipe = cls.from_pretrained(model, dtype=dtype)
        except BackendError:
            raise
        except (OSError, ValueError, ImportError) as exc:
            raise BackendError(f"cannot load model {model!r}: {exc}") from exc
        pipe = pipe.to(self.device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, jobs: list[ClassifiedJob], tier: Tier,
                 on_step: StepCallback) -> list[list[bytes]]:
        """Run one batch through the tier's pipeline.

        All jobs must share width, height and n (the worker groups them so).

        Raises:
            BackendError: Mixed batch, unsupported size or strategy, model not loadable.
        """
        import torch

        if not jobs:
            return []
        width, height, n = jobs[0].width, jobs[0].height, jobs[0].n
        if any((j.width, j.height, j.n) != (width, height, n) for j in jobs):
            raise BackendError("a batch must share width, height and n")
        pipe = self._pipeline(tier)
        params = inspect.signature(pipe.__call__).parameters
        total = tier.unet_steps
        kwargs: dict[str, Any] = {
            "num_inference_steps": tier.steps, "guidance_scale": tier.guidance,
            "output_type": "pil"}
        if "width" in params and "height" in params:
            check_size(pipe, width, height)
            kwargs.update(width=width, height=height)
        if "num_images_per_prompt" in params:
            prompts = [j.prompt for j in jobs]
            kwargs["num_images_per_prompt"] = n
        else:  # same result: each prompt repeated n times, image-major per job
            prompts = [j.prompt for j in jobs for _ in range(n)]
        # CPU generators: the starting noise of a seed is the same on every device type.
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(j.seed + i)
                               for j in jobs for i in range(n)]

        def callback(p: Any, i: int, _t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            if not on_step(i + 1, total):
                p._interrupt = True
            return kw

        kwargs["callback_on_step_end"] = callback
        with torch.inference_mode():
            images = pipe(prompts, **kwargs).images
        if len(images) != len(jobs) * n:
            raise BackendError(f"pipeline returned {len(images)} images, expected "
                               f"{len(jobs) * n}")
        if images and tuple(images[0].size) != (width, height):
            raise BackendError(
                f"{type(pipe).__name__} generates {images[0].size[0]}x{images[0].size[1]} "
                f"images only; the job asked for {width}x{height}")
        pngs = [to_png(im) for im in images]
        return [pngs[k * n:(k + 1) * n] for k in range(len(jobs))]
