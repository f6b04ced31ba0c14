"""Summaries of the quality and latency profiles (the tables of ``docs/tiers.md``).

Per tier: mean relative quality (CLIP, per seed vs exact, averaged), the share of prompts
within 5 % of exact (``rel_quality >= 0.95``), mean checker score and its mean change
vs exact, latency per image at batch 1 and at the largest batch, speed-up vs exact,
and for cache tiers the realised share of the theoretical saving at batch 1,
``(t_exact - t_tier) / (t_exact * K / N)``. The seed noise floor (the exact tier
re-run with other seeds) is summarised with the same statistics.

:func:`seed_consistency` says how much of a per-prompt label is the prompt and how much
is the seed: with two or more seeds per prompt, it compares each tier's paired loss on
one half of the seeds with the other half.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.tiers import Registry, Strategy

WITHIN = 0.95


def _floats(rows: list[dict[str, str]], col: str) -> np.ndarray:
    return np.array([float(r[col]) if r.get(col) not in (None, "") else np.nan
                     for r in rows], np.float64)


def _stats(rows: list[dict[str, str]]) -> dict[str, float]:
    rel = _floats(rows, "rel_quality")
    return {"n": float(len(rows)), "rel_quality": float(np.nanmean(rel)),
            "within_5pct": float(np.nanmean(rel >= WITHIN)),
            "checker_delta": float(np.nanmean(_floats(rows, "checker_delta")))}


def _per_seed(r: dict[str, str], col: str = "clip_per_seed") -> np.ndarray:
    """A row's per-seed scores (``;``-separated in ``col``), in seed order."""
    return np.array([float(x) for x in (r.get(col) or "").split(";") if x], np.float64)


def _ref_clip(exact: dict[str, np.ndarray]) -> float:
    """The reference C of ``rel_quality``: the mean exact CLIP score over every seed of
    every prompt, at least 1 (1 when there are no scores)."""
    scores = np.concatenate(list(exact.values()))
    return max(1.0, float(scores.mean())) if scores.size else 1.0


def seed_consistency(rows: list[dict[str, str]], tolerance: float = 1 - WITHIN
                     ) -> dict[str, dict[str, float]]:
    """Split-half consistency of each approximate tier's per-prompt quality loss.

    For every prompt with at least two seeds in both its exact row and the tier's row,
    the paired loss of seed ``s`` is ``(clip_tier(s) - clip_exact(s)) / C`` (``C`` = the
    mean exact CLIP score, as in ``rel_quality``); the even seeds' mean is one half, the
    odd seeds' the other. Per tier (keyed by name): ``prompts``, ``seeds`` (fewest per
    prompt), ``half_corr`` (Pearson correlation of the two halves over prompts: the
    share of the between-prompt variation that repeats with new noise; 0 = the loss is
    all seed noise, 1 = all prompt), ``reliability`` (Spearman-Brown: the expected
    correlation of the all-seeds mean with a repeat of it, ``2r / (1 + r)``) and
    ``safe_agreement`` (share of prompts whose verdict ``loss >= -tolerance`` is the
    same in both halves). Tiers with fewer than 3 such prompts are left out.
    """
    exact = {r["prompt"]: _per_seed(r) for r in rows if r["tier"] == "0"}
    if not exact:
        return {}
    c = _ref_clip(exact)
    halves: dict[str, list[tuple[float, float, int]]] = {}
    for r in rows:
        e = exact.get(r["prompt"])
        if r["tier"] == "0" or e is None:
            continue
        q = _per_seed(r)
        n = min(len(q), len(e))
        if n < 2:
            continue
        d = (q[:n] - e[:n]) / c
        halves.setdefault(r.get("tier_name") or r["tier"], []).append(
            (float(d[0::2].mean()), float(d[1::2].mean()), n))
    out: dict[str, dict[str, float]] = {}
    for name, v in halves.items():
        if len(v) < 3:
            continue
        a = np.array([x[0] for x in v])
        b = np.array([x[1] for x in v])
        r_half = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        out[name] = {"prompts": float(len(v)), "seeds": float(min(x[2] for x in v)),
                     "half_corr": r_half,
                     "reliability": 2 * r_half / (1 + r_half) if r_half > -1 else 0.0,
                     "safe_agreement": float(np.mean((a >= -tolerance) == (b >= -tolerance)))}
    return out


