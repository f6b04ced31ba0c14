"""The emulated backend: holds the slot for a tier's profiled latency.

It lets a cluster of "GPU" workers run on a machine without GPUs: a batch of size b at
tier k takes ``tier.batch_latency(device, b) * emulated_latency_scale`` seconds, slept in
step-sized slices so progress events and cancellation behave as with a real model.
A change of model after the first (a worker starts with its first model loaded) holds
the worker for the model's ``load_time_s * emulated_latency_scale``, as a real load does.
"""

from __future__ import annotations

import time
from typing import Any

from common.messages import ClassifiedJob
from common.settings import WorkerSettings
from common.tiers import Registry, Tier
from services.worker.backends import BackendError, StepCallback, solid_png


def check_profiles(registry: Registry, device: str, scale: float) -> None:
    """Refuse a registry with an unprofiled tier when a delay is asked for.

    Raises:
        BackendError: ``scale > 0`` and a tier has no latency profile for ``device``.
    """
    if scale <= 0:
        return
    missing = [t for t in registry.tiers if t.batch_latency(device, 1) is None]
    if missing:
        names = ", ".join(f"{t.id} ({t.name})" for t in missing)
        profiled = sorted({d for t in registry.tiers for d in t.latency})
        raise BackendError(
            f"emulated backend: tier(s) {names} have no latency profile for device "
            f"{device!r} (profiled devices: {profiled or 'none'}); profile them, set "
            "T2I_DEVICE to a profiled device, or T2I_EMULATED_LATENCY_SCALE=0")


class EmulatedBackend:
    """Sleeps for the profiled latency and returns one solid-colour PNG per image.

    The colour is a hash of (prompt, seed, image index), so equal jobs give equal bytes.
    """

    name = "emulated"

    def __init__(self, settings: WorkerSettings, registry: Registry) -> None:
        self.device = settings.device or registry.device
        self.scale = settings.emulated_latency_scale
        self.model_override = settings.model
        self.model_switches = 0
        self.last_details: list[dict[str, Any]] = []
        self._loaded: str | None = None
        check_profiles(registry, self.device, self.scale)

    def model_for(self, tier: Tier) -> str:
        """The tier's model name (nothing is loaded)."""
        return self.model_override or tier.model

    @property
    def loaded_model(self) -> str | None:
        """The model of the last tier prepared."""
        return self._loaded

    def prepare(self, tier: Tier) -> None:
        """Record the tier's model; a change of model counts as a switch and, unless it
        is the first model, sleeps the tier's ``load_time_s`` (times the latency scale)."""
        model = self.model_for(tier)
        if model != self._loaded:
            if self._loaded is not None and self.scale > 0 and tier.load_time_s:
                time.sleep(tier.load_time_s * self.scale)
            self._loaded = model
            self.model_switches += 1

    def batch_seconds(self, tier: Tier, batch: int) -> float:
        """Seconds a batch of ``batch`` holds the slot at ``tier``."""
        if self.scale <= 0:
            return 0.0
        latency = tier.batch_latency(self.device, batch)
        if latency is None:
            raise BackendError(
                f"tier {tier.id} ({tier.name}) has no latency profile for {self.device!r}")
        return latency * self.scale

    def generate(self, jobs: list[ClassifiedJob], tier: Tier,
                 on_step: StepCallback) -> list[list[bytes]]:
        """Sleep ``batch_seconds`` in ``tier.unet_steps`` slices, then make the PNGs.

        Returns an empty list when ``on_step`` interrupts the batch.
        """
        self.prepare(tier)
        total = tier.unet_steps
        start = time.monotonic()
        per_step = self.batch_seconds(tier, len(jobs)) / total
        for step in range(1, total + 1):
            # Sleep to an absolute deadline so slices do not accumulate drift.
            delay = start + step * per_step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not on_step(step, total):
                return []
        return [[solid_png(job.width, job.height, f"{job.prompt}\0{job.seed}\0{i}")
                 for i in range(job.n)] for job in jobs]
