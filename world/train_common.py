"""Shared training utilities: seeded data stream, LR schedule, EMA, resumable checkpoints.

Guarantees: the data of step ``s`` depends only on ``(seed, s)`` (so a resumed run sees the
same batches as an uninterrupted one); checkpoints are written atomically (temp file +
rename) and :func:`load_checkpoint` returns the newest complete one.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from world import render, scenes

log = logging.getLogger("world.train")
CKPT_NAME = "checkpoint.pt"


def step_batch(seed: int, step: int, n: int) -> tuple[np.ndarray, list[str], list[scenes.Meaning]]:
    """The training batch of ``step``: (images n×3×32×32 in [-1,1], captions, meanings)."""
    rng = np.random.default_rng([seed, step])
    return render.batch(rng, n)


def lr_at(step: int, base: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``final_frac·base`` at
    ``total`` (constant after)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of a module's float parameters and buffers with warm-up
    decay ``min(decay, (1+s)/(10+s))``."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            k: v.detach().clone()
            for k, v in module.state_dict().items()
            if v.dtype.is_floating_point
        }
        self.steps = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Blend the module's current weights into the average."""
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (non-float entries untouched)."""
        module.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict[str, Any]:
        """Serializable state."""
        return {"decay": self.decay, "shadow": self.shadow, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.decay = state["decay"]
        self.shadow = state["shadow"]
        self.steps = state["steps"]


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``out_dir/checkpoint.pt``; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CKPT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    log.info("checkpoint step %s -> %s", state.get("step"), path)
    return path


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir`` or ``None``."""
    path = out_dir / CKPT_NAME
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


def setup_logging(out_dir: Path) -> None:
    """Log INFO to stderr and to ``out_dir/train.log``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        root.addHandler(logging.StreamHandler())
    root.setLevel(logging.INFO)
