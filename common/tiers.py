"""The tier registry (``profiles/tiers.yaml``): what each approximation tier is and how
long it takes.

A tier is one concrete way to generate an image, ordered from exact (tier 0) to most
approximate. ``load_registry`` validates the whole file and raises :class:`RegistryError`
naming the file and the offending field, never a bare traceback.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.settings import REPO_ROOT


class Strategy(StrEnum):
    """How a tier approximates the exact generation."""

    EXACT = "exact"
    CACHE = "cache"
    STEPS = "steps"
    MODEL = "model"


class RegistryError(ValueError):
    """The tier registry file is missing, unreadable or invalid."""


class Tier(BaseModel):
    """One tier. ``latency[device][batch]`` is seconds per batch of that size."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=0)
    name: str
    strategy: Strategy
    model: str
    steps: int = Field(gt=0, description="N: the schedule's step count")
    skip: int = Field(default=0, ge=0, description="K: steps skipped from a cached latent")
    guidance: float = Field(default=1.0, ge=0)
    batch_sizes: list[int] = [1]
    latency: dict[str, dict[int, float]] = {}
    quality_standin: str | None = None
    quality: float | None = Field(default=None, ge=0, description="mean quality relative "
                                  "to the exact tier (exact = 1.0), from profiling")
    load_time_s: float | None = Field(default=None, ge=0, description="seconds to load "
                                      "the tier's model on a GPU (the switch cost)")
    notes: str = ""

    @model_validator(mode="after")
    def _check(self) -> Tier:
        if self.skip >= self.steps:
            raise ValueError(f"skip ({self.skip}) must be < steps ({self.steps})")
        if self.strategy is not Strategy.CACHE and self.skip:
            raise ValueError("only 'cache' tiers skip steps")
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError("batch_sizes must be positive")
        for dev, prof in self.latency.items():
            if any(v <= 0 for v in prof.values()):
                raise ValueError(f"latency[{dev}] values must be > 0 seconds")
        return self

    @property
    def unet_steps(self) -> int:
        """Denoising steps actually run (N - K)."""
        return self.steps - self.skip

    @property
    def max_batch(self) -> int:
        """Largest batch size this tier runs."""
        return max(self.batch_sizes)

    def serving_batch(self, device: str, budget_s: float | None) -> int:
        """The batch size this tier is served at: the largest of ``batch_sizes`` whose
        profiled latency on ``device`` is at most ``budget_s`` (the smallest size when none
        fits); the largest size when there is no budget or no profile for ``device``."""
        if budget_s is None or self.batch_latency(device, 1) is None:
            return self.max_batch
        fits = [b for b in self.batch_sizes
                if (self.batch_latency(device, b) or float("inf")) <= budget_s]
        return max(fits) if fits else min(self.batch_sizes)

    def batch_latency(self, device: str, batch: int) -> float | None:
        """Profiled seconds for a batch of ``batch`` on ``device`` (interpolated linearly
        between profiled sizes, extrapolated from the largest); None when unprofiled."""
        prof = self.latency.get(device)
        if not prof:
            return None
        sizes = sorted(prof)
        if batch in prof:
            return prof[batch]
        lower = [s for s in sizes if s < batch]
        upper = [s for s in sizes if s > batch]
        if lower and upper:
            a, b = lower[-1], upper[0]
            return prof[a] + (prof[b] - prof[a]) * (batch - a) / (b - a)
        edge = upper[0] if upper else lower[-1]
        return prof[edge] * batch / edge


class Registry(BaseModel):
    """A whole registry file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    device: str = Field(default="cpu", description="device type of the default profile")
    slo_ms: int | None = Field(default=None, gt=0)
    tiers: list[Tier]

    @model_validator(mode="after")
    def _check(self) -> Registry:
        ids = [t.id for t in self.tiers]
        if ids != list(range(len(ids))):
            raise ValueError(f"tier ids must be 0..{len(ids) - 1} in order, got {ids}")
        if not self.tiers or self.tiers[0].strategy is not Strategy.EXACT:
            raise ValueError("tier 0 must be the 'exact' tier")
        return self

    def tier(self, tier_id: int) -> Tier:
        """The tier with ``tier_id``; KeyError naming the valid ids otherwise."""
        if 0 <= tier_id < len(self.tiers):
            return self.tiers[tier_id]
        raise KeyError(f"unknown tier {tier_id}; valid: 0..{len(self.tiers) - 1}")

    def batch_budget_s(self, share: float) -> float | None:
        """Seconds a batch may take: ``share`` of the SLO (:meth:`default_slo_ms`); None
        (no cap) when ``share`` <= 0."""
        return share * self.default_slo_ms() / 1000 if share > 0 else None

    def default_slo_ms(self) -> int:
        """The SLO: explicit, else 3x the exact tier's batch-1 latency (else 10 s)."""
        if self.slo_ms:
            return self.slo_ms
        lat = self.tiers[0].batch_latency(self.device, 1)
        return int(3000 * lat) if lat else 10_000


def resolve_model(model: str, base: Path = REPO_ROOT) -> str:
    """A local path relative to the repo root if it exists there, else ``model`` as given
    (a hub id or an absolute path)."""
    p = Path(model)
    if not p.is_absolute() and (base / p).exists():
        return str(base / p)
    return model


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file."""
    p = Path(path)
    try:
        raw: Any = yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise RegistryError(f"tier registry {p} not found") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"tier registry {p} is not readable YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RegistryError(f"tier registry {p}: expected a mapping at the top level")
    try:
        return Registry.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise RegistryError(f"tier registry {p} is invalid:\n  " + "\n  ".join(lines)) from exc
