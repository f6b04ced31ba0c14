"""Contrastive training of the tiny CLIP on (scene, caption) pairs.

Soft targets: in-batch pairs with the same meaning (same canonical caption) are positives,
not negatives. Resumable: the checkpoint holds model, optimizer, step and elapsed time; the
data of each step is a function of ``(seed, step)`` only. Output: ``out/clip`` (a
``WorldCLIP.save_pretrained`` directory, plus ``tokenizer.json``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from world import render, scenes
from world.clip import WorldCLIP
from world.train_common import (
    load_checkpoint,
    lr_at,
    save_checkpoint,
    setup_logging,
    step_batch,
)

log = logging.getLogger("world.train_clip")


@dataclass
class ClipTrainConfig:
    """Hyper-parameters; ``model_cfg`` None = the registered ``argus-tinyclip`` config."""

    out_dir: str = "models/world/ckpt/clip"
    seed: int = 0
    batch_size: int = 256
    max_steps: int = 400
    time_budget_s: float = 480.0
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1
    ckpt_every_s: float = 120.0
    log_every: int = 20
    model_cfg: dict[str, Any] | None = None


def soft_clip_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, keys: list[str]
) -> torch.Tensor:
    """Symmetric contrastive loss with targets spread uniformly over equal-meaning pairs."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    k = np.array(keys)
    same = torch.from_numpy(k[:, None] == k[None, :]).float()
    tgt = same / same.sum(1, keepdim=True)
    li = -(tgt * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(tgt * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (li + lt) / 2


def train_clip(cfg: ClipTrainConfig) -> Path:
    """Train (or resume) and export; returns the exported model directory."""
    out = Path(cfg.out_dir)
    setup_logging(out)
    torch.manual_seed(cfg.seed)
    model = WorldCLIP(model_cfg=cfg.model_cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    step, elapsed = 0, 0.0
    if (ck := load_checkpoint(out)) is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        log.info("resumed CLIP at step %d (%.0f s)", step, elapsed)
    model.train()
    t0, last_ck = time.time() - elapsed, time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="clip", dynamic_ncols=True)
    losses: list[float] = []

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": time.time() - t0,
            "config": asdict(cfg),
        }

    while step < cfg.max_steps and time.time() - t0 < cfg.time_budget_s:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps, final_frac=0.0)
        x, caps, ms = step_batch(cfg.seed, step, cfg.batch_size)
        keys = [scenes.canonical_caption(m) for m in ms]
        tokens = model.tokenizer(caps)
        _, txt = model.text_forward(tokens)
        img = model.encode_image(torch.from_numpy(x))
        loss = soft_clip_loss(img, txt, model.clip.logit_scale.exp(), keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, np.log(100))
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0:
            log.info(
                "clip step %d loss %.4f lr %.2e elapsed %.0fs",
                step,
                float(np.mean(losses)),
                opt.param_groups[0]["lr"],
                time.time() - t0,
            )
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
            losses = []
        if time.time() - last_ck > cfg.ckpt_every_s:
            save_checkpoint(out, state())
            last_ck = time.time()
    bar.close()
    save_checkpoint(out, state())
    model.eval()
    export = out / "clip"
    model.save_pretrained(str(export))
    model.tokenizer.save(export / "tokenizer.json")
    log.info("CLIP done: %d steps in %.0f s -> %s", step, time.time() - t0, export)
    return export


@torch.no_grad()
def retrieval_top1(model: WorldCLIP, n: int = 256, seed: int = 123, heldout: bool = True) -> float:
    """Text→image top-1 accuracy (an image of an equal-meaning caption counts)."""
    model.eval()
    x, caps, ms = render.batch(np.random.default_rng(seed), n, heldout=heldout)
    _, txt = model.text_forward(model.tokenizer(caps))
    img = model.encode_image(torch.from_numpy(x))
    sim = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
    best = sim.argmax(1).numpy()
    keys = [scenes.canonical_caption(m) for m in ms]
    return float(np.mean([keys[i] == keys[j] for i, j in enumerate(best)]))
