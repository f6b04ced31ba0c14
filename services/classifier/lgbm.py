"""The LightGBM tier classifier: per-tier safety models and a monotone decision, and the
``lgbm`` predictor of the classifier service (``T2I_PREDICTOR=lgbm``).

Model: for every approximate tier j one binary LightGBM model estimates
``P(tier j is safe for this prompt)`` (safe: relative quality >= 1 - tolerance). The
exact tier is safe by definition (probability 1). Decision (:func:`choose_tiers`): walk
the tiers from the cheapest to the most expensive (by the registry's per-image cost) and
take the first *feasible* one whose probability is >= ``confidence``; fall back to the
exact tier. Feasible: a ``cache`` tier needs a cached neighbour holding its K.

Guarantees:
- :meth:`TierModel.save` writes one JSON file atomically (temporary file + rename):
  a reader sees the old model or the new one, never half a file; :func:`load_model`
  of it predicts exactly what the saved model predicted.
- :func:`choose_tiers` returns the exact tier (0) unless some feasible tier clears the
  confidence; raising ``confidence`` never makes a decision more approximate in cost.
- :class:`LgbmPolicy` re-checks the model and registry files every ``reload_s`` seconds
  between batches; a changed file is loaded and validated completely before the swap, a
  bad one is logged and the previous model kept. No message is dropped: ``decide``
  always answers every job with the model it holds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from common.messages import PromptJob
from common.settings import ClassifierSettings
from common.tiers import Registry, Strategy, load_registry
from services.classifier.baselines import Lookup
from services.classifier.features import Embedder, build_features, feature_names
from services.classifier.features import load_embedder as load_feature_embedder
from services.classifier.policies import Decision, PolicyError

log = logging.getLogger(__name__)

FORMAT = "argus-tier-classifier/1"


class ModelError(ValueError):
    """A classifier model file is missing, unreadable, or inconsistent."""


@dataclass(frozen=True)
class TierInfo:
    """What the decision needs to know about one tier."""

    id: int
    name: str
    strategy: str
    skip: int
    steps: int
    cost: float


def tier_costs(registry: Registry) -> tuple[list[float], str]:
    """Per-image cost of every tier and where it comes from.

    When every tier has a latency profile on the registry's device: seconds per image at
    the tier's largest batch size (``latency:<device>``). Otherwise a proxy: UNet steps
    run (``N - K``; linear in latency for the step and cache tiers of one model), with
    ties (and model tiers) ordered so that a higher tier id is cheaper
    (``unet_steps-proxy``).
    """
    dev = registry.device
    lat = [t.batch_latency(dev, t.max_batch) for t in registry.tiers]
    if all(v is not None for v in lat):
        return [float(v) / t.max_batch for v, t in zip(lat, registry.tiers, strict=True)
                if v is not None], f"latency:{dev}"
    n = len(registry.tiers)
    return [t.unet_steps * (1.0 + 1e-6 * (n - t.id)) for t in registry.tiers], \
        "unet_steps-proxy"


def tier_infos(registry: Registry) -> list[TierInfo]:
    """:class:`TierInfo` of every tier, costs from :func:`tier_costs`."""
    costs, _ = tier_costs(registry)
    return [TierInfo(t.id, t.name, t.strategy.value, t.skip, t.steps, c)
            for t, c in zip(registry.tiers, costs, strict=True)]


def cost_order(tiers: Sequence[TierInfo]) -> list[int]:
    """Tier ids from the cheapest to the most expensive (ties: higher id first)."""
    return sorted((t.id for t in tiers), key=lambda i: (tiers[i].cost, -i))


def feasibility(tiers: Sequence[TierInfo], similarity: np.ndarray,
                available: Sequence[Sequence[int]]) -> np.ndarray:
    """``B x K`` bool: may prompt b be served at tier k? Non-cache tiers always; a cache
    tier when the prompt has a neighbour (finite similarity) that stores the tier's K."""
    b = len(similarity)
    out = np.ones((b, len(tiers)), bool)
    for t in tiers:
        if t.strategy == Strategy.CACHE.value:
            out[:, t.id] = [bool(np.isfinite(similarity[i])) and t.skip in available[i]
                            for i in range(b)]
    return out


def choose_tiers(probs: np.ndarray, feasible: np.ndarray, order: Sequence[int],
                 confidence: float) -> np.ndarray:
    """The cheapest feasible tier whose safety probability is >= ``confidence`` (else 0).

    Args:
        probs: ``B x K`` safety probabilities (column 0, exact, is ignored: always safe).
        feasible: ``B x K`` bool from :func:`feasibility`.
        order: Tier ids cheapest first (:func:`cost_order`).
        confidence: Threshold in [0, 1].
    """
    out = np.zeros(len(probs), np.int64)
    done = np.zeros(len(probs), bool)
    for k in order:
        if k == 0:
            break
        ok = ~done & feasible[:, k] & (probs[:, k] >= confidence)
        out[ok] = k
        done |= ok
    return out


