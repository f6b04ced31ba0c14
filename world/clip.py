"""Tiny CLIP of the embedded world: open_clip model ``argus-tinyclip`` with a word tokenizer.

The vocabulary is trimmed to the world's words (plus ``<pad> <unk> <sot> <eot>``), so the
token table is a few KB instead of 6M parameters. Any text is accepted: unknown words map to
``<unk>`` and long texts are truncated to the context length (the ``<eot>`` is kept).

Guarantees: :func:`encode_text` returns L2-normalised float32 embeddings; :func:`text_states`
returns the per-token states (``B×T×D``, ``ln_final`` output) that condition the UNet;
:func:`clip_score` is ``100·cos(image, text)``. Everything is deterministic in eval mode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from open_clip.transformer import text_global_pool

from world.scenes import COLOURS, SHAPES

__all__ = [
    "MODEL_NAME",
    "ModelMixin",
    "WordTokenizer",
    "WorldCLIP",
    "build_vocab",
    "clip_score",
    "encode_text",
    "images_to_tensor",
    "load_clip",
    "text_states",
]

MODEL_NAME = "argus-tinyclip"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)
SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")
_TOKEN_RE = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_GRAMMAR_WORDS = """
a an one two three 2 3 small large on the left right at top bottom in centre center middle
above below under to of and , . picture image drawing photo white background there is
"""


def build_vocab() -> list[str]:
    """The world's vocabulary: specials (ids 0–3) then every word of the caption grammar."""
    words = set(re.findall(r"\S+", _GRAMMAR_WORDS))
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES}
    return list(SPECIALS) + sorted(words)


class WordTokenizer:
    """Lower-cased word-level tokenizer: ``<sot> w1 … wn <eot> <pad>…`` (unknown → ``<unk>``)."""

    def __init__(self, vocab: Sequence[str], context_length: int) -> None:
        self.vocab = list(vocab)
        self.context_length = context_length
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad, self.unk, self.sot, self.eot = (self.index[s] for s in SPECIALS)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (without padding)."""
        ids = [self.index.get(w, self.unk) for w in _TOKEN_RE.findall(text.lower())]
        return [self.sot, *ids[: self.context_length - 2], self.eot]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Batch of texts → LongTensor ``B×context_length``."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def save(self, path: str | Path) -> None:
        """Write ``{"vocab": [...], "context_length": n}`` as JSON."""
        Path(path).write_text(
            json.dumps({"vocab": self.vocab, "context_length": self.context_length}, indent=1)
        )

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Inverse of :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(d["vocab"], int(d["context_length"]))


class WorldCLIP(ModelMixin, ConfigMixin):
    """The tiny CLIP (both towers) as a diffusers model, so pipelines can save/load it.

    ``self.clip`` is an ``open_clip.CLIP`` built from the registered ``argus-tinyclip``
    config with the vocabulary size and context length of the tokenizer.
    """

    config_name = "config.json"  # type: ignore[assignment]

    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        vocab: list[str] | None = None,
        context_length: int = 24,
        model_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        vocab = vocab or build_vocab()
        cfg = json.loads(json.dumps(model_cfg or open_clip.get_model_config(MODEL_NAME)))
        cfg["text_cfg"]["vocab_size"] = len(vocab)
        cfg["text_cfg"]["context_length"] = context_length
        cfg["text_cfg"]["pool_type"] = "eos"
        cfg["text_cfg"]["eos_id"] = SPECIALS.index("<eot>")
        self.clip = open_clip.CLIP(**cfg)
        # Store the resolved vocabulary and config so saved models never depend on defaults.
        self.register_to_config(vocab=list(vocab), model_cfg=cfg)  # type: ignore[no-untyped-call]
        self.tokenizer = WordTokenizer(vocab, context_length)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids on this model's device."""
        return self.tokenizer(texts).to(self.clip.logit_scale.device)

    def text_forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token states ``B×T×D``, pooled projected embedding ``B×E``, unnormalised)."""
        c = self.clip
        x = c.token_embedding(tokens) + c.positional_embedding
        x = c.transformer(x, attn_mask=c.attn_mask)
        x = c.ln_final(x)
        pooled = text_global_pool(x, tokens, c.text_pool_type, eos_token_id=c.text_eos_id)
        pooled = pooled @ c.text_projection
        return x, pooled

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token text states ``B×T×D`` (the UNet's ``encoder_hidden_states``)."""
        return self.text_forward(tokens)[0]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of ``B×3×32×32`` tensors in [-1, 1]."""
        out: torch.Tensor = self.clip.encode_image(images)
        return out


def load_clip(path: str | Path) -> WorldCLIP:
    """Load a :class:`WorldCLIP` saved with ``save_pretrained`` (a directory), in eval mode."""
    model: WorldCLIP = WorldCLIP.from_pretrained(str(path))
    model.eval()
    return model


@torch.no_grad()
def encode_text(model: WorldCLIP, prompts: str | Sequence[str]) -> np.ndarray:
    """L2-normalised pooled text embeddings, float32 ``B×E``."""
    _, pooled = model.text_forward(model.tokenize(prompts))
    return F.normalize(pooled.float(), dim=-1).cpu().numpy()


@torch.no_grad()
def text_states(model: WorldCLIP, prompts: str | Sequence[str]) -> torch.Tensor:
    """Per-token text states ``B×T×D`` for UNet conditioning."""
    return model.text_forward(model.tokenize(prompts))[0]


def images_to_tensor(images: np.ndarray | Sequence[Any]) -> torch.Tensor:
    """uint8 ``B×H×W×3`` array (or list of PIL images / arrays) → float ``B×3×H×W`` in [-1, 1]."""
    arr = np.stack([np.asarray(im) for im in images]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def clip_score(
    model: WorldCLIP, images: np.ndarray | Sequence[Any], prompts: Sequence[str]
) -> np.ndarray:
    """CLIP score ``100·cos(image_i, prompt_i)`` per pair, float32 ``B``."""
    x = images_to_tensor(images).to(model.clip.logit_scale.device)
    im = F.normalize(model.encode_image(x).float(), dim=-1)
    tx = torch.from_numpy(encode_text(model, list(prompts))).to(im.device)
    return (100.0 * (im * tx).sum(-1)).cpu().numpy()


def tiny_clip_config() -> dict[str, Any]:
    """A tiny open_clip config of the same architecture (tests and `train-clip --tiny`):
    one layer per tower, width 16; a fresh dict on every call."""
    return {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 16,
            "head_width": 8,
            "mlp_ratio": 1.0,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 64,
            "width": 16,
            "heads": 2,
            "layers": 1,
            "mlp_ratio": 1.0,
        },
    }
