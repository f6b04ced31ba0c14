"""Tiny random-weight Stable Diffusion pipelines and tier registries for tests.

Everything here works offline: the tokenizer is built from open_clip's bundled BPE file
(ids identical to OpenAI CLIP), and the UNet/VAE/text encoder are random-weight,
architecture-identical miniatures of SD 1.x (see ``../shared/reference/environment-notes.md``
section 2). ``build_tiny_sd`` runs in well under a second once torch is imported, and the
resulting pipeline denoises a 32x32 image in a few milliseconds per step on CPU.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import yaml

TINY_SD_SEED = 0


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-unicode table (as in OpenAI CLIP and open_clip)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def default_bpe() -> Path:
    """open_clip's bundled BPE file, found without importing open_clip (slow import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed (its BPE vocabulary is needed)")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def clip_tokenizer(model_max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` built from open_clip's bundled BPE (no download)."""
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges: Any = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                         model_max_length=model_max_length)


def build_tiny_sd(path: Path) -> Path:
    """Build a tiny random-weight ``StableDiffusionPipeline`` and save it under ``path``.

    The weights are seeded (``TINY_SD_SEED``), so two builds are identical. The VAE
    factor is 2 and the UNet has one downsampling block; sizes must still be multiples
    of 8 (diffusers' own rule for SD pipelines).

    Returns:
        ``path``, now holding ``model_index.json`` and the component folders, loadable
        with ``DiffusionPipeline.from_pretrained(path)`` offline.
    """
    import diffusers as _diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    d: Any = _diffusers  # diffusers is untyped: call through Any

    torch.manual_seed(TINY_SD_SEED)
    unet = d.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8)
    vae = d.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=5, vocab_size=49408, max_position_embeddings=77))
    scheduler = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = d.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def write_registry(path: Path, model: str | Path, steps: tuple[int, int] = (4, 2), *,
                   latency: dict[int, float] | None = None, device: str = "cpu",
                   batch_sizes: tuple[int, ...] = (1, 2, 4), guidance: float = 1.0) -> Path:
    """Write a two-tier registry YAML: tier 0 ``exact``, tier 1 ``steps``, same model.

    Args:
        path: The YAML file to write.
        model: Model path or id of both tiers.
        steps: Denoising steps of tier 0 and tier 1.
        latency: Seconds per batch size (``{batch: seconds}``) on ``device``, used for
            both tiers, tier 1 scaled by its share of steps. None: no latency profile.
        device: Device type the latency profile is for.
        batch_sizes: Batch sizes the tiers run.
        guidance: Classifier-free guidance scale (1.0 disables CFG: fastest).

    Returns:
        ``path``.
    """
    tiers: list[dict[str, Any]] = []
    for tier_id, (name, strategy, n) in enumerate(
            [("exact", "exact", steps[0]), (f"steps-{steps[1]}", "steps", steps[1])]):
        tier: dict[str, Any] = {
            "id": tier_id, "name": name, "strategy": strategy, "model": str(model),
            "steps": n, "guidance": guidance, "batch_sizes": list(batch_sizes)}
        if latency:
            tier["latency"] = {device: {b: s * n / steps[0] for b, s in latency.items()}}
        tiers.append(tier)
    doc = {"name": "test", "description": "tiny test registry", "device": device,
           "tiers": tiers}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def build_tiny_sdxl(path: Path) -> Path:
    """Build a tiny random-weight ``StableDiffusionXLPipeline`` (DDIM) under ``path``.

    The config follows diffusers' own SDXL tests: a UNet with
    ``addition_embed_type="text_time"``, two text encoders (``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``, hidden 32 each: cross-attention 64), VAE factor 2,
    tokenizers built from open_clip's BPE (no download). Seeded: two builds are equal.
    """
    import diffusers as _diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d: Any = _diffusers
    torch.manual_seed(TINY_SD_SEED)
    unet = d.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
    vae = d.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, sample_size=64)
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                         num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
                         max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    scheduler = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1)
    pipe = d.StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(cfg), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(cfg), tokenizer_2=clip_tokenizer(),
        scheduler=scheduler, force_zeros_for_empty_prompt=True)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


TINY_WORLD_CLIP: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8,
                   "mlp_ratio": 1.0, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 64, "width": 16, "heads": 2,
                 "layers": 1, "mlp_ratio": 1.0},
}


def tiny_world_pipeline() -> Any:
    """A tiny random-weight ``WorldPipeline`` (seeded), in eval mode, not saved."""
    import torch

    from world.clip import WorldCLIP
    from world.pipeline import WorldPipeline
    from world.unet import build_unet, sample_scheduler

    torch.manual_seed(TINY_SD_SEED)
    clip = WorldCLIP(model_cfg=TINY_WORLD_CLIP).eval()
    unet = build_unet(16, tiny=True).eval()
    pipe: Any = WorldPipeline(unet=unet, scheduler=sample_scheduler(), text_encoder=clip)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_world(path: Path) -> Path:
    """Save :func:`tiny_world_pipeline` under ``path`` (loadable by the worker)."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_world_pipeline().save_pretrained(str(path))
    return path


def write_world_registry(path: Path, model: str | Path, steps: int = 10,
                         skips: tuple[int, ...] = (2, 4), fewer: tuple[int, ...] = (5,),
                         batch_sizes: tuple[int, ...] = (1, 4)) -> Path:
    """A registry with every strategy on one world model: exact at ``steps``, one cache
    tier per K in ``skips``, one steps tier per N in ``fewer``, and a ``model`` tier
    (the same directory under another name, so switching to it loads and counts)."""
    tiers: list[dict[str, Any]] = [
        {"name": "exact", "strategy": "exact", "model": str(model), "steps": steps}]
    tiers += [{"name": f"cache-k{k}", "strategy": "cache", "model": str(model),
               "steps": steps, "skip": k} for k in skips]
    tiers += [{"name": f"steps-{n}", "strategy": "steps", "model": str(model), "steps": n}
              for n in fewer]
    tiers.append({"name": "model-light", "strategy": "model", "model": f"{model}/.",
                  "steps": max(1, steps // 2)})
    for i, t in enumerate(tiers):
        t.update(id=i, guidance=1.0, batch_sizes=list(batch_sizes))
    doc = {"name": "test-world", "device": "cpu", "tiers": tiers}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
