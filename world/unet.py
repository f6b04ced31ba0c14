"""The world's text-conditioned pixel-space UNet: model, CoordConv input, training, export.

Recipe (trial §4, improved): diffusers ``UNet2DConditionModel`` on 32×32 RGB in [-1, 1] with
two extra CoordConv input channels (x, y in [-1, 1]) concatenated by :func:`add_coords`,
conditioned on the tiny CLIP's per-token text states; v-prediction, min-SNR-5 weighting,
``squaredcos_cap_v2``, 10 % caption dropout (empty caption), EMA, AdamW, grad clip 1.

Guarantees: the batch, timesteps, noise and dropout of step ``s`` depend only on
``(seed, s)``; a run resumed from its checkpoint continues the same sequence (up to float
non-determinism of CPU kernels); every checkpoint also exports the EMA weights as a loadable
pipeline under ``out/pipeline``.
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
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from tqdm import tqdm

from world.clip import WorldCLIP, load_clip
from world.train_common import (
    EMA,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    setup_logging,
    step_batch,
)

log = logging.getLogger("world.unet")
NUM_TRAIN_TIMESTEPS = 1000
MIN_SNR = 5.0
_COORDS: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """Concatenate CoordConv channels (x then y, each in [-1, 1]) to ``B×C×H×W`` → C+2."""
    b, _, h, w = x.shape
    key = (h, w, x.dtype)
    if key not in _COORDS:
        ys = torch.linspace(-1, 1, h, dtype=x.dtype).view(1, 1, h, 1).expand(1, 1, h, w)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype).view(1, 1, 1, w).expand(1, 1, h, w)
        _COORDS[key] = torch.cat([xs, ys], 1).contiguous()
    return torch.cat([x, _COORDS[key].to(x.device).expand(b, -1, -1, -1)], 1)


def build_unet(cross_attention_dim: int, tiny: bool = False) -> UNet2DConditionModel:
    """The world UNet (in 5 = RGB + 2 coords, out 3). ``attention_head_dim`` is the number of
    heads in diffusers, set to channels // 32 (head dim 32)."""
    unet: UNet2DConditionModel
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=5,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=(1, 1),
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=5,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64, 128),
            norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=(1, 2, 4),
        )
    return unet


def train_scheduler() -> DDPMScheduler:
    """The training noise schedule (v-prediction, cosine)."""
    sched: DDPMScheduler = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
    )
    return sched


def sample_scheduler() -> DDIMScheduler:
    """The sampling scheduler: DDIM, trailing spacing, clip_sample, steps_offset 1."""
    sched: DDIMScheduler = DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        timestep_spacing="trailing",
        steps_offset=1,
        set_alpha_to_one=True,
    )
    return sched


@dataclass
class UNetTrainConfig:
    """Hyper-parameters of :func:`train_unet`."""

    out_dir: str = "models/world/ckpt/unet_run"
    clip_path: str = "models/world/ckpt/clip_run/clip"
    seed: int = 0
    batch_size: int = 32
    max_steps: int = 4000
    time_budget_s: float = 4200.0
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    ckpt_every_s: float = 300.0
    log_every: int = 50
    tiny: bool = False
    threads: int = 0  # torch threads; 0 = adaptive between 1 and torch.get_num_threads()


class _ThreadPicker:
    """Adapts the torch thread count to CPU contention on a shared machine.

    Works in blocks of ``block`` steps: runs the count with the best last-measured speed
    (1 at the start) and every 5th block tries the other count (1 vs the maximum), cut short
    after 3 steps if it is more than 1.3× slower. With other
    processes busy, 2 spinning OpenMP threads on 2 cores can be several times slower than 1;
    on a quiet machine 2 are about 1.8× faster.
    """

    def __init__(self, fixed: int, block: int = 20) -> None:
        self.max = torch.get_num_threads()
        self.fixed, self.block = fixed, block
        self.rate: dict[int, float] = {}
        self.cur, self.t, self.n, self.trial_blk = 1, time.time(), 0, -1
        if fixed == 0 and self.max > 1:
            torch.set_num_threads(1)

    def tick(self, step: int) -> None:
        """Call once per training step (before it)."""
        if self.fixed or self.max == 1:
            return
        self.n += 1
        rate = (time.time() - self.t) / self.n
        best_rate = min(self.rate.values(), default=rate)
        trial_bad = self.n >= 3 and rate > 1.3 * best_rate  # abandon a clearly worse trial
        if self.n < self.block and not trial_bad:
            return
        self.rate[self.cur] = rate
        best = min(self.rate, key=lambda k: self.rate[k])
        other = 1 if best == self.max else self.max
        blk = step // self.block
        nxt = best
        if blk % 5 == 4 and blk != self.trial_blk:
            nxt, self.trial_blk = other, blk
        if nxt != self.cur:
            rates = {k: round(v, 2) for k, v in self.rate.items()}
            log.info("threads %d -> %d (s/step %s)", self.cur, nxt, rates)
        self.cur, self.t, self.n = nxt, time.time(), 0
        torch.set_num_threads(nxt)


