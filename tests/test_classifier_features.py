"""Classifier features: prompt statistics, the feature matrix, the embedders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from services.classifier.features import (
    CACHE_NAMES,
    STAT_NAMES,
    build_features,
    feature_names,
    load_embedder,
    prompt_stats,
)


def test_prompt_stats_and_feature_layout() -> None:
    s = prompt_stats(["a red circle", "two blue squares, and 3 green circles above"])
    assert s.dtype == np.float32 and s.shape == (2, len(STAT_NAMES))
    assert s[0].tolist() == [12, 3, 0, 0, 0]
    assert s[1].tolist() == [43, 8, 1, 1, 2]
    emb = np.eye(2, 4, dtype=np.float32)
    x = build_features(emb, ["a", "b c"], np.array([0.9, np.nan]), None)
    names = feature_names(4)
    assert x.shape == (2, len(names)) == (2, 4 + len(CACHE_NAMES) + len(STAT_NAMES))
    sim, kfrac = names.index("cache_similarity"), names.index("cache_best_k_frac")
    assert x[:, sim].tolist() == pytest.approx([0.9, 0.0]) and x[:, kfrac].tolist() == [0, 0]
    assert x[1, names.index("words")] == 2
    with pytest.raises(ValueError, match="3 embeddings for 2 prompts"):
        build_features(np.zeros((3, 4), np.float32), ["a", "b"])


def test_embedder_specs_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown embedder"):
        load_embedder("bert:base")
    with pytest.raises(ValueError, match="no WorldCLIP"):
        load_embedder(f"world:{tmp_path}")
    with pytest.raises(ValueError, match="open_clip:MODEL"):
        load_embedder("open_clip:")


def test_world_embedder_from_a_pipeline_directory(tmp_path: Path) -> None:
    """A random-weight tiny WorldCLIP saved as a pipeline's text_encoder (as the committed
    world pipeline lays it out): unit-norm, deterministic rows of the model's dimension."""
    import torch

    from world.clip import WorldCLIP

    tiny = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8,
                           "mlp_ratio": 1.0, "patch_size": 8},
            "text_cfg": {"context_length": 24, "vocab_size": 64, "width": 16, "heads": 2,
                         "layers": 1, "mlp_ratio": 1.0}}
    torch.manual_seed(0)
    WorldCLIP(model_cfg=tiny).eval().save_pretrained(tmp_path / "text_encoder")
    emb = load_embedder(f"world:{tmp_path}")
    assert emb.dim == 16 and emb.name == f"world:{tmp_path}"
    e = emb.embed(["a red circle", "two blue squares", "zebra"])
    assert e.shape == (3, 16) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.array_equal(e, emb.embed(["a red circle", "two blue squares", "zebra"]))
    assert emb.embed([]).shape == (0, 16)


def test_lgbm_embeds_once_when_the_cache_shares_the_world_clip(redis_url: str) -> None:
    """The committed model (world CLIP features) with the world registry's cache tiers:
    the cache lookup is given the features' embedder and the decisions are the same as
    with a lookup that embeds by itself."""
    from common.messages import PromptJob
    from common.settings import REPO_ROOT, ClassifierSettings
    from common.tiers import load_registry
    from services.classifier.cache_lookup import build_lookup
    from services.classifier.lgbm import LgbmPolicy, make_lgbm_policy

    tiers = REPO_ROOT / "profiles" / "tiers.yaml"
    cfg = ClassifierSettings(redis_url=redis_url, tiers_file=tiers, policy="argus",
                             predictor="lgbm")
    shared = make_lgbm_policy(cfg, load_registry(tiers), "argus")
    assert shared.lookup is not None
    assert shared.lookup.embedder is shared.loaded.embedder  # type: ignore[attr-defined]
    calls: list[int] = []
    embed = shared.loaded.embedder.embed

    def counting(prompts: Sequence[str]) -> np.ndarray:
        calls.append(len(prompts))
        out: np.ndarray = embed(prompts)
        return out

    shared.loaded.embedder.embed = counting
    own = LgbmPolicy(cfg.classifier_model, tiers, "argus",
                     lookup=build_lookup(redis_url, load_registry(tiers)))
    jobs = [PromptJob(job_id=str(i), prompt=p, seed=1) for i, p in
            enumerate(["a red circle", "two small blue squares", "a green triangle above a "
                       "yellow circle"])]
    assert shared.decide(jobs) == own.decide(jobs)
    assert calls == [3]  # one embedding pass for features and cache lookup together
