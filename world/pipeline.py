"""``WorldPipeline``: the embedded text-to-image model as a diffusers pipeline.

Components: ``unet`` (``UNet2DConditionModel``, 5 input channels = RGB + CoordConv x/y),
``scheduler`` (``DDIMScheduler``, v-prediction, trailing spacing), ``text_encoder``
(:class:`world.clip.WorldCLIP`, which carries its word tokenizer in its config). The
"latents" are the 3×32×32 pixel-space images in [-1, 1].

Guarantees the serving system relies on:

* ``callback_on_step_end(pipe, i, t, kwargs)`` is called after every executed step ``i``
  (0-based index in the N-step schedule) with ``kwargs["latents"]`` = the latent after
  ``i + 1`` steps; a returned ``{"latents": x}`` replaces the latent.
* ``pipe._interrupt = True`` (property :attr:`WorldPipeline.interrupt`) stops before the next
  step; the current latent is decoded and returned. It is reset at the start of each call.
* ``start_step=K, latents=x`` runs only steps K…N−1 of the same N-step schedule. If ``x``
  is the latent passed to the callback at ``i = K−1`` of a run of the same prompt batch
  and guidance, the output equals that run's output bit for bit (deterministic DDIM, eta 0).
* Same prompt, seed (``generator``) and settings → same image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from world.clip import WorldCLIP
from world.unet import add_coords

#: Default classifier-free guidance (1.0 = no CFG: one UNet evaluation per step).
DEFAULT_GUIDANCE = 1.0
DEFAULT_STEPS = 20
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "models" / "world" / "pipeline"


class WorldPipeline(DiffusionPipeline):
    """Text → 32×32 RGB image of the shapes world (see module docstring for semantics)."""

    model_cpu_offload_seq = "text_encoder->unet"  # type: ignore[assignment]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    text_encoder: WorldCLIP

    def __init__(
        self, unet: UNet2DConditionModel, scheduler: DDIMScheduler, text_encoder: WorldCLIP
    ) -> None:
        super().__init__()
        self.register_modules(  # type: ignore[no-untyped-call]
            unet=unet, scheduler=scheduler, text_encoder=text_encoder
        )
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        """True once someone set ``_interrupt``; the denoising loop stops before the next step."""
        return bool(getattr(self, "_interrupt", False))

    @property
    def tokenizer(self) -> Any:
        """The text encoder's word tokenizer."""
        return self.text_encoder.tokenizer

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per-token text states ``B×T×D`` in the UNet's dtype."""
        states = self.text_encoder.text_forward(self.text_encoder.tokenize(list(prompts)))[0]
        return states.to(device=self.unet.device, dtype=self.unet.dtype)

    def timesteps_for(self, num_inference_steps: int) -> torch.Tensor:
        """The schedule's timesteps for N steps (index i ↔ step i)."""
        self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps.clone()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        start_step: int = 0,
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        """Generate one image per prompt.

        ``latents``: initial noise ``B×3×32×32`` (``start_step == 0``) or the latent after
        ``start_step`` steps. ``output_type``: ``"pil"`` (list of PIL images), ``"np"``
        (float32 ``B×32×32×3`` in [0, 1]) or ``"latent"`` (the final tensor). Returns an
        ``ImagePipelineOutput`` (or the tuple ``(images,)`` if not ``return_dict``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        bsz = len(prompts)
        if not 0 <= start_step <= num_inference_steps:
            raise ValueError(f"start_step {start_step} not in [0, {num_inference_steps}]")
        if start_step > 0 and latents is None:
            raise ValueError("start_step > 0 needs the latent after start_step steps")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"unsupported callback tensor inputs {sorted(bad)}")
        self._interrupt = False
        dtype, device = self.unet.dtype, self.unet.device
        cond = self.encode_prompt(prompts)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            cond = torch.cat([self.encode_prompt([""] * bsz), cond])
        timesteps = self.timesteps_for(num_inference_steps)
        size = int(self.unet.config["sample_size"])
        shape = (bsz, 3, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = latents * self.scheduler.init_noise_sigma
        else:
            latents = latents.to(device=device, dtype=dtype).clone()
        for i, t in enumerate(timesteps):
            if i < start_step:
                continue
            if self.interrupt:
                break
            x_in = add_coords(torch.cat([latents, latents]) if do_cfg else latents)
            v = self.unet(x_in, t, encoder_hidden_states=cond).sample
            if do_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            stepped = self.scheduler.step(v, t, latents, eta=0.0)
            assert not isinstance(stepped, tuple)
            latents = stepped.prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents}
                kw = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                ret = callback_on_step_end(self, i, t, kw)
                if ret:
                    latents = ret.pop("latents", latents)
        images: Any
        if output_type == "latent":
            images = latents
        else:
            arr = (latents.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            images = arr if output_type == "np" else [PIL.Image.fromarray(a) for a in to_uint8(arr)]
        self.maybe_free_model_hooks()  # type: ignore[no-untyped-call]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def to_uint8(images: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Float [0, 1] ``B×H×W×3`` array or list of PIL images → uint8 ``B×H×W×3``."""
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        out: np.ndarray = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return out
    return np.stack([np.asarray(im) for im in images]).astype(np.uint8)


def load_world_pipeline(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> WorldPipeline:
    """Load a saved :class:`WorldPipeline` (default: the committed ``models/world/pipeline``)
    in ``dtype`` (float32 by default; the committed weights are stored in fp16)."""
    pipe = WorldPipeline.from_pretrained(str(path or DEFAULT_PATH), dtype=dtype)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe
