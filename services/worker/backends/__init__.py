"""Generation backends of the worker, behind one interface.

A backend turns a batch of classified jobs into PNG images for one tier. It is blocking
and runs in a thread (``asyncio.to_thread``); it reports every denoising step through
``on_step(step, total)`` and stops early when that returns False.

Backends:
- ``diffusers``: any diffusers text-to-image pipeline (and the project's own
  ``world.pipeline`` classes), on CPU or CUDA.
- ``emulated``: holds the slot for the tier's profiled latency and returns small solid
  PNGs, for cluster-scale runs without GPUs.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any, Protocol

from common.messages import ClassifiedJob
from common.settings import WorkerSettings
from common.tiers import Registry, Tier

StepCallback = Callable[[int, int], bool]
"""``on_step(step, total) -> keep_going``: called after each denoising step (1-based)."""

BACKENDS = ("diffusers", "emulated")


class BackendError(RuntimeError):
    """A backend cannot serve a tier or a job (bad configuration, unsupported request)."""


class Backend(Protocol):
    """What the worker needs from a backend.

    Guarantees of every implementation: ``generate`` returns one list per job, in the
    jobs' order, with ``job.n`` PNG images each (unless interrupted, when its result
    is discarded); the same job (prompt, seed, size, tier) gives the same bytes.
    """

    name: str
    model_switches: int
    last_details: list[dict[str, Any]]
    """Per-job extra record of the last ``generate`` (e.g. the cache outcome), merged
    into the job's stored ``detail``; may be empty."""

    def model_for(self, tier: Tier) -> str:
        """The model (path or id) this backend uses for ``tier``."""
        ...

    @property
    def loaded_model(self) -> str | None:
        """The model of the last tier prepared, if any."""
        ...

    def prepare(self, tier: Tier) -> None:
        """Make ``tier`` ready to run (load its model); blocking, idempotent.

        Raises:
            BackendError: The tier cannot be served by this backend.
        """
        ...

    def generate(self, jobs: list[ClassifiedJob], tier: Tier,
                 on_step: StepCallback) -> list[list[bytes]]:
        """Generate ``job.n`` PNGs per job; blocking.

        Args:
            jobs: One batch; all share width, height and n.
            tier: The tier to generate at.
            on_step: Progress callback; returning False interrupts the batch.

        Raises:
            BackendError: The request is invalid for this backend or tier.
        """
        ...


def solid_png(width: int, height: int, key: str) -> bytes:
    """A valid ``width`` x ``height`` PNG of one colour derived from ``key`` (stable)."""
    from PIL import Image

    rgb = tuple(hashlib.sha256(key.encode()).digest()[:3])
    buf = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_backend(settings: WorkerSettings, registry: Registry) -> Backend:
    """Build the backend named by ``settings.backend``.

    Raises:
        BackendError: Unknown backend name, or a configuration the backend rejects at
            startup (e.g. an emulated tier without a latency profile for the device).
    """
    if settings.backend == "emulated":
        from services.worker.backends.emulated import EmulatedBackend

        return EmulatedBackend(settings, registry)
    if settings.backend == "diffusers":
        from services.worker.backends.diffusers_backend import DiffusersBackend

        return DiffusersBackend(settings, registry)
    raise BackendError(f"unknown backend {settings.backend!r}; choose one of {BACKENDS}")
