"""One pipeline call with the three strategies' knobs: N steps, resume after K steps from
given latents, capture of intermediate latents. Used by the diffusers backend and by the
profiling commands, so both measure and serve the same code path.

Works with the project's ``WorldPipeline`` (native ``start_step``) and with diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (or any pipeline with
``callback_on_step_end`` and ``latents``) whose scheduler is DDIM-like.

Guarantees:
- ``start_step=K`` with ``latents`` = the latent captured after step K of a run of the
  same prompt(s), N, guidance and model gives that run's output bit for bit
  (deterministic DDIM: the scheduler keeps the N-step timesteps and drops the first K,
  env notes section 2 variant 2), and calls the denoiser exactly N - K times per step of
  the batch (twice that many UNet rows with classifier-free guidance, one call each).
- ``capture`` returns ``{K: latents after K steps}`` (B x C x H x W, cloned) for each K
  reached; the run itself is unaffected.
- ``on_step(step, total)`` is called after each executed step (1-based, ``total = N - K``);
  returning False stops the run before the next step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

StepFn = Callable[[int, int], bool]


class ResumeError(ValueError):
    """The pipeline or its scheduler cannot resume from an intermediate latent exactly."""


_SKIP_CLASSES: dict[type, type] = {}


def skip_scheduler(scheduler: Any, skip: int) -> Any:
    """A copy of ``scheduler`` whose ``set_timesteps(N)`` keeps N's timesteps but drops the
    first ``skip``.

    Raises:
        ResumeError: The scheduler is not deterministic DDIM-like (``init_noise_sigma``
            must be 1 and each step must depend only on its own timestep).
    """
    from diffusers import DDIMScheduler

    if not issubclass(type(scheduler), DDIMScheduler):
        raise ResumeError(
            f"cache tiers need a DDIM scheduler (stateless steps, init_noise_sigma 1); "
            f"this pipeline uses {type(scheduler).__name__}")
    base: Any = type(scheduler)
    cls: Any = _SKIP_CLASSES.get(base)
    if cls is None:
        def set_timesteps(self: Any, num_inference_steps: int, *args: Any,
                          **kwargs: Any) -> None:
            base.set_timesteps(self, num_inference_steps, *args, **kwargs)
            self.timesteps = self.timesteps[self.skip:]

        cls = type(f"Skip{base.__name__}", (base,), {"set_timesteps": set_timesteps,
                                                      "skip": 0})
        _SKIP_CLASSES[base] = cls
    sched = cls.from_config(scheduler.config)
    sched.skip = skip
    return sched


def is_world(pipe: Any) -> bool:
    """True for pipelines that take ``start_step`` natively (the world pipeline)."""
    return "start_step" in inspect.signature(pipe.__call__).parameters


def run_pipeline(pipe: Any, prompts: Sequence[str], *, steps: int, guidance: float,
                 generators: Sequence[Any] | None = None, latents: Any | None = None,
                 start_step: int = 0, capture: Sequence[int] = (),
                 on_step: StepFn | None = None, width: int | None = None,
                 height: int | None = None, output_type: str = "pil",
                 images_per_prompt: int = 1) -> tuple[Any, dict[int, Any]]:
    """Run ``pipe`` once; returns ``(images, {K: latents after K steps})``.

    Args:
        pipe: A loaded pipeline (see module docstring).
        prompts: One per image group (``images_per_prompt`` images each).
        steps: N, the schedule length.
        guidance: Classifier-free guidance scale (<= 1: off).
        generators: One CPU ``torch.Generator`` per image (initial noise), used when
            ``latents`` is None.
        latents: Starting latents, one per image: noise (``start_step`` 0) or the
            latents after ``start_step`` steps.
        start_step: K, steps to skip (needs ``latents``).
        capture: Step counts after which to keep the latents.
        on_step: Progress callback (see module docstring).
        width: Image width, for pipelines that take one.
        height: Image height, for pipelines that take one.
        output_type: Passed to the pipeline ("pil", "np", "latent").
        images_per_prompt: Images per prompt (``num_images_per_prompt`` when the pipeline
            takes it, else each prompt is repeated).

    Raises:
        ResumeError: ``start_step > 0`` without latents, or a scheduler that cannot resume.
    """
    import torch

    if start_step and latents is None:
        raise ResumeError("start_step > 0 needs the latents after start_step steps")
    if not 0 <= start_step < steps:
        raise ResumeError(f"start_step {start_step} not in [0, {steps})")
    params = inspect.signature(pipe.__call__).parameters
    total = steps - start_step
    wanted = set(capture)
    captured: dict[int, Any] = {}

    world = is_world(pipe)

    def callback(p: Any, i: int, _t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        # The world pipeline numbers steps in the full schedule; diffusers pipelines
        # number the (sliced) timesteps they run.
        done = i + 1 if world else start_step + i + 1
        if done in wanted:
            captured[done] = kw["latents"].detach().clone()
        if on_step is not None and not on_step(done - start_step, total):
            p._interrupt = True
        return kw

    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance,
                              "output_type": output_type, "callback_on_step_end": callback}
    if "width" in params and "height" in params and width and height:
        kwargs.update(width=width, height=height)
    if "num_images_per_prompt" in params:
        batch_prompts = list(prompts)
        kwargs["num_images_per_prompt"] = images_per_prompt
    else:
        batch_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    if latents is not None:
        kwargs["latents"] = latents
    elif generators is not None:
        kwargs["generator"] = list(generators)
    with torch.inference_mode():
        if world:
            out = pipe(batch_prompts, start_step=start_step, **kwargs)
        elif start_step == 0:
            out = pipe(batch_prompts, **kwargs)
        else:
            original = pipe.scheduler
            # object.__setattr__: swap without rewriting the pipeline's saved config.
            object.__setattr__(pipe, "scheduler", skip_scheduler(original, start_step))
            try:
                out = pipe(batch_prompts, **kwargs)
            finally:
                object.__setattr__(pipe, "scheduler", original)
    return out.images, captured


def initial_latents(pipe: Any, generators: Sequence[Any], width: int | None = None,
                    height: int | None = None) -> Any:
    """The starting noise each generator gives, stacked (B x C x h x w, CPU float32),
    exactly as the pipeline would draw it from the same generators."""
    import torch

    if is_world(pipe):
        size = int(pipe.unet.config.sample_size)
        shape: tuple[int, ...] = (1, 3, size, size)
    else:
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        h = (height or pipe.unet.config.sample_size * factor) // factor
        w = (width or pipe.unet.config.sample_size * factor) // factor
        shape = (1, int(pipe.unet.config.in_channels), h, w)
    return torch.cat([torch.randn(shape, generator=g) for g in generators])
