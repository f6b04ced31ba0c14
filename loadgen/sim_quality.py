"""Per-prompt inputs of ``loadgen simulate``: the quality of a prompt served at a tier,
the classifier's decision for a prompt, and NIRVANA's cache lookup.

Quality (:func:`quality_model`). The per-prompt quality table (``profiles/
world_quality.csv``, ``argus profile quality``) gives, per prompt and *table* tier, the
relative quality (exact = 1), read with the controller's own reader
(:func:`services.controller.quality.relative_scores`). A registry tier reads the table
column named by its ``quality_standin`` (``"<registry>:<tier name>"``, e.g. each SDXL
tier names the small-world tier of the same approximation fraction), else the column of
its own name; a tier whose name is not in the table has no per-prompt quality.
Guarantees: the quality of (prompt, tier) is the table value clipped to ``[0, 1]`` when
the prompt and the tier's column are in the table, else the tier's mean quality: the
registry's ``quality`` when set, else the mean clipped table value of the tier's column,
else the controller's planning quality ``q_k`` (:func:`services.controller.quality.
load_quality`), clipped to ``[0, 1]``. Clipping: relative quality above 1 is seed noise
(an approximation is not better than the exact generation), as the controller's ``Q``.

Decisions. Predictors follow the classifier's ``Policy`` protocol
(:mod:`services.classifier.policies`) so the real system policies wrap them:

- ``table``: the oracle label of the classifier's training (:func:`services.classifier.
  features.labels`): the cheapest feasible tier whose relative quality is ``>= 1 -
  classifier_tolerance``, cheapest by :func:`services.classifier.lgbm.cost_order`; a
  ``cache`` tier is feasible when the prompt has a cached neighbour in the table (the
  profile's cache bank stands for a warm cache). Prompts not in the table: exact.
- ``lgbm``: the trained model (:class:`services.classifier.lgbm.LgbmPolicy`) on the world
  registry, its tier mapped back through the stand-ins (no counterpart: exact).
- ``fixed``: ``T2I_FIXED_TIER`` (:class:`services.classifier.policies.FixedPolicy`).

:class:`PerPrompt` memoises a policy whose decision depends on the prompt only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.messages import PromptJob
from common.settings import DEFAULT_TIERS_FILE, ClassifierSettings
from common.tiers import Registry, Strategy, Tier, load_registry
from services.classifier.baselines import CascadePolicy, Lookup, Neighbour
from services.classifier.policies import Decision, Policy, make_policy
from services.controller.quality import load_quality, relative_scores

PREDICTORS = ("table", "lgbm", "fixed")
"""Per-prompt predictors of the simulated classifier."""


@dataclass(frozen=True)
class QualityModel:
    """What the simulator knows about each distinct prompt of the workload.

    Attributes:
        prompts: Distinct prompts, in first-use order.
        quality: ``P x K`` quality served at each tier, in ``[0, 1]`` (module doc).
        unclipped: ``P x K`` the same without clipping table values at 1.
        rel: ``P x K`` table relative quality, unclipped (NaN: not in the table).
        in_table: ``P`` bool, the prompt has rows in the quality table.
        similarity: ``P`` top-1 cache-neighbour similarity from the table (NaN: none).
        columns: Table tier name read by each registry tier (None: none in the table).
        tier_mean: Mean quality per tier (the fallback of the module doc).
        source: Where the numbers come from, for the summary.
    """

    prompts: list[str]
    quality: np.ndarray
    unclipped: np.ndarray
    rel: np.ndarray
    in_table: np.ndarray
    similarity: np.ndarray
    columns: list[str | None]
    tier_mean: list[float]
    source: str


@dataclass(frozen=True)
class Table:
    """A per-prompt quality table: relative quality by prompt and table tier name, and
    each prompt's top-1 cache-neighbour similarity."""

    rel: dict[str, dict[str, float]]
    similarity: dict[str, float]
    path: str


def read_table(path: Path) -> Table | None:
    """The table at ``path``, or None when the file does not exist.

    Raises:
        ValueError: The file lacks a prompt, tier or quality column.
    """
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    names: dict[int, str] = {}
    similarity: dict[str, float] = {}
    for r in rows:
        try:
            tier = int(r.get("tier") or "")
        except ValueError:
            continue
        names.setdefault(tier, r.get("tier_name") or str(tier))
        try:
            s = float(r.get("neighbor_similarity") or "nan")
        except ValueError:
            s = math.nan
        if math.isfinite(s):
            similarity[r.get("prompt") or r.get("prompt_id") or ""] = s
    rel = relative_scores(rows, max(names, default=-1) + 1)
    by_name = {p: {names[k]: v for k, v in t.items()} for p, t in rel.items()}
    return Table(by_name, similarity, str(path))


