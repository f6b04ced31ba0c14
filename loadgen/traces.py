"""Arrival traces: read them, scale them while keeping their shape, cut them, count them.

A :class:`Trace` is a sorted array of arrival offsets in seconds from the replay start,
with optional prompt ids. Every function here is pure: it returns a new trace and never
mutates its input; the randomised ones take a seed and are deterministic given it.

Formats (chosen by the header, see :func:`load_trace`):

* Azure LLM inference trace CSV, header ``TIMESTAMP,ContextTokens,GeneratedTokens`` and
  timestamps like ``2023-11-16 18:17:03.9799600``: offsets from the first request, sorted.
  The token columns are ignored.
* Generic CSV, header ``arrival_s[,prompt_id]``: offsets as given (sorted, stable);
  ``prompt_id`` is a non-negative integer index into the prompt set (wrapping).

Errors name the file and line (:class:`TraceError`).

Shape under scaling. :func:`time_scale` multiplies every offset, so the inter-arrival
coefficient of variation (CV) and the per-minute profile (stretched) are exactly kept.
:func:`rate_scale` keeps the per-minute profile (counts times the factor; correlation
with the original ~1.0 on the Azure traces). The inter-arrival CV is kept within a few
percent when replicating (factor > 1), but *not* when thinning: independent thinning with
keep-probability ``p`` gives ``CV² ≈ p·CV₀² + (1 − p)``, a law of any point process, so a
bursty trace (Azure code: CV 13.2, dominated by 2–4 minute silences that thinning cannot
shorten) becomes less bursty per request. This is measured and tested, not hidden.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.tiers import Registry
from loadgen.paths import resolve_data_path

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

AZURE_HEADER = "TIMESTAMP"
GENERIC_COLUMNS = ("arrival_s", "prompt_id")
DEFAULT_JITTER = 0.1


class TraceError(ValueError):
    """A trace file is missing, malformed, or a scaling argument is invalid."""


@dataclass(frozen=True, eq=False)
class Trace:
    """Arrival offsets (seconds, sorted, >= 0) and optional per-arrival prompt ids.

    Attributes:
        arrivals: float64 offsets from the replay start, non-decreasing.
        prompt_ids: int64 prompt indices aligned with ``arrivals``, or None.
        source: where the trace came from (a path, plus the transformations applied).
    """

    arrivals: Floats
    prompt_ids: Ints | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.arrivals.ndim != 1:
            raise TraceError("arrivals must be one-dimensional")
        if self.arrivals.size and (self.arrivals[0] < 0 or np.any(np.diff(self.arrivals) < 0)):
            raise TraceError("arrivals must be sorted offsets >= 0")
        if self.prompt_ids is not None and self.prompt_ids.shape != self.arrivals.shape:
            raise TraceError("prompt_ids must align with arrivals")

    def __len__(self) -> int:
        return int(self.arrivals.size)

    @property
    def duration_s(self) -> float:
        """Offset of the last arrival (0 for an empty trace)."""
        return float(self.arrivals[-1]) if self.arrivals.size else 0.0


def _sorted_trace(arrivals: Floats, ids: Ints | None, source: str) -> Trace:
    order = np.argsort(arrivals, kind="stable")
    return Trace(arrivals[order], None if ids is None else ids[order], source)


def read_azure(path: str | Path) -> Trace:
    """Read an Azure LLM inference trace; offsets are from the earliest request, sorted.

    Raises:
        TraceError: missing file, wrong header, or an unparsable TIMESTAMP (with its line).
    """
    p = Path(path)
    stamps: list[int] = []
    try:
        with p.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or header[0].strip().lstrip("\ufeff") != AZURE_HEADER:
                raise TraceError(f"{p}:1: expected an Azure header starting with "
                                 f"{AZURE_HEADER!r}, got {header!r}")
            for row in reader:
                if not row or not row[0].strip():
                    continue
                try:
                    stamps.append(int(np.datetime64(row[0].strip(), "ns").astype(np.int64)))
                except ValueError as exc:
                    raise TraceError(f"{p}:{reader.line_num}: bad TIMESTAMP {row[0]!r} "
                                     f"(expected 'YYYY-MM-DD HH:MM:SS.fffffff')") from exc
    except OSError as exc:
        raise TraceError(f"trace {p} is not readable: {exc}") from exc
    ns = np.asarray(stamps, dtype=np.int64)
    if not ns.size:
        return Trace(np.zeros(0, dtype=np.float64), None, str(p))
    return Trace(np.sort((ns - ns.min()).astype(np.float64) / 1e9), None, str(p))


def read_generic(path: str | Path) -> Trace:
    """Read a generic CSV trace with header ``arrival_s[,prompt_id]``.

    Offsets are kept as given (not shifted), then sorted stably with their prompt ids.

    Raises:
        TraceError: missing header or column, an unknown column, or a bad value; the
            message names the file and line.
    """
    p = Path(path)
    times: list[float] = []
    ids: list[int] = []
    try:
        with p.open(newline="") as f:
            reader = csv.reader(f)
            header = [h.strip().lstrip("\ufeff") for h in next(reader, [])]
            unknown = [h for h in header if h not in GENERIC_COLUMNS]
            if "arrival_s" not in header or unknown or len(set(header)) != len(header):
                raise TraceError(f"{p}:1: expected a header 'arrival_s[,prompt_id]', "
                                 f"got {','.join(header)!r}")
            col_t = header.index("arrival_s")
            col_id = header.index("prompt_id") if "prompt_id" in header else None
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                where = f"{p}:{reader.line_num}"
                if len(row) != len(header):
                    raise TraceError(f"{where}: expected {len(header)} fields, got {len(row)}")
                try:
                    t = float(row[col_t])
                except ValueError as exc:
                    raise TraceError(f"{where}: arrival_s {row[col_t]!r} is not a number") \
                        from exc
                if not math.isfinite(t) or t < 0:
                    raise TraceError(f"{where}: arrival_s must be finite and >= 0, got {t}")
                times.append(t)
                if col_id is not None:
                    raw = row[col_id].strip()
                    if not raw.isdigit():
                        raise TraceError(f"{where}: prompt_id {raw!r} is not an integer >= 0")
                    ids.append(int(raw))
    except OSError as exc:
        raise TraceError(f"trace {p} is not readable: {exc}") from exc
    id_arr = np.asarray(ids, dtype=np.int64) if "prompt_id" in header else None
    return _sorted_trace(np.asarray(times, dtype=np.float64), id_arr, str(p))


def load_trace(path: str | Path) -> Trace:
    """Read a trace in either format, chosen by its header line.

    Relative paths that do not exist are looked up under the shared data directory.

    Raises:
        TraceError: missing file, or a header of neither format.
    """
    p = resolve_data_path(path)
    try:
        with p.open(newline="") as f:
            first = f.readline().strip().lstrip("\ufeff")
    except OSError as exc:
        raise TraceError(f"trace {p} is not readable: {exc}") from exc
    if first.split(",")[0].strip() == AZURE_HEADER:
        return read_azure(p)
    if "arrival_s" in (c.strip() for c in first.split(",")):
        return read_generic(p)
    raise TraceError(f"{p}:1: unknown trace format; expected an Azure header "
                     f"'TIMESTAMP,ContextTokens,GeneratedTokens' or 'arrival_s[,prompt_id]'")


def time_scale(trace: Trace, factor: float) -> Trace:
    """Multiply every offset by ``factor`` (2.0: twice as long, half the rate).

    Keeps the inter-arrival CV exactly and the per-minute profile (stretched).
    """
    if not factor > 0 or not math.isfinite(factor):
        raise TraceError(f"time scale must be > 0, got {factor}")
    return Trace(trace.arrivals * factor, trace.prompt_ids, f"{trace.source}|time×{factor:g}")


def rate_scale(trace: Trace, factor: float, seed: int = 0,
               jitter: float = DEFAULT_JITTER) -> Trace:
    """Thin (``factor`` < 1) or replicate (> 1) arrivals, keeping the trace's time axis.

    * ``factor`` < 1: each arrival is kept independently with probability ``factor``.
      With one seed, the set kept at a smaller factor is a subset of the set kept at a
      larger one (the same uniform draw per arrival), so peaks grow monotonically.
    * ``factor`` > 1: each arrival ``i`` gets ``floor(factor − 1)`` copies, plus one more
      with probability ``frac(factor − 1)``. Its ``c`` copies are spread evenly over the
      gap to the next arrival (slot ``j`` of ``c + 1``), each moved by a seeded jitter of
      ``±jitter`` slot, so every copy lies strictly between its original and the next
      arrival (the last arrival uses the median gap). Spreading copies over the gap,
      rather than stacking them on the original, is what keeps the inter-arrival CV
      (stacking would create near-zero gaps and raise the CV of the code trace from 13
      to 19). Copies keep the prompt id of their original.

    Args:
        trace: the trace to scale.
        factor: expected arrivals out per arrival in; > 0.
        seed: seed of every random draw.
        jitter: copy jitter as a fraction of a slot, in [0, 0.5).
    """
    if not factor > 0 or not math.isfinite(factor):
        raise TraceError(f"rate scale must be > 0, got {factor}")
    if not 0 <= jitter < 0.5:
        raise TraceError(f"jitter must be in [0, 0.5), got {jitter}")
    source = f"{trace.source}|rate×{factor:g}(seed={seed})"
    n = len(trace)
    rng = np.random.default_rng(seed)
    draws = rng.random(n)
    t, ids = trace.arrivals, trace.prompt_ids
    if factor == 1 or n == 0:
        return Trace(t, ids, source)
    if factor < 1:
        keep = draws < factor
        return Trace(t[keep], None if ids is None else ids[keep], source)
    extra = factor - 1.0
    copies = (math.floor(extra) + (draws < extra - math.floor(extra))).astype(np.int64)
    gaps = np.diff(t)
    tail = float(np.median(gaps)) if gaps.size else 0.0
    gaps = np.append(gaps, tail)
    owner = np.repeat(np.arange(n), copies)
    first = np.repeat(np.cumsum(copies) - copies, copies)
    slot = (np.arange(owner.size) - first + 1).astype(np.float64)
    pos = (slot + rng.uniform(-jitter, jitter, owner.size)) / (copies[owner] + 1)
    new_t = np.concatenate([t, t[owner] + gaps[owner] * pos])
    new_ids = None if ids is None else np.concatenate([ids, ids[owner]])
    return _sorted_trace(new_t, new_ids, source)


def cut(trace: Trace, duration_s: float) -> Trace:
    """Keep the arrivals at offsets strictly below ``duration_s``."""
    if not duration_s > 0:
        raise TraceError(f"duration must be > 0 seconds, got {duration_s}")
    keep = trace.arrivals < duration_s
    ids = None if trace.prompt_ids is None else trace.prompt_ids[keep]
    return Trace(trace.arrivals[keep], ids, f"{trace.source}|cut<{duration_s:g}s")


def per_minute(trace: Trace, bin_s: float = 60.0) -> Ints:
    """Arrival counts per ``bin_s`` window from offset 0 (the last window may be partial)."""
    if not len(trace):
        return np.zeros(0, dtype=np.int64)
    bins = np.floor(trace.arrivals / bin_s).astype(np.int64)
    return np.bincount(bins).astype(np.int64)


def peak_per_min(trace: Trace) -> int:
    """The largest per-minute arrival count (0 for an empty trace)."""
    counts = per_minute(trace)
    return int(counts.max()) if counts.size else 0


def interarrival_cv(trace: Trace) -> float:
    """Coefficient of variation of the inter-arrival times; NaN with fewer than 3 arrivals."""
    if len(trace) < 3:
        return float("nan")
    gaps = np.diff(trace.arrivals)
    mean = float(gaps.mean())
    return float(gaps.std() / mean) if mean > 0 else float("nan")


def describe(trace: Trace) -> dict[str, float | int | str]:
    """Count, duration, mean and peak per-minute rate, and inter-arrival CV of a trace."""
    minutes = max(trace.duration_s, 1e-9) / 60.0
    return {"source": trace.source, "arrivals": len(trace), "duration_s": trace.duration_s,
            "mean_per_min": len(trace) / minutes if len(trace) > 1 else 0.0,
            "peak_per_min": peak_per_min(trace), "interarrival_cv": interarrival_cv(trace)}


def exact_capacity_per_min(registry: Registry, gpus: int, device: str | None = None) -> float:
    """Images per minute the exact tier (tier 0) serves on ``gpus`` GPUs at its best batch.

    ``gpus × 60 × b / latency(b)`` maximised over tier 0's ``batch_sizes``.

    Raises:
        TraceError: ``gpus`` < 1, or tier 0 has no latency profile for the device.
    """
    if gpus < 1:
        raise TraceError(f"gpus must be >= 1, got {gpus}")
    dev = device or registry.device
    tier = registry.tiers[0]
    rates = [b / lat for b in tier.batch_sizes
             if (lat := tier.batch_latency(dev, b)) is not None]
    if not rates:
        raise TraceError(f"tier 0 ({tier.name}) of registry {registry.name!r} has no latency "
                         f"profile for device {dev!r}: profile it first, or use --rate-scale")
    return gpus * 60.0 * max(rates)


def target_utilization(trace: Trace, utilization: float, capacity_per_min: float,
                       seed: int = 0, iterations: int = 40) -> tuple[Trace, float]:
    """Rate-scale ``trace`` so its peak per-minute count ≈ ``utilization × capacity``.

    Starts from ``factor = target / peak`` and bisects on the factor with the same seed
    (the realised peak of a thinned or replicated trace is random), returning the scaled
    trace whose peak is closest to the target, and its factor. The peak is an integer, so
    the realised ratio is within ``1 / capacity_per_min`` of ``utilization`` whenever the
    bisection brackets the target (always for thinning, whose peak is monotone).

    Raises:
        TraceError: an empty trace, or a non-positive utilization or capacity.
    """
    if not utilization > 0 or not capacity_per_min > 0:
        raise TraceError("target utilization and capacity must be > 0, got "
                         f"{utilization} and {capacity_per_min}")
    peak0 = peak_per_min(trace)
    if peak0 == 0:
        raise TraceError("cannot scale an empty trace to a target utilization")
    target = utilization * capacity_per_min

    def peak_at(f: float) -> tuple[int, Trace]:
        scaled = rate_scale(trace, f, seed)
        return peak_per_min(scaled), scaled

    f0 = target / peak0
    best_f, (best_peak, best) = f0, peak_at(f0)
    lo, hi = f0 / 2, f0 * 2
    for _ in range(iterations):
        if best_peak == round(target):
            break
        mid = math.sqrt(lo * hi)
        peak, scaled = peak_at(mid)
        if abs(peak - target) < abs(best_peak - target):
            best_f, best_peak, best = mid, peak, scaled
        if peak < target:
            lo = mid
        else:
            hi = mid
    return Trace(best.arrivals, best.prompt_ids,
                 f"{trace.source}|util{utilization:g}@{capacity_per_min:g}/min"), best_f
