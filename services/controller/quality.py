"""Where the allocation's quality numbers come from: tier-mean quality ``q_k`` and
per-prompt quality ``Q[i][j]`` (a prompt predicted at tier ``i`` served at tier ``j``).

Sources, in order of preference (the one used is named in the plan's ``detail``):

1. ``table``: a per-prompt quality table (CSV, the profiling output, e.g.
   ``profiles/world_quality.csv``), one row per (prompt, tier[, seed]) with a score.
   Each score is made relative to the exact tier's score of the same prompt (and seed,
   when a seed column exists: tiers are compared seed for seed, then averaged). Then
   ``q_k`` is the mean of ``min(1, rel_k)`` at tier ``k`` (a tier is never better than
   exact: scores above it are seed noise; the same clip as ``Q``); a prompt's predicted tier is the
   cheapest tier whose relative quality is at least ``1 - tolerance`` (the classifier's
   label); ``Q[i][j]`` is the mean of ``min(1, rel_j)`` over prompts predicted at ``i``
   (classes with no prompts get :func:`default_prompt_quality`'s row).
2. ``registry``: every tier of the registry carries ``quality``; ``Q`` is the default
   (lossless at or below the predicted tier, ``q_j / q_i`` above).
3. ``rank-proxy``: no measured quality exists. ``q_k = 1 - 0.01 k`` is an *ordinal*
   proxy, not a measurement: it only makes the solver prefer less approximate tiers
   when capacity allows. Replace it by profiling.

Pure except :func:`load_quality`, which reads the file.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.tiers import Registry

PROMPT_COLUMNS = ("prompt_id", "prompt")
QUALITY_COLUMNS = ("quality", "score", "clip_score")
RELATIVE_COLUMNS = ("relative_quality", "rel_quality", "relative")
RANK_PROXY_STEP = 0.01


@dataclass(frozen=True)
class QualitySource:
    """Quality inputs of the solver.

    Attributes:
        q: Tier-mean relative quality per tier id (exact = 1.0).
        prompt_quality: ``Q[i][j]``, or None for the solver's default.
        source: ``"table"``, ``"registry"`` or ``"rank-proxy"``.
        detail: Where it came from (file, prompts), for the plan's detail.
    """

    q: dict[int, float]
    prompt_quality: list[list[float]] | None
    source: str
    detail: str


def _pick(header: Iterable[str], names: tuple[str, ...]) -> str | None:
    cols = set(header)
    return next((n for n in names if n in cols), None)


def relative_scores(rows: Iterable[Mapping[str, str]], n_tiers: int
                    ) -> dict[str, dict[int, float]]:
    """Per prompt, mean relative quality per tier (exact = 1.0).

    Rows need a prompt column (``prompt_id`` or ``prompt``), ``tier``, and either a
    relative column (used as is) or a score column (divided by the exact tier's score of
    the same prompt and seed; an exact score of 0 gives 1.0 when the tier scores at least
    as well, else 0.0). Rows for tiers outside ``0..n_tiers-1`` or with non-numeric
    values are skipped; prompts without any exact row are dropped (score columns only).

    Raises:
        ValueError: The header lacks a prompt, tier or quality column.
    """
    rows = list(rows)
    if not rows:
        return {}
    header = list(rows[0].keys())
    pcol = _pick(header, PROMPT_COLUMNS)
    rcol = _pick(header, RELATIVE_COLUMNS)
    qcol = _pick(header, QUALITY_COLUMNS)
    if pcol is None or "tier" not in header or (rcol is None and qcol is None):
        raise ValueError(f"quality table needs one of {PROMPT_COLUMNS}, 'tier' and one of "
                         f"{RELATIVE_COLUMNS + QUALITY_COLUMNS}; got {header}")
    scores: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in rows:
        try:
            tier = int(row["tier"])
            value = float(row[rcol or qcol or ""])
        except (TypeError, ValueError):
            continue
        if not 0 <= tier < n_tiers or not math.isfinite(value):
            continue
        scores[(row[pcol], row.get("seed", ""))][tier] = value
    per_prompt: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (prompt, _seed), by_tier in scores.items():
        if rcol is not None:
            rel = by_tier
        elif 0 in by_tier:
            base = by_tier[0]
            rel = {k: (v / base if base > 0 else float(v >= base)) for k, v in by_tier.items()}
        else:
            continue
        for k, v in rel.items():
            per_prompt[prompt][k].append(max(0.0, v))
    return {p: {k: statistics.fmean(v) for k, v in t.items()} for p, t in per_prompt.items()}


def quality_from_table(rel: Mapping[str, Mapping[int, float]], n_tiers: int,
                       tolerance: float) -> tuple[dict[int, float], list[list[float]]]:
    """``q_k`` and ``Q[i][j]`` from per-prompt relative qualities (see the module doc).

    Guarantees: ``q[0] == 1`` when every prompt has its exact score; entries of ``Q`` are
    in ``[0, 1]``; a tier no prompt was measured at gets the quality of the nearest less
    approximate measured tier (never better than measured).

    Raises:
        ValueError: ``rel`` is empty.
    """
    if not rel:
        raise ValueError("no prompt has usable quality rows")
    q: dict[int, float] = {}
    for k in range(n_tiers):
        vals = [min(1.0, t[k]) for t in rel.values() if k in t]
        q[k] = statistics.fmean(vals) if vals else (q[k - 1] if k else 1.0)
    full = {p: {k: t.get(k, q[k]) for k in range(n_tiers)} for p, t in rel.items()}
    classes: dict[int, list[dict[int, float]]] = defaultdict(list)
    for t in full.values():
        safe = [k for k in range(n_tiers) if t[k] >= 1 - tolerance]
        classes[max(safe) if safe else 0].append(t)
    out: list[list[float]] = []
    for i in range(n_tiers):
        members = classes.get(i)
        if members:
            out.append([statistics.fmean(min(1.0, m[j]) for m in members)
                        for j in range(n_tiers)])
        else:
            out.append([1.0 if j <= i else min(1.0, q[j] / q[i]) if q[i] > 0 else 0.0
                        for j in range(n_tiers)])
    return q, out


def load_quality(registry: Registry, path: Path | None, tolerance: float) -> QualitySource:
    """The best quality source available (module doc): table, registry, rank proxy.

    A table that exists but cannot be used (bad header, no usable rows) falls back to
    the next source, and ``detail`` says why.
    """
    n = len(registry.tiers)
    note = ""
    if path is not None and path.is_file():
        try:
            with path.open(newline="") as f:
                rel = relative_scores(csv.DictReader(f), n)
            q, table = quality_from_table(rel, n, tolerance)
            return QualitySource(q, table, "table", f"{path} ({len(rel)} prompts)")
        except (OSError, ValueError, KeyError) as exc:
            note = f"; {path} unusable: {exc}"
    if all(t.quality is not None for t in registry.tiers):
        q = {t.id: float(t.quality or 0.0) for t in registry.tiers}
        return QualitySource(q, None, "registry", f"registry {registry.name}{note}")
    q = {t.id: 1.0 - RANK_PROXY_STEP * t.id for t in registry.tiers}
    return QualitySource(q, None, "rank-proxy",
                         f"no measured quality: ordinal proxy 1 - {RANK_PROXY_STEP} k{note}")