def table_column(tier: Tier) -> str:
    """The table tier name whose per-prompt quality stands in for ``tier``."""
    return tier.quality_standin.split(":", 1)[-1] if tier.quality_standin else tier.name


def quality_model(registry: Registry, prompts: Sequence[str], table: Table | None,
                  planning_q: dict[int, float]) -> QualityModel:
    """Per-prompt quality of every tier for ``prompts`` (module doc)."""
    n = len(registry.tiers)
    present = set().union(*(t.keys() for t in table.rel.values())) if table else set()
    columns = [c if c in present else None for c in map(table_column, registry.tiers)]
    rel = np.full((len(prompts), n), np.nan)
    means: list[float] = []
    for k, (tier, col) in enumerate(zip(registry.tiers, columns, strict=True)):
        vals = [min(1.0, max(0.0, t[col])) for t in table.rel.values() if col in t] \
            if table and col else []
        if tier.quality is not None:
            means.append(min(1.0, tier.quality))
        elif vals:
            means.append(float(np.mean(vals)))
        else:
            means.append(min(1.0, max(0.0, planning_q.get(k, 1.0))))
        if table and col:
            rel[:, k] = [table.rel.get(p, {}).get(col, np.nan) for p in prompts]
    quality = np.where(np.isnan(rel), np.asarray(means)[None, :], np.clip(rel, 0.0, 1.0))
    unclipped = np.where(np.isnan(rel), np.asarray(means)[None, :], np.maximum(rel, 0.0))
    in_table = np.array([bool(table and p in table.rel) for p in prompts], bool)
    sim = np.array([table.similarity.get(p, np.nan) if table else np.nan for p in prompts])
    source = (f"table {table.path} ({int(in_table.sum())} of {len(prompts)} prompts)"
              if table else "tier means (no quality table)")
    return QualityModel(list(prompts), quality, unclipped, rel, in_table, sim, columns,
                        means, source)


def load_quality_model(registry: Registry, prompts: Sequence[str], path: Path,
                       tolerance: float) -> QualityModel:
    """:func:`quality_model` with the table at ``path`` and the controller's ``q_k``."""
    planning = load_quality(registry, path, tolerance)
    return quality_model(registry, prompts, read_table(path), planning.q)