@dataclass
class TierModel:
    """Per-tier safety boosters and the metadata that makes them usable.

    Attributes:
        tiers: The registry's tiers when trained (ids 0..K-1).
        embedder: Embedder spec of the features (``features.load_embedder``).
        dim: Embedding dimension.
        boosters: Tier id -> booster, for approximate tiers with both classes in training.
        constants: Tier id -> constant probability, for tiers that had one class only.
        tolerance: Relative-quality tolerance the labels were made with.
        confidence: Default decision threshold (calibrated at training).
        extra: Free-form training metadata (stored, not interpreted).
    """

    tiers: list[TierInfo]
    embedder: str
    dim: int
    boosters: dict[int, lgb.Booster]
    constants: dict[int, float]
    tolerance: float
    confidence: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Columns the boosters expect."""
        return len(feature_names(self.dim))

    def predict_safe(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        """``B x K`` probabilities that each tier is safe (column 0 is 1); ``threads``
        LightGBM threads (0: its default, all cores)."""
        out = np.ones((x.shape[0], len(self.tiers)), np.float64)
        kw: dict[str, Any] = {"num_threads": threads} if threads > 0 else {}
        for k in range(1, len(self.tiers)):
            if k in self.boosters:
                out[:, k] = self.boosters[k].predict(x, **kw) if len(x) else []
            else:
                out[:, k] = self.constants.get(k, 0.0)
        return out

    def save(self, path: str | Path) -> None:
        """Write the model as one JSON file, atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "embedder": self.embedder, "dim": self.dim,
               "tolerance": self.tolerance, "confidence": self.confidence,
               "tiers": [t.__dict__ for t in self.tiers],
               "boosters": {str(k): b.model_to_string() for k, b in self.boosters.items()},
               "constants": {str(k): v for k, v in self.constants.items()},
               "extra": self.extra}
        fd, tmp = tempfile.mkstemp(prefix=p.name, suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service may run as another user
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_model(path: str | Path) -> TierModel:
    """Read and validate a model file written by :meth:`TierModel.save`.

    Raises:
        ModelError: Missing file, bad JSON, wrong format, or boosters inconsistent with
            the stated tiers and feature count.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        if doc.get("format") != FORMAT:
            raise ModelError(f"{p}: not an {FORMAT} file")
        tiers = [TierInfo(**t) for t in doc["tiers"]]
        model = TierModel(
            tiers=tiers, embedder=str(doc["embedder"]), dim=int(doc["dim"]),
            boosters={int(k): lgb.Booster(model_str=s) for k, s in doc["boosters"].items()},
            constants={int(k): float(v) for k, v in doc["constants"].items()},
            tolerance=float(doc["tolerance"]), confidence=float(doc["confidence"]),
            extra=dict(doc.get("extra", {})))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, lgb.basic.LightGBMError) as exc:
        raise ModelError(f"cannot load classifier model {p}: {exc!r}") from exc
    if [t.id for t in tiers] != list(range(len(tiers))) or len(tiers) < 1:
        raise ModelError(f"{p}: tier ids must be 0..K-1")
    for k, b in model.boosters.items():
        if not 0 < k < len(tiers):
            raise ModelError(f"{p}: booster for unknown tier {k}")
        if b.num_feature() != model.n_features:
            raise ModelError(f"{p}: tier {k} booster has {b.num_feature()} features, "
                             f"expected {model.n_features}")
    return model


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@dataclass
class _Loaded:
    model: TierModel
    embedder: Embedder
    tiers: list[TierInfo]
    order: list[int]


class LgbmPolicy:
    """``T2I_PREDICTOR=lgbm``: batched embedding + safety models + the decision.

    Args:
        model_path: The model JSON file.
        registry_path: The tier registry file (costs, for the cheapest-first order).
        name: Name reported in decisions (the system policy).
        confidence: Override of the model's calibrated threshold (None: the model's).
        embedder_spec: Override of the model's embedder ('' : the model's).
        lookup: The approximate cache lookup (cache tiers and cache features); None:
            no cache (cache tiers infeasible, cache features 0).
        reload_s: Seconds between checks of the two files' modification stamps.
        threads: CPU threads of the safety models' prediction (1: best for the small
            batches of a live service on a shared CPU).

    Raises:
        ModelError: The initial model (or registry) cannot be loaded; the service then
            refuses to start.
    """

    def __init__(self, model_path: str | Path, registry_path: str | Path, name: str = "argus",
                 confidence: float | None = None, embedder_spec: str = "",
                 lookup: Lookup | None = None, reload_s: float = 5.0,
                 threads: int = 1) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self.registry_path = Path(registry_path)
        self.confidence = confidence
        self.embedder_spec = embedder_spec
        self.lookup = lookup
        self.reload_s = reload_s
        self.threads = threads
        self.reloads = 0
        self.reload_failures = 0
        self._stamps = (_stamp(self.model_path), _stamp(self.registry_path))
        self._checked = time.monotonic()
        self.loaded = self._load(None)

    def _load(self, old: _Loaded | None) -> _Loaded:
        model = load_model(self.model_path)
        try:
            registry = load_registry(self.registry_path)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
        tiers = tier_infos(registry)
        if [t.name for t in tiers] != [t.name for t in model.tiers]:
            raise ModelError(f"model {self.model_path} was trained for tiers "
                             f"{[t.name for t in model.tiers]}, registry "
                             f"{self.registry_path} has {[t.name for t in tiers]}")
        spec = self.embedder_spec or model.embedder
        if old is not None and old.embedder.name == spec:
            embedder = old.embedder
        else:
            try:
                embedder = load_feature_embedder(spec)
            except (ValueError, OSError) as exc:
                raise ModelError(f"embedder {spec!r}: {exc}") from exc
        if embedder.dim != model.dim:
            raise ModelError(f"embedder {spec!r} gives {embedder.dim} dimensions, the "
                             f"model expects {model.dim}")
        return _Loaded(model, embedder, tiers, cost_order(tiers))

    def maybe_reload(self, force: bool = False) -> bool:
        """Reload when a file changed (checked at most every ``reload_s``); True when a
        new model was swapped in. A failure is logged and the old model kept."""
        if not force and time.monotonic() - self._checked < self.reload_s:
            return False
        self._checked = time.monotonic()
        stamps = (_stamp(self.model_path), _stamp(self.registry_path))
        if stamps == self._stamps:
            return False
        self._stamps = stamps  # a bad file is retried only after it changes again
        try:
            new = self._load(self.loaded)
        except Exception as exc:  # whatever is wrong with the new files, keep serving
            self.reload_failures += 1
            log.error("classifier model reload failed, keeping the previous model: %s", exc)
            return False
        self.loaded = new
        self.reloads += 1
        log.info("classifier model reloaded from %s", self.model_path)
        return True

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """One decision per job: predicted tier and per-tier safety probabilities."""
        self.maybe_reload()
        if not jobs:
            return []
        cur = self.loaded
        prompts = [j.prompt for j in jobs]
        sims = np.full(len(jobs), np.nan)
        avail: list[tuple[int, ...]] = [() for _ in jobs]
        emb = cur.embedder.embed(prompts)
        if self.lookup is not None:
            lookup: Any = self.lookup
            # The cache's embedding space is the features' one (see make_lgbm_policy):
            # embed once.
            shared = getattr(lookup, "embedder", None) is cur.embedder
            for i, hit in enumerate(lookup(jobs, emb) if shared else lookup(jobs)):
                if hit is not None:
                    sims[i], avail[i] = hit[0], tuple(hit[1])
        steps = cur.tiers[0].steps
        best_k = np.array([max(a, default=0) / steps for a in avail], np.float32)
        x = build_features(emb, prompts, sims, best_k)
        probs = cur.model.predict_safe(x, self.threads)
        conf = cur.model.confidence if self.confidence is None else self.confidence
        tiers = choose_tiers(probs, feasibility(cur.tiers, sims, avail), cur.order, conf)
        return [Decision(int(t), [round(float(v), 6) for v in p])
                for t, p in zip(tiers, probs, strict=True)]


def _share_embedder(policy: LgbmPolicy, lookup: Lookup | None) -> None:
    """When the cache lookup's text encoder is the features' world CLIP (same directory),
    make the lookup use the features' embedder object, so ``decide`` embeds each prompt
    once and passes the result to the lookup. Other encoders keep their own."""
    from services.classifier.features import WorldClipEmbedder

    emb = policy.loaded.embedder
    source = getattr(lookup, "source", "")
    if not source or not isinstance(emb, WorldClipEmbedder) or not emb.source:
        return
    cache_dir = Path(source) / "text_encoder"
    if cache_dir.is_dir() and cache_dir.resolve() == Path(emb.source).resolve():
        lookup.embedder = emb  # type: ignore[union-attr]
        log.info("lgbm: the cache lookup shares the features' embedder (%s)", emb.source)


def make_lgbm_policy(settings: ClassifierSettings, registry: Registry, name: str
                     ) -> LgbmPolicy:
    """The ``lgbm`` predictor from the service settings; with the approximate cache's
    lookup when the registry has ``cache`` tiers (a lookup that cannot be built is
    logged: cache tiers are then never chosen). ``classifier_threads`` > 0 also sets
    torch's intra-op threads of this (classifier) process.

    Raises:
        PolicyError: The model, registry or embedder cannot be loaded.
    """
    lookup: Lookup | None = None
    if any(t.strategy is Strategy.CACHE for t in registry.tiers):
        from services.classifier.cache_lookup import build_lookup

        try:
            lookup = build_lookup(settings.redis_url, registry)
        except (ValueError, OSError) as exc:
            log.warning("lgbm: no cache lookup (%s): cache tiers will not be chosen", exc)
    try:
        policy = LgbmPolicy(settings.classifier_model, settings.tiers_file, name,
                            settings.classifier_confidence, settings.classifier_embedder,
                            lookup, settings.classifier_reload_s,
                            settings.classifier_threads)
    except ModelError as exc:
        raise PolicyError(f"predictor 'lgbm': {exc}") from exc
    _share_embedder(policy, lookup)
    torch = sys.modules.get("torch")  # loaded by a torch embedder; nothing else uses it
    if torch is not None and settings.classifier_threads > 0:
        torch.set_num_threads(settings.classifier_threads)
    return policy
