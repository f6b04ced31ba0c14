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
- Strategies: ``exact``, ``steps`` (the same pipeline object, another N) and ``model``
  (another model directory/id, loaded once and counted) run as plain pipeline calls;
  ``cache`` tiers resume each job from its nearest cached prompt's latent after K steps
  and run the remaining N - K steps (``services.worker.generation``), misses run the
  full schedule (``services.worker.cache_plan``). Every full-schedule run whose (model,
  N) has cache tiers stores its latents at those tiers' K values in the shared cache.
- ``last_details[i]`` (set by each ``generate``) is job ``i``'s extra record: the
  cache outcome for cache tiers; ``model_load_s`` (how long the serving model took to
  load in this worker) and ``model_loaded_now`` (whether this batch paid that load).
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
from common.tiers import Registry, Strategy, Tier, resolve_model
from services.worker.backends import BackendError, StepCallback
from services.worker.cache_plan import CacheFront, Decision, cache_ks
from services.worker.embed import TextEmbedder, embedder_for_pipeline
from services.worker.generation import ResumeError, run_pipeline

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

    def __init__(self, settings: WorkerSettings, registry: Registry | None = None,
                 cache_client: Any = None) -> None:
        if settings.dtype not in _DTYPES:
            raise BackendError(f"unknown dtype {settings.dtype!r}; choose one of {_DTYPES}")
        self.device = settings.device
        self.dtype = settings.dtype
        self.model_override = settings.model
        self.model_switches = 0
        self.registry = registry
        self.cache = CacheFront(settings, registry, cache_client)
        self.last_details: list[dict[str, Any]] = []
        self.load_seconds: dict[str, float] = {}
        self._pipes: OrderedDict[str, Any] = OrderedDict()
        self._embedders: dict[str, TextEmbedder | None] = {}
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
            BackendError: The model cannot be loaded.
        """
        self._pipeline(tier)

    def pipeline(self, tier: Tier) -> Any:
        """The loaded pipeline of ``tier`` (loading it when needed; see :meth:`prepare`)."""
        return self._pipeline(tier)

    def _pipeline(self, tier: Tier) -> Any:
        model = self.model_for(tier)
        if model in self._pipes:
            self._pipes.move_to_end(model)
            self._loaded = model
            return self._pipes[model]
        while len(self._pipes) >= MAX_LOADED:
            evicted, _ = self._pipes.popitem(last=False)
            self._embedders.pop(evicted, None)
            log.info("unloading model %s", evicted)
        start = time.monotonic()
        pipe = self._load(model)
        seconds = time.monotonic() - start
        self._pipes[model] = pipe
        self._loaded = model
        self.model_switches += 1
        self.load_seconds[model] = seconds
        metrics.MODEL_SWITCHES.labels(model=model).inc()
        metrics.MODEL_LOAD.labels(model=model).observe(seconds)
        log.info("loaded model %s (%s) on %s/%s in %.2f s", model, type(pipe).__name__,
                 self.device, self.dtype, seconds)
        return pipe

    def load_model(self, model: str) -> Any:
        """Load ``model`` afresh (not kept, not counted): what a switch to it costs."""
        return self._load(model)

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
        self._ddim_for_cache(model, pipe)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def _ddim_for_cache(self, model: str, pipe: Any) -> None:
        """Serve every tier of a model that has cache tiers with DDIM (deterministic and
        stateless per step, so skip-K resumes exactly): a pipeline loaded with another
        scheduler (SDXL's default Euler) gets a DDIM scheduler from the same config."""
        import diffusers as _diffusers

        diffusers: Any = _diffusers  # untyped library: call through Any
        has_cache = self.registry is not None and any(
            t.strategy is Strategy.CACHE and self.model_for(t) == model
            for t in self.registry.tiers)
        sched = getattr(pipe, "scheduler", None)
        if has_cache and sched is not None and not isinstance(sched, diffusers.DDIMScheduler):
            log.info("model %s: %s replaced by DDIMScheduler (cache tiers resume exactly "
                     "only with DDIM)", model, type(sched).__name__)
            pipe.scheduler = diffusers.DDIMScheduler.from_config(sched.config)

    def embedder(self, tier: Tier) -> TextEmbedder | None:
        """The prompt embedder of the tier's pipeline (None when it has none)."""
        model = self.model_for(tier)
        if model not in self._embedders:
            try:
                self._embedders[model] = embedder_for_pipeline(self._pipeline(tier))
            except ValueError as exc:
                log.warning("no prompt embeddings for %s: %s", model, exc)
                self._embedders[model] = None
        return self._embedders[model]

    def generate(self, jobs: list[ClassifiedJob], tier: Tier,
                 on_step: StepCallback) -> list[list[bytes]]:
        """Run one batch at ``tier`` (cache tiers: hits resume, misses run fully).

        All jobs must share width, height and n (the worker groups them so). Sets
        ``last_details`` (one dict per job).

        Raises:
            BackendError: Mixed batch, unsupported size or strategy, model not loadable.
        """
        if not jobs:
            self.last_details = []
            return []
        width, height, n = jobs[0].width, jobs[0].height, jobs[0].n
        if any((j.width, j.height, j.n) != (width, height, n) for j in jobs):
            raise BackendError("a batch must share width, height and n")
        switches = self.model_switches
        pipe = self._pipeline(tier)
        load_s = round(self.load_seconds.get(self.model_for(tier), 0.0), 3)
        loaded_now = self.model_switches != switches
        details: list[dict[str, Any]] = [{"model_load_s": load_s, "model_loaded_now":
                                          loaded_now} for _ in jobs]
        if "width" in inspect.signature(pipe.__call__).parameters:
            check_size(pipe, width, height)
        # Full-schedule runs of a (model, N) with cache tiers store latents at their Ks.
        ks = (cache_ks(self.registry, tier) if tier.strategy in (Strategy.EXACT,
                                                                   Strategy.CACHE) else [])
        if tier.strategy is Strategy.CACHE and not ks:
            ks = [tier.skip]
        enabled = self.cache.settings.cache_enabled
        ks = ks if enabled else []
        embedder = (self.embedder(tier) if enabled and (tier.strategy is Strategy.CACHE or ks)
                    else None)
        embs = embedder.embed([j.prompt for j in jobs]) if embedder is not None else None
        plan = (self.cache.plan(jobs, tier, embs) if tier.strategy is Strategy.CACHE
                else [Decision() for _ in jobs])
        for d, p in zip(details, plan, strict=True):
            d.update(p.detail)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(plan):
            groups.setdefault(p.k, []).append(i)
        pngs: list[list[bytes] | None] = [None] * len(jobs)
        for k, idx in sorted(groups.items(), reverse=True):
            part = [jobs[i] for i in idx]
            images, captured = self._run(pipe, part, tier, k, [plan[i].latent for i in idx],
                                         ks if k == 0 else [], on_step, width, height, n)
            if images is None:  # interrupted
                self.last_details = details
                return []
            if captured:
                self.cache.store(part, tier, None if embs is None else embs[idx], captured,
                                 [r * n for r in range(len(part))])
            for r, i in enumerate(idx):
                pngs[i] = images[r * n:(r + 1) * n]
        self.last_details = details
        return [p or [] for p in pngs]

    def _run(self, pipe: Any, jobs: list[ClassifiedJob], tier: Tier, k: int,
             latents: list[Any], capture: list[int], on_step: StepCallback, width: int,
             height: int, n: int) -> tuple[list[bytes] | None, dict[int, Any]]:
        """One pipeline call: full schedule (k == 0) from seeded noise, or resumed."""
        import torch

        interrupted = False

        def step(i: int, total: int) -> bool:
            nonlocal interrupted
            if not on_step(i, total):
                interrupted = True
            return not interrupted

        kwargs: dict[str, Any] = {"steps": tier.steps, "guidance": tier.guidance,
                                  "width": width, "height": height, "images_per_prompt": n,
                                  "on_step": step, "capture": capture}
        if k:
            dtype = getattr(torch, self.dtype)
            # Cached latents are one image each (C x h x w): stack them into the batch.
            kwargs.update(start_step=k, latents=torch.stack(
                [lat.to(dtype=dtype) for lat in latents]).to(self.device))
        else:
            # CPU generators: the starting noise of a seed is the same on every device.
            kwargs["generators"] = [torch.Generator("cpu").manual_seed(j.seed + i)
                                    for j in jobs for i in range(n)]
        try:
            images, captured = run_pipeline(pipe, [j.prompt for j in jobs], **kwargs)
        except ResumeError as exc:
            raise BackendError(f"tier {tier.id} ({tier.name}): {exc}") from exc
        if interrupted:
            return None, {}
        if len(images) != len(jobs) * n:
            raise BackendError(f"pipeline returned {len(images)} images, expected "
                               f"{len(jobs) * n}")
        if images and tuple(images[0].size) != (width, height):
            raise BackendError(
                f"{type(pipe).__name__} generates {images[0].size[0]}x{images[0].size[1]} "
                f"images only; the job asked for {width}x{height}")
        return [to_png(im) for im in images], captured