def summarize(registry: Registry, quality_csv: Path, floor_csv: Path | None,
              device: str) -> dict[str, Any]:
    """Per-tier summary rows and the noise floor (JSON-ready)."""
    with quality_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    exact_t1 = registry.tiers[0].batch_latency(device, 1)
    exact_big = registry.tiers[0].batch_latency(device, registry.tiers[0].max_batch)
    tiers = []
    for t in registry.tiers:
        mine = [r for r in rows if r["tier"] == str(t.id)]
        st: dict[str, Any] = dict(_stats(mine)) if mine else {"n": 0.0}
        st["checker_mean"] = float(np.nanmean(_floats(mine, "checker_mean"))) if mine else 0
        st["clip_mean"] = float(np.nanmean(_floats(mine, "clip_mean"))) if mine else 0
        t1 = t.batch_latency(device, 1)
        tb = t.batch_latency(device, t.max_batch)
        st.update(id=t.id, name=t.name, strategy=t.strategy.value, unet_steps=t.unet_steps,
                  s_per_image_b1=t1, s_per_image_bmax=tb / t.max_batch if tb else None,
                  bmax=t.max_batch)
        st["speedup_b1"] = exact_t1 / t1 if exact_t1 and t1 else None
        st["speedup_bmax"] = (exact_big / registry.tiers[0].max_batch) / (tb / t.max_batch) \
            if exact_big and tb else None
        if t.strategy is Strategy.CACHE and exact_t1 and t1:
            st["skip_saving_realised"] = (exact_t1 - t1) / (exact_t1 * t.skip / t.steps)
            sims = _floats(mine, "neighbor_similarity")
            st["neighbor_similarity"] = float(np.nanmean(sims)) if mine else None
        tiers.append(st)
    by_cat: dict[str, dict[str, tuple[float, float]]] = {}
    for t in registry.tiers:
        groups: dict[str, list[float]] = {}
        for r in rows:
            if r["tier"] == str(t.id) and r.get("category") and r.get("rel_quality"):
                groups.setdefault(r["category"], []).append(float(r["rel_quality"]))
        by_cat[f"{t.id} {t.name}"] = {c: (float(np.mean(v)), float(np.mean(np.array(v) >=
                                                                          WITHIN)))
                                      for c, v in groups.items()}
    out: dict[str, Any] = {"device": device, "prompts": len({r["prompt"] for r in rows}),
                           "tiers": tiers, "by_category": by_cat}
    if floor_csv is not None and floor_csv.exists():
        with floor_csv.open(newline="") as f:
            out["noise_floor"] = _stats(list(csv.DictReader(f)))
    consistency = seed_consistency(rows)
    if consistency:
        out["seed_consistency"] = consistency
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table."""
    def f(x: Any, spec: str) -> str:
        return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) \
            else format(x, spec)

    lines = [
        f"Device profile `{summary['device']}`; {summary['prompts']} prompts.",
        "",
        "| tier | strategy | UNet steps | rel. quality | within 5 % | checker | Δ checker "
        "| s/image b=1 | s/image b=max | speed-up b=1 | speed-up b=max | skip saving |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary["tiers"]:
        lines.append(
            f"| {t['id']} {t['name']} | {t['strategy']} | {t['unet_steps']} | "
            f"{f(t.get('rel_quality'), '.3f')} | {f(t.get('within_5pct'), '.1%')} | "
            f"{f(t.get('checker_mean'), '.3f')} | {f(t.get('checker_delta'), '+.3f')} | "
            f"{f(t['s_per_image_b1'], '.4f')} | {f(t['s_per_image_bmax'], '.4f')} "
            f"(b={t['bmax']}) | {f(t['speedup_b1'], '.2f')} | {f(t['speedup_bmax'], '.2f')} "
            f"| {f(t.get('skip_saving_realised'), '.0%')} |")
    cats = summary.get("by_category") or {}
    if cats:
        names = sorted({c for per in cats.values() for c in per})
        lines += ["", "Mean relative quality by category (within 5 % in brackets):", "",
                  "| tier | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for tier, per in cats.items():
            cells = [f"{per[c][0]:.3f} ({per[c][1]:.0%})" if c in per else "–"
                     for c in names]
            lines.append(f"| {tier} | " + " | ".join(cells) + " |")
    nf = summary.get("noise_floor")
    if nf:
        lines += ["", f"Seed noise floor (exact re-run with other seeds, {int(nf['n'])} "
                  f"prompts): rel. quality {nf['rel_quality']:.3f}, within 5 % "
                  f"{nf['within_5pct']:.1%}, Δ checker {nf['checker_delta']:+.3f}."]
    sc = summary.get("seed_consistency")
    if sc:
        lines += ["", "Seed consistency of the per-prompt loss (even vs odd seeds; "
                  "`seed_consistency` in services/profile/report.py):", "",
                  "| tier | prompts | seeds | half correlation | reliability of the mean "
                  "| same verdict at 5 % |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {int(v['prompts'])} | {int(v['seeds'])} | {v['half_corr']:.3f} "
                  f"| {v['reliability']:.3f} | {v['safe_agreement']:.1%} |"
                  for n, v in sc.items()]
    return "\n".join(lines) + "\n"


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _seed_offset(part: Path) -> int | None:
    """The seed offset a shard CSV was run with (its ``.meta.json``), None if unknown."""
    meta = part.with_name(part.name + ".meta.json")
    try:
        return int(json.loads(meta.read_text())["seed_offset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _combine(first: dict[str, str], more: dict[str, str]) -> None:
    """Append ``more``'s seeds to ``first`` (same prompt and tier, disjoint seeds) and
    recompute its per-seed statistics (``checker_delta`` is recomputed by ``merge``)."""
    for col in ("clip_per_seed", "checker_per_seed"):
        first[col] = f"{first[col]};{more[col]}"
    clip, chk = _per_seed(first), _per_seed(first, "checker_per_seed")
    first["seeds"] = str(len(clip))
    first["clip_mean"], first["clip_std"] = f"{clip.mean():.4f}", f"{clip.std():.4f}"
    first["checker_mean"], first["checker_std"] = f"{chk.mean():.4f}", f"{chk.std():.4f}"


def merge(parts: list[Path], out: Path, floor_parts: list[Path], floor_out: Path | None
          ) -> float:
    """Merge shard CSVs into ``out`` (and floors into ``floor_out``), renormalising every
    relative quality with one reference C = the mean exact CLIP score over all merged
    prompts (written to ``<out>.meta.json``); returns C.

    Tier rows are recomputed from ``clip_per_seed`` (exactly the per-seed definition);
    floor rows from their per-prompt means (``1 + (reseed - exact) / C``, the same
    quantity before the clamp at 0). Parts run with different ``--seed-offset`` (read
    from each part's ``.meta.json``) hold disjoint seeds: their rows of one (prompt, tier)
    are combined into one row over all those seeds, in part order, so seed j of every
    tier of a prompt is the same noise and ``checker_delta`` stays paired. Otherwise
    (same or unknown offset) duplicate (prompt, tier) rows keep the first; duplicate
    floor rows of a prompt keep the first.

    Raises:
        ValueError: No exact-tier rows in the parts.
    """
    from services.profile.quality import COLUMNS, FLOOR_COLUMNS, write_rows

    rows: list[dict[str, str]] = []
    index: dict[tuple[str, str], tuple[dict[str, str], set[int | None]]] = {}
    for part in parts:
        offset = _seed_offset(part)
        for r in _read(part):
            key = (r["prompt"], r["tier"])
            if key not in index:
                index[key] = (r, {offset})
                rows.append(r)
            elif offset is not None and offset not in index[key][1] \
                    and None not in index[key][1]:
                _combine(index[key][0], r)
                index[key][1].add(offset)
    exact = {r["prompt"]: _per_seed(r) for r in rows if r["tier"] == "0"}
    if not exact:
        raise ValueError("no exact-tier rows to normalise by")
    c = _ref_clip(exact)
    exact_chk = {r["prompt"]: _per_seed(r, "checker_per_seed") for r in rows if r["tier"] == "0"}
    for r in rows:
        rel = np.maximum(0.0, 1.0 + (_per_seed(r) - exact[r["prompt"]]) / c)
        r["rel_quality"], r["rel_quality_std"] = f"{rel.mean():.4f}", f"{rel.std():.4f}"
        chk = _per_seed(r, "checker_per_seed")
        if len(chk) == len(exact_chk[r["prompt"]]):
            r["checker_delta"] = f"{(chk - exact_chk[r['prompt']]).mean():.4f}"
    out.unlink(missing_ok=True)
    write_rows(out, COLUMNS, rows, mode="w")
    if floor_out is not None:
        floor: list[dict[str, str]] = []
        floor_seen: set[str] = set()
        for r in (r for part in floor_parts if part.exists() for r in _read(part)):
            if r["prompt"] not in floor_seen:
                floor_seen.add(r["prompt"])
                floor.append(r)
        for r in floor:
            r["rel_quality"] = f"{1 + (float(r['clip_reseed']) - float(r['clip_exact'])) / c:.4f}"
        write_rows(floor_out, FLOOR_COLUMNS, floor, mode="w")
    out.with_name(out.name + ".meta.json").write_text(json.dumps(
        {"ref_clip": c, "prompts": len(exact), "merged_from": [str(p) for p in parts]}))
    return c