def v_loss(
    unet: UNet2DConditionModel,
    x0: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(min-SNR-5 weighted v-MSE, unweighted v-MSE) of one batch."""
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    pred = unet(add_coords(xt), t, encoder_hidden_states=cond).sample
    mse = F.mse_loss(pred, v, reduction="none").mean(dim=(1, 2, 3))
    snr = (ab / (1 - ab)).view(-1)
    w = torch.clamp(snr, max=MIN_SNR) / (snr + 1)
    return (w * mse).mean(), mse.mean()


def train_unet(cfg: UNetTrainConfig) -> Path:
    """Train (or resume from ``out_dir``) and export the EMA pipeline; returns its path."""
    out = Path(cfg.out_dir)
    setup_logging(out)
    torch.manual_seed(cfg.seed)
    clip = load_clip(cfg.clip_path).requires_grad_(False)
    unet = build_unet(clip.clip.transformer.width, cfg.tiny)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    alphas_cumprod = train_scheduler().alphas_cumprod.float()
    step, elapsed = 0, 0.0
    if (ck := load_checkpoint(out)) is not None:
        unet.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])
        step, elapsed = ck["step"], ck["elapsed"]
        log.info("resumed UNet at step %d (%.0f s)", step, elapsed)
    log.info("UNet params %d", sum(p.numel() for p in unet.parameters()))
    unet.train()
    t0, last_ck = time.time() - elapsed, time.time()
    run_t0 = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="unet", dynamic_ncols=True)
    wl: list[float] = []
    ul: list[float] = []

    def checkpoint() -> None:
        save_checkpoint(
            out,
            {
                "model": unet.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema.state_dict(),
                "step": step,
                "elapsed": time.time() - t0,
                "config": asdict(cfg),
            },
        )
        export_pipeline(
            out, Path(cfg.clip_path), out / "pipeline", fp16=False, ema=ema, tiny=cfg.tiny
        )

    start_step = step
    threads = _ThreadPicker(cfg.threads)
    while step < cfg.max_steps and time.time() - t0 < cfg.time_budget_s:
        threads.tick(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.max_steps)
        x, caps, _ = step_batch(cfg.seed + 1, step, cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist(), strict=True)]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            cond = clip(clip.tokenize(caps))
        loss, mse = v_loss(unet, torch.from_numpy(x), cond, t, noise, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet)
        step += 1
        wl.append(loss.item())
        ul.append(mse.item())
        bar.update(1)
        if step % cfg.log_every == 0:
            rate = (time.time() - run_t0) / max(1, step - start_step)
            log.info(
                "unet step %d loss %.4f v-mse %.4f lr %.2e %.2f s/step elapsed %.0fs",
                step,
                np.mean(wl),
                np.mean(ul),
                opt.param_groups[0]["lr"],
                rate,
                time.time() - t0,
            )
            bar.set_postfix(loss=f"{np.mean(ul):.3f}")
            wl, ul = [], []
        if time.time() - last_ck > cfg.ckpt_every_s:
            checkpoint()
            last_ck = time.time()
    bar.close()
    checkpoint()
    log.info("UNet done: %d steps, %.0f s", step, time.time() - t0)
    return out / "pipeline"


def export_pipeline(
    ckpt_dir: Path,
    clip_path: Path,
    out: Path,
    fp16: bool = True,
    ema: EMA | None = None,
    tiny: bool | None = None,
) -> Path:
    """Write a :class:`world.pipeline.WorldPipeline` with the EMA UNet weights of
    ``ckpt_dir`` (or of ``ema``) and the CLIP of ``clip_path`` to ``out``."""
    from world.pipeline import WorldPipeline

    clip: WorldCLIP = load_clip(clip_path)
    if ema is None:
        ck = load_checkpoint(ckpt_dir)
        if ck is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        ema = EMA(torch.nn.Linear(1, 1), 0.0)
        ema.load_state_dict(ck["ema"])
        tiny = bool(ck["config"].get("tiny", False)) if tiny is None else tiny
    unet = build_unet(clip.clip.transformer.width, bool(tiny))
    ema.copy_to(unet)
    unet.eval()
    pipe = WorldPipeline(unet=unet, scheduler=sample_scheduler(), text_encoder=clip)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(str(out))
    clip.tokenizer.save(out / "text_encoder" / "tokenizer.json")
    return out


def describe(unet: UNet2DConditionModel) -> dict[str, Any]:
    """Parameter count and config summary (for the model card)."""
    return {
        "params": sum(p.numel() for p in unet.parameters()),
        "block_out_channels": list(unet.config["block_out_channels"]),
        "in_channels": unet.config["in_channels"],
    }