class PerPrompt:
    """Memoises ``policy``, whose decision must depend on the job's prompt only."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.memo: dict[str, Decision] = {}

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """The memoised decisions; the jobs of prompts not seen yet are decided in one
        call of the wrapped policy."""
        new: dict[str, PromptJob] = {}
        for j in jobs:
            if j.prompt not in self.memo:
                new.setdefault(j.prompt, j)
        if new:
            for p, d in zip(new, self.policy.decide(list(new.values())), strict=True):
                self.memo[p] = d
        return [self.memo[j.prompt] for j in jobs]


class TablePredictor:
    """The ``table`` predictor (module doc)."""

    def __init__(self, model: QualityModel, registry: Registry, tolerance: float,
                 name: str) -> None:
        from services.classifier.features import labels, safety
        from services.classifier.lgbm import cost_order, feasibility, tier_infos

        self.name = name
        infos = tier_infos(registry)
        skips = tuple(t.skip for t in registry.tiers if t.strategy is Strategy.CACHE)
        safe = safety(model.rel, tolerance)
        feasible = feasibility(infos, model.similarity, [skips] * len(model.prompts))
        tiers = labels(safe, feasible, cost_order(infos))
        self.decisions: dict[str, Decision] = {}
        exact = [1.0] + [0.0] * (len(infos) - 1)
        for i, p in enumerate(model.prompts):
            if model.in_table[i]:
                probs = [1.0 if s else 0.0 for s in safe[i]]
                self.decisions[p] = Decision(int(tiers[i]), probs)
            else:
                self.decisions[p] = Decision(0, list(exact))
        self.exact = Decision(0, exact)

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """The oracle's decision of each job's prompt (exact for unknown prompts)."""
        return [self.decisions.get(j.prompt, self.exact) for j in jobs]


def table_lookup(model: QualityModel, skips: Sequence[int]) -> Lookup:
    """A cache lookup answering, for a prompt of the table with a neighbour, its
    similarity with every K in ``skips`` stored; None (a miss) otherwise."""
    index = {p: i for i, p in enumerate(model.prompts)}
    ks = tuple(skips)

    def lookup(jobs: list[PromptJob]) -> list[Neighbour | None]:
        out: list[Neighbour | None] = []
        for j in jobs:
            i = index.get(j.prompt)
            s = model.similarity[i] if i is not None else math.nan
            out.append((float(s), ks) if math.isfinite(s) else None)
        return out

    return lookup


class MappedLgbm:
    """The trained ``lgbm`` predictor on the world registry, its decisions mapped to the
    simulated registry through the stand-ins (module doc)."""

    def __init__(self, model: QualityModel, registry: Registry,
                 settings: ClassifierSettings, name: str) -> None:
        from services.classifier.lgbm import LgbmPolicy, ModelError

        world = load_registry(DEFAULT_TIERS_FILE)
        skips = [t.skip for t in world.tiers if t.strategy is Strategy.CACHE]
        try:
            self.inner = LgbmPolicy(settings.classifier_model, DEFAULT_TIERS_FILE, name,
                                    settings.classifier_confidence,
                                    settings.classifier_embedder,
                                    table_lookup(model, skips), reload_s=1e9, threads=1)
        except ModelError as exc:
            raise ValueError(f"predictor 'lgbm': {exc}") from exc
        self.name = name
        names = [t.name for t in world.tiers]
        self.to_sim: dict[int, int] = {}
        for k, col in reversed(list(enumerate(map(table_column, registry.tiers)))):
            if col in names:
                self.to_sim[names.index(col)] = k
        self.column = [names.index(c) if c in names else None
                       for c in map(table_column, registry.tiers)]

    def decide(self, jobs: list[PromptJob]) -> list[Decision]:
        """The model's decisions, in the simulated registry's tiers."""
        out = []
        for d in self.inner.decide(jobs):
            probs = [1.0 if c == 0 else d.probabilities[c] if c is not None else 0.0
                     for c in self.column]
            out.append(Decision(self.to_sim.get(d.predicted_tier, 0), probs))
        return out


def classifier_policy(name: str, predictor: str, registry: Registry, model: QualityModel,
                      settings: ClassifierSettings) -> Policy:
    """The classifier side of system policy ``name`` with the simulator's predictor.

    Policies that use no predictor (static, clipper-*, nirvana) and the ``fixed``
    predictor come from :func:`services.classifier.policies.make_policy` (NIRVANA with
    :func:`table_lookup`); ``argus``/``proteus`` use the predictor itself, ``diffserve``
    the real :class:`~services.classifier.baselines.CascadePolicy` over it. Every policy
    except the cascade (whose draws depend on history) is memoised per prompt.

    Raises:
        ValueError: Unknown predictor, or one that cannot be loaded.
        services.classifier.policies.PolicyError: Unknown policy.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of "
                         f"{', '.join(PREDICTORS)}")
    if name not in ("argus", "proteus", "diffserve") or predictor == "fixed":
        skips = [t.skip for t in registry.tiers if t.strategy is Strategy.CACHE]
        real = settings.model_copy(update={"policy": name, "predictor": "fixed"})
        policy = make_policy(real, registry, table_lookup(model, skips))
        return policy if isinstance(policy, CascadePolicy) else PerPrompt(policy)
    inner: Policy
    if predictor == "table":
        inner = TablePredictor(model, registry, settings.classifier_tolerance, name)
    else:
        inner = PerPrompt(MappedLgbm(model, registry, settings, name))
    if name == "diffserve":
        return CascadePolicy(inner, len(registry.tiers), settings.cascade_window)
    return inner


def world_heldout_prompts(in_table: set[str] | None) -> list[str]:
    """The small world's distinct held-out captions (canonical, every category), only
    those in the quality table when the table has any of them.

    Raises:
        ValueError: The ``world`` package is unavailable.
    """
    try:
        from world import scenes
    except ImportError as exc:
        raise ValueError(f"default prompts need the small world (world.scenes): {exc}") from exc
    captions = list(dict.fromkeys(scenes.canonical_caption(m) for c in scenes.CATEGORIES
                                  for m in scenes.heldout_combinations(c)))
    covered = [c for c in captions if in_table and c in in_table]
    return covered or captions
