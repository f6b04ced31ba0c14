"""Training and evaluation of the LightGBM tier classifier from the per-prompt quality
table (``argus profile quality``, ``services.profile.quality.COLUMNS``).

Labels: tier k is *safe* for a prompt when its ``rel_quality`` (mean over seeds of the
per-seed CLIP score relative to the exact tier) is >= ``1 - tolerance``; the exact tier
is always safe. The label is the cheapest safe tier (``lgbm.cost_order``).

Split: by prompt *group*, by a hash, so that it is reproducible and stable while the
table grows: a group is the world's combination (``world.scenes.combination_key``) when
the world's grammar parses the prompt, else the whitespace/case-normalised text. A group
is held out when ``sha1(seed:group)`` falls below ``valid_frac``; the rest is training,
within which a second hash sets apart ``inner_frac`` for early stopping, and a third
assigns the group folds of the out-of-fold confidence calibration (:func:`train`).
Guarantee: no group (hence no prompt text) is on both sides of the held-out split, and
the held-out part is used for nothing but the report.

Report (``report.json``): on the held-out prompts, the classifier's ``accuracy`` (vs
the label), ``safe_rate`` (share whose predicted tier is safe), ``saving``
(``1 - mean cost / exact cost``) and ``saving_vs_oracle`` (``saving / oracle saving``),
the confusion matrix (rows label, columns prediction), the same for the baselines
(always exact, always cheapest, NIRVANA similarity rule, oracle), a confidence sweep,
and the same figures on the world's held-out caption combinations.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

from common.tiers import Registry, Strategy
from services.classifier.baselines import cache_tier
from services.classifier.features import (
    Embedder,
    QualityTable,
    build_features,
    labels,
    safety,
)
from services.classifier.lgbm import (
    TierInfo,
    TierModel,
    choose_tiers,
    cost_order,
    feasibility,
    tier_costs,
    tier_infos,
)
from services.worker.cache_index import choose_k, k_for_similarity

log = logging.getLogger(__name__)

SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
CALIBRATION_GRID = tuple(round(x, 3) for x in np.arange(0.2, 0.996, 0.005))


def split_mask(groups: Sequence[str], frac: float, salt: str) -> np.ndarray:
    """True for the groups whose ``sha1(salt:group)`` is in the lowest ``frac``."""
    u = [int(hashlib.sha1(f"{salt}:{g}".encode()).hexdigest()[:12], 16) / 16**12
         for g in groups]
    return np.array(u) < frac


def metrics(pred: np.ndarray, label: np.ndarray, safe: np.ndarray,
            costs: Sequence[float]) -> dict[str, Any]:
    """Accuracy, safe-rate, saving, saving vs the oracle and the confusion matrix."""
    n, k = len(pred), len(costs)
    c = np.asarray(costs)
    if n == 0:
        return {"n": 0}
    # Mean cost from the tier counts: exact sums (an all-exact policy saves exactly 0).
    saving = round(float((c[0] - np.bincount(pred, minlength=k) @ c / n) / c[0]), 6)
    oracle = round(float((c[0] - np.bincount(label, minlength=k) @ c / n) / c[0]), 6)
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (label, pred), 1)
    return {"n": n, "accuracy": round(float((pred == label).mean()), 6),
            "safe_rate": round(float(safe[np.arange(n), pred].mean()), 6),
            "saving": saving, "oracle_saving": oracle,
            "saving_vs_oracle": round(saving / oracle, 6) if oracle > 1e-9 else None,
            "mix": np.bincount(pred, minlength=k).tolist(), "confusion": conf.tolist()}


def nirvana_tiers(tiers: Sequence[TierInfo], similarity: np.ndarray) -> np.ndarray:
    """NIRVANA's similarity-only rule in tier terms (``baselines.NirvanaPolicy``), with
    every cache K stored (the profile's bank holds them all)."""
    cache = [(t.skip, t.id) for t in tiers if t.strategy == Strategy.CACHE.value]
    ks = [s for s, _ in cache]
    out = [cache_tier(choose_k(k_for_similarity(s, tiers[0].steps), ks), cache)
           if np.isfinite(s) else 0 for s in similarity]
    return np.array(out, np.int64)


def _features(table: QualityTable, idx: np.ndarray, tiers: Sequence[TierInfo],
              embedder: Embedder, batch: int = 512) -> np.ndarray:
    prompts = [table.prompts[i] for i in idx]
    emb = np.vstack([embedder.embed(prompts[b:b + batch])
                     for b in range(0, len(prompts), batch)] or
                    [np.zeros((0, embedder.dim), np.float32)])
    ks = [t.skip for t in tiers if t.strategy == Strategy.CACHE.value]
    sim = table.similarity[idx]
    best = np.where(np.isfinite(sim), max(ks, default=0) / tiers[0].steps, 0.0)
    return build_features(emb, prompts, sim, best)


def _avail(tiers: Sequence[TierInfo], sim: np.ndarray) -> list[tuple[int, ...]]:
    ks = tuple(t.skip for t in tiers if t.strategy == Strategy.CACHE.value)
    return [ks if np.isfinite(s) else () for s in sim]


@dataclass
class Params:
    """Training knobs (LightGBM settings follow environment-notes §5 for speed)."""

    tolerance: float = 0.05
    valid_frac: float = 0.2
    inner_frac: float = 0.2
    calib_folds: int = 4
    seed: int = 0
    target_safe: float = 0.96
    rounds: int = 400
    early_stopping: int = 30
    learning_rate: float = 0.1
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    threads: int = 2


def _fit(x: np.ndarray, y: np.ndarray, p: Params, rounds: int,
         valid: tuple[np.ndarray, np.ndarray] | None = None) -> lgb.Booster | float:
    """One binary safety model: ``rounds`` rounds, or up to ``p.rounds`` with early
    stopping on ``valid``; the positive rate (a constant model) when ``y`` (or the
    validation labels) hold one class only."""
    if len(np.unique(y)) < 2 or (valid is not None and len(np.unique(valid[1])) < 2):
        return float(y.mean()) if len(y) else 0.0
    params: dict[str, Any] = {
        "objective": "binary", "learning_rate": p.learning_rate, "num_leaves": p.num_leaves,
        "min_data_in_leaf": p.min_data_in_leaf, "max_bin": 63, "feature_fraction": 0.3,
        "lambda_l2": 1.0, "num_threads": p.threads, "seed": p.seed, "deterministic": True,
        "force_col_wise": True, "verbose": -1}
    data = lgb.Dataset(x, y.astype(np.float64), params={
        "max_bin": 63, "verbose": -1, "min_data_in_leaf": p.min_data_in_leaf})
    if valid is None:
        return lgb.train(params, data, num_boost_round=rounds)
    v = lgb.Dataset(valid[0], valid[1].astype(np.float64), reference=data)
    return lgb.train(params, data, num_boost_round=p.rounds, valid_sets=[v],
                     callbacks=[lgb.early_stopping(p.early_stopping, verbose=False)])


def calibrate(probs: np.ndarray, feasible: np.ndarray, safe: np.ndarray,
              order: Sequence[int], target: float) -> float:
    """The smallest confidence of the grid whose safe-rate on these prompts is >= target
    (1.0, which serves everything exactly, when none is)."""
    for c in CALIBRATION_GRID:
        pred = choose_tiers(probs, feasible, order, c)
        if safe[np.arange(len(pred)), pred].mean() >= target:
            return float(c)
    return 1.0


def _predict(m: lgb.Booster | float, x: np.ndarray) -> np.ndarray:
    return np.full(len(x), m) if isinstance(m, float) else np.asarray(m.predict(x))


def train(table: QualityTable, registry: Registry, embedder: Embedder,
          params: Params) -> tuple[TierModel, dict[str, Any]]:
    """Train the safety models on the training groups; return the model and its report.

    Three stages, all on training groups only: (1) per tier, early stopping on the
    ``inner_frac`` split finds the number of rounds; (2) with ``calib_folds`` >= 2,
    out-of-fold predictions over group folds of all training prompts (those rounds)
    calibrate ``confidence`` (else the early-stopping split does); (3) the final models
    are fit on all training prompts with those rounds (with ``calib_folds`` < 2: the
    early-stopped models of stage 1).

    Raises:
        ValueError: Too few training prompts.
    """
    t0 = time.perf_counter()
    tiers = tier_infos(registry)
    order = cost_order(tiers)
    held = split_mask(table.groups, params.valid_frac, f"{params.seed}")
    idx = np.flatnonzero(~held)
    groups = [table.groups[i] for i in idx]
    inner = split_mask(groups, params.inner_frac, f"{params.seed}:inner")
    if (~inner).sum() < 10 or inner.sum() < 2:
        raise ValueError(f"too few prompts to train on ({(~inner).sum()} fit, "
                         f"{inner.sum()} early-stopping)")
    safe = safety(table.rel[idx], params.tolerance)
    ok = np.isfinite(table.rel[idx])  # a cache tier learns only where it could serve
    x = _features(table, idx, tiers, embedder)
    sim = table.similarity[idx]
    feas = feasibility(tiers, sim, _avail(tiers, sim))
    stage1: dict[int, lgb.Booster | float] = {}
    for k in range(1, len(tiers)):
        f, v = ~inner & ok[:, k], inner & ok[:, k]
        stage1[k] = _fit(x[f], safe[f, k], params, 0, (x[v], safe[v, k]))
    rounds = {k: int(m.best_iteration or m.current_iteration())
              for k, m in stage1.items() if not isinstance(m, float)}
    probs = np.ones((len(idx), len(tiers)))
    if params.calib_folds >= 2:
        fold = (np.array([int(hashlib.sha1(f"{params.seed}:fold:{g}".encode())
                              .hexdigest()[:12], 16) for g in groups]) % params.calib_folds)
        for i in range(params.calib_folds):
            tr, te = fold != i, fold == i
            for k in range(1, len(tiers)):
                m = stage1[k] if k not in rounds else _fit(
                    x[tr & ok[:, k]], safe[tr & ok[:, k], k], params, rounds[k])
                probs[te, k] = _predict(m, x[te])
        calib = np.ones(len(idx), bool)
        final = {k: _fit(x[ok[:, k]], safe[ok[:, k], k], params, rounds[k])
                 if k in rounds else stage1[k] for k in stage1}
    else:
        calib = inner
        final = stage1
        for k, m in final.items():
            probs[:, k] = _predict(m, x)
    model = TierModel(tiers, embedder.name, embedder.dim,
                      {k: m for k, m in final.items() if not isinstance(m, float)},
                      {k: m for k, m in final.items() if isinstance(m, float)},
                      params.tolerance, 1.0)
    model.confidence = calibrate(probs[calib], feas[calib], safe[calib], order,
                                 params.target_safe)
    _, source = tier_costs(registry)
    model.extra = {"split": {"seed": params.seed, "valid_frac": params.valid_frac},
                   "registry": registry.name, "cost_source": source,
                   "target_safe": params.target_safe, "calib_folds": params.calib_folds,
                   "rounds": {str(k): r for k, r in rounds.items()},
                   "n_train": len(idx), "n_early_stopping": int(inner.sum()),
                   "n_calibration": int(calib.sum()),
                   "train_s": round(time.perf_counter() - t0, 2)}
    return model, evaluate(model, table, registry, embedder)


def evaluate(model: TierModel, table: QualityTable, registry: Registry,
             embedder: Embedder) -> dict[str, Any]:
    """The report (module docstring) of ``model`` on the held-out groups of ``table``,
    with the split stored in the model."""
    sp = model.extra.get("split", {})
    held = split_mask(table.groups, float(sp.get("valid_frac", 0.2)), f"{sp.get('seed', 0)}")
    idx = np.flatnonzero(held)
    tiers = tier_infos(registry)
    order = cost_order(tiers)
    costs, source = tier_costs(registry)
    safe = safety(table.rel[idx], model.tolerance)
    sim = table.similarity[idx]
    feas = feasibility(tiers, sim, _avail(tiers, sim))
    label = labels(safe, feas, order)
    probs = model.predict_safe(_features(table, idx, tiers, embedder))
    pred = choose_tiers(probs, feas, order, model.confidence)
    cheapest = labels(np.ones_like(safe), feas, order)
    base = {"always_exact": np.zeros(len(idx), np.int64), "always_cheapest": cheapest,
            "nirvana": nirvana_tiers(tiers, sim), "oracle": label}
    combo = table.heldout_combo[idx]

    def block(mask: np.ndarray) -> dict[str, Any]:
        out = metrics(pred[mask], label[mask], safe[mask], costs)
        out["baselines"] = {n: metrics(b[mask], label[mask], safe[mask], costs)
                            for n, b in base.items()}
        return out

    report = block(np.ones(len(idx), bool))
    report.update({
        "confidence": model.confidence, "tolerance": model.tolerance,
        "cost_source": source, "costs": costs, "order": order,
        "tiers": [t.name for t in tiers], "embedder": model.embedder,
        "split": {**sp, "prompts": len(table.prompts), "heldout": len(idx),
                  "train": model.extra.get("n_train")},
        "label_mix_heldout": np.bincount(label, minlength=len(tiers)).tolist(),
        "safe_share_heldout": safe.mean(axis=0).round(4).tolist(),
        "sweep": [{"confidence": c, **{k: v for k, v in metrics(
            choose_tiers(probs, feas, order, c), label, safe, costs).items()
            if k in ("safe_rate", "saving", "saving_vs_oracle", "accuracy")}}
            for c in sorted({*SWEEP, model.confidence})],
        "heldout_combinations": block(combo) if combo.any() else None,
        "train": {k: v for k, v in model.extra.items() if k != "split"},
    })
    return report


def compare_multiclass(table: QualityTable, registry: Registry, embedder: Embedder,
                       params: Params) -> dict[str, Any]:
    """The design alternative, for the report: one multiclass LightGBM on the label (the
    cheapest safe tier), argmax decision (infeasible tiers masked), same features, the
    same split, early stopping on the same split; metrics on the same held-out prompts."""
    tiers = tier_infos(registry)
    order = cost_order(tiers)
    costs, _ = tier_costs(registry)
    held = split_mask(table.groups, params.valid_frac, f"{params.seed}")
    idx_tr, idx_te = np.flatnonzero(~held), np.flatnonzero(held)
    inner = split_mask([table.groups[i] for i in idx_tr], params.inner_frac,
                       f"{params.seed}:inner")
    out: dict[str, np.ndarray] = {}
    for name, ix in (("tr", idx_tr), ("te", idx_te)):
        sim = table.similarity[ix]
        out[name + "_feas"] = feasibility(tiers, sim, _avail(tiers, sim))
        out[name + "_safe"] = safety(table.rel[ix], params.tolerance)
        out[name + "_y"] = labels(out[name + "_safe"], out[name + "_feas"], order)
        out[name + "_x"] = _features(table, ix, tiers, embedder)
    k = len(tiers)
    p: dict[str, Any] = {
        "objective": "multiclass", "num_class": k, "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves, "min_data_in_leaf": params.min_data_in_leaf,
        "max_bin": 63, "feature_fraction": 0.3, "lambda_l2": 1.0,
        "num_threads": params.threads, "seed": params.seed, "deterministic": True,
        "force_col_wise": True, "verbose": -1}
    x, y = out["tr_x"], out["tr_y"]
    data = lgb.Dataset(x[~inner], y[~inner], params={"max_bin": 63, "verbose": -1})
    valid = lgb.Dataset(x[inner], y[inner], reference=data)
    t0 = time.perf_counter()
    booster = lgb.train(p, data, num_boost_round=params.rounds, valid_sets=[valid],
                        callbacks=[lgb.early_stopping(params.early_stopping, verbose=False)])
    prob = np.asarray(booster.predict(out["te_x"])) * out["te_feas"]
    res = metrics(prob.argmax(axis=1), out["te_y"], out["te_safe"], costs)
    res.update({"rounds": booster.best_iteration, "train_s": round(time.perf_counter() - t0, 2)})
    return res
