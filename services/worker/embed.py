"""Prompt embeddings for the approximate cache's nearest-neighbour search, behind one
small interface (:class:`TextEmbedder`).

- The small world: ``world.clip.encode_text`` with the CLIP inside the pipeline
  (``pipe.text_encoder`` is a ``WorldCLIP``).
- Stable Diffusion 1.x/2.x: the pipeline's ``CLIPTextModel`` pooled output.
- SDXL: the pipeline's second text encoder (``CLIPTextModelWithProjection``)
  projected ``text_embeds``, the embedding CLIP itself compares with images.

Guarantees: ``embed`` returns float32 ``B x D`` rows of unit L2 norm, deterministic
for a given model (eval mode, no dropout); the same model gives the same vectors in the
worker (from the loaded pipeline) and in the classifier (:func:`load_embedder` loads
only the text encoder from the same directory).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class TextEmbedder(Protocol):
    """Maps prompts to unit vectors; ``name`` identifies the embedding space."""

    name: str

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 ``B x D`` embeddings."""
        ...


def _normalise(x: Any) -> np.ndarray:
    raw = x.detach().float().cpu().numpy() if hasattr(x, "detach") else x
    arr: np.ndarray = np.asarray(raw, dtype=np.float32)
    out: np.ndarray = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
    return out


class WorldEmbedder:
    """The world's tiny CLIP text tower (``world.clip.encode_text``)."""

    name = "world-clip"

    def __init__(self, clip: Any) -> None:
        self.clip = clip

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings (``encode_text`` already normalises)."""
        from world.clip import encode_text

        return _normalise(encode_text(self.clip, list(prompts)))


class HFClipEmbedder:
    """A transformers CLIP text encoder: projected ``text_embeds`` when it has a
    projection (SDXL's second encoder), else the pooled output (SD 1.x/2.x)."""

    def __init__(self, encoder: Any, tokenizer: Any, name: str = "hf-clip") -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.name = name

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings."""
        import torch

        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length,
                             return_tensors="pt")
        ids = tok.input_ids.to(self.encoder.device)
        with torch.inference_mode():
            out = self.encoder(ids)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out.pooler_output
        return _normalise(pooled)


def embedder_for_pipeline(pipe: Any) -> TextEmbedder:
    """The embedder of a loaded pipeline (see module docstring).

    Raises:
        ValueError: The pipeline has no text encoder this module knows.
    """
    enc2 = getattr(pipe, "text_encoder_2", None)
    if enc2 is not None:
        return HFClipEmbedder(enc2, pipe.tokenizer_2, "sdxl-clip-g")
    enc = getattr(pipe, "text_encoder", None)
    if enc is not None and type(enc).__name__ == "WorldCLIP":
        return WorldEmbedder(enc)
    if enc is not None and getattr(pipe, "tokenizer", None) is not None:
        return HFClipEmbedder(enc, pipe.tokenizer, "sd-clip")
    raise ValueError(f"{type(pipe).__name__} has no text encoder to embed prompts with")


def load_embedder(model_path: str | Path) -> TextEmbedder:
    """Load only the text encoder of a local pipeline directory (for the classifier).

    Raises:
        ValueError: No ``model_index.json`` or no text encoder in it.
    """
    root = Path(model_path)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{root} is not a pipeline directory (no model_index.json)")
    index = json.loads(index_file.read_text())
    if index.get("_class_name") == "WorldPipeline":
        from world.clip import load_clip

        return WorldEmbedder(load_clip(root / "text_encoder"))
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if "text_encoder_2" in index:
        enc: Any = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2")
        tok: Any = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
        return HFClipEmbedder(enc.eval(), tok, "sdxl-clip-g")
    if "text_encoder" in index:
        enc = CLIPTextModel.from_pretrained(root / "text_encoder")
        tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
        return HFClipEmbedder(enc.eval(), tok, "sd-clip")
    raise ValueError(f"{root}: no text encoder in model_index.json")
