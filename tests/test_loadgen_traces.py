"""Trace reading and shape-keeping scaling (loadgen.traces) and prompt sets (loadgen.prompts).

``tests/data/azure_code_every441.csv`` is derived from the shared Azure code trace: its
header and every 441st data row (rows 0, 441, ..., 8379), unchanged.
Tests on the full shared files skip when the data directory is absent.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest

from common.tiers import Registry
from loadgen import prompts as P
from loadgen import traces as T
from loadgen.paths import data_dir

FIXTURE = Path(__file__).parent / "data" / "azure_code_every441.csv"
CODE = data_dir() / "traces" / "AzureLLMInferenceTrace_code.csv"
CONV = data_dir() / "traces" / "AzureLLMInferenceTrace_conv.csv"
PROMPTS = data_dir() / "prompts"
needs_data = pytest.mark.skipif(not CODE.exists(), reason="shared data directory absent")


def registry(latency: dict[int, float] | None = None) -> Registry:
    """A one-tier registry whose exact tier has the given CPU latency profile."""
    tier = {"id": 0, "name": "exact", "strategy": "exact", "model": "m", "steps": 20,
            "batch_sizes": [1, 4, 8], "latency": {"cpu": latency} if latency else {}}
    return Registry.model_validate({"name": "t", "device": "cpu", "tiers": [tier]})


@pytest.fixture(scope="module")
def code() -> T.Trace:
    if not CODE.exists():
        pytest.skip("shared data directory absent")
    return T.load_trace(CODE)


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


def test_azure_fixture_offsets_from_first_request() -> None:
    trace = T.load_trace(FIXTURE)
    assert len(trace) == 20 and trace.prompt_ids is None
    assert trace.arrivals[0] == 0.0
    # 19:09:54.2404270 - 18:17:03.9799600, to the 100 ns digit of the file.
    assert trace.duration_s == pytest.approx(3170.260467, abs=1e-6)
    assert np.all(np.diff(trace.arrivals) > 0)
    assert int(T.per_minute(trace).sum()) == 20


@needs_data
def test_azure_real_files_match_their_documented_shape() -> None:
    code, conv = T.load_trace(CODE), T.load_trace(CONV)
    assert (len(code), len(conv)) == (8819, 19366)
    assert code.duration_s == pytest.approx(3435.95, abs=0.01)
    assert (T.peak_per_min(code), T.peak_per_min(conv)) == (632, 507)
    assert T.interarrival_cv(code) == pytest.approx(13.15, abs=0.01)
    assert T.interarrival_cv(conv) == pytest.approx(1.094, abs=0.01)


def test_time_scale_keeps_cv_and_stretches_minutes() -> None:
    trace = T.load_trace(CODE if CODE.exists() else FIXTURE)
    for factor in (0.25, 3.0):
        scaled = T.time_scale(trace, factor)
        assert rel(T.interarrival_cv(scaled), T.interarrival_cv(trace)) < 1e-9
        assert scaled.duration_s == pytest.approx(trace.duration_s * factor)
    with pytest.raises(T.TraceError):
        T.time_scale(trace, 0)


def test_rate_scale_replication_spreads_copies_inside_gaps() -> None:
    trace = T.load_trace(FIXTURE)
    scaled = T.rate_scale(trace, 3.0, seed=1)
    assert len(scaled) == 60
    assert set(trace.arrivals) <= set(scaled.arrivals)
    # Between two originals there are exactly two copies (3 arrivals per gap).
    idx = np.searchsorted(scaled.arrivals, trace.arrivals)
    assert np.all(np.diff(idx) == 3)
    assert T.rate_scale(trace, 3.0, seed=1).arrivals.tolist() == scaled.arrivals.tolist()
    assert T.rate_scale(trace, 1.0).arrivals is trace.arrivals


def test_rate_scale_thinning_is_seeded_and_nested() -> None:
    trace = T.load_trace(FIXTURE)
    small, large = T.rate_scale(trace, 0.3, seed=5), T.rate_scale(trace, 0.7, seed=5)
    assert set(small.arrivals) <= set(large.arrivals) <= set(trace.arrivals)
    assert small.arrivals.tolist() == T.rate_scale(trace, 0.3, seed=5).arrivals.tolist()


def test_rate_scale_keeps_prompt_ids_with_their_arrivals(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("arrival_s,prompt_id\n0,0\n1,1\n2,2\n")
    scaled = T.rate_scale(T.load_trace(f), 2.0, seed=0)
    assert scaled.prompt_ids is not None
    assert scaled.prompt_ids.tolist() == [0, 0, 1, 1, 2, 2]


@needs_data
@pytest.mark.parametrize("factor", [2.0, 2.5, 3.7])
def test_replication_keeps_cv_of_code_trace(code: T.Trace, factor: float) -> None:
    scaled = T.rate_scale(code, factor, seed=0)
    assert rel(T.interarrival_cv(scaled), T.interarrival_cv(code)) < 0.05
    counts, base = T.per_minute(scaled), T.per_minute(code)
    assert np.corrcoef(counts[: base.size], base)[0, 1] > 0.999


@needs_data
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_thinning_keeps_minute_profile_and_follows_the_cv_law(code: T.Trace, p: float) -> None:
    # Independent thinning cannot keep the inter-arrival CV of a bursty trace: for any
    # point process CV² -> p·CV₀² + 1 - p. What it keeps is the per-minute profile.
    scaled = T.rate_scale(code, p, seed=0)
    cv0 = T.interarrival_cv(code)
    assert rel(T.interarrival_cv(scaled), math.sqrt(p * cv0**2 + 1 - p)) < 0.05
    counts, base = T.per_minute(scaled), T.per_minute(code)
    assert np.corrcoef(counts, base[: counts.size])[0, 1] > 0.99


def test_exact_capacity_uses_best_batch() -> None:
    reg = registry({1: 2.0, 4: 4.0, 8: 10.0})  # 0.5, 1.0, 0.8 images/s per GPU
    assert T.exact_capacity_per_min(reg, 8) == pytest.approx(480.0)
    with pytest.raises(T.TraceError, match="no latency profile"):
        T.exact_capacity_per_min(registry(), 8)
    with pytest.raises(T.TraceError):
        T.exact_capacity_per_min(reg, 0)


@needs_data
@pytest.mark.parametrize(("gpus", "x"), [(8, 1.2), (8, 0.6), (24, 1.0), (40, 0.9)])
def test_target_utilization_hits_peak_ratio(code: T.Trace, gpus: int, x: float) -> None:
    capacity = T.exact_capacity_per_min(registry({1: 2.0, 4: 4.0, 8: 10.0}), gpus)
    scaled, factor = T.target_utilization(code, x, capacity, seed=3)
    assert abs(T.peak_per_min(scaled) / capacity - x) <= 1.0 / capacity + 1e-9
    assert factor == pytest.approx(x * capacity / 632, rel=0.1)
    if factor > 1:  # replication keeps the inter-arrival CV (thinning: see the law above)
        assert rel(T.interarrival_cv(scaled), T.interarrival_cv(code)) < 0.05


def test_cut_and_per_minute() -> None:
    trace = T.Trace(np.array([0.0, 10.0, 59.9, 60.0, 130.0]))
    assert T.per_minute(trace).tolist() == [3, 1, 1]
    assert T.cut(trace, 60.0).arrivals.tolist() == [0.0, 10.0, 59.9]
    assert T.peak_per_min(T.Trace(np.zeros(0))) == 0


def test_generic_csv_sorted_with_ids(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("arrival_s,prompt_id\n2.5,7\n0.5,3\n\n1.0,4\n")
    trace = T.load_trace(f)
    assert trace.arrivals.tolist() == [0.5, 1.0, 2.5]
    assert trace.prompt_ids is not None and trace.prompt_ids.tolist() == [3, 4, 7]


@pytest.mark.parametrize(("text", "where", "what"), [
    ("0.5\n1.0\n", ":1:", "header"),
    ("arrival_s,prompt\n1,2\n", ":1:", "header"),
    ("arrival_s\n0.1\nsoon\n", ":3:", "not a number"),
    ("arrival_s\n-1\n", ":2:", ">= 0"),
    ("arrival_s\nnan\n", ":2:", "finite"),
    ("arrival_s,prompt_id\n0.1,1\n0.2,x\n", ":3:", "prompt_id"),
    ("arrival_s,prompt_id\n0.1\n", ":2:", "fields"),
])
def test_generic_csv_errors_name_file_and_line(tmp_path: Path, text: str, where: str,
                                               what: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(T.TraceError, match=what) as err:
        T.read_generic(f)
    assert f"bad.csv{where}" in str(err.value)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("time,n\n1,2\n")
    with pytest.raises(T.TraceError, match="unknown trace format"):
        T.load_trace(f)
    with pytest.raises(T.TraceError, match="not readable"):
        T.load_trace(tmp_path / "missing.csv")
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,1,2\nlate,1,2\n")
    with pytest.raises(T.TraceError, match=r"x\.csv:3: bad TIMESTAMP"):
        T.load_trace(f)


@pytest.mark.skipif(not PROMPTS.exists(), reason="shared data directory absent")
def test_prompt_loaders_on_real_files() -> None:
    parti = P.load_prompts(PROMPTS / "PartiPrompts.tsv")
    geneval = P.load_prompts("prompts/geneval_evaluation_metadata.jsonl")  # via data dir
    ddb = P.load_prompts(PROMPTS / "diffusiondb_prompts.json")
    assert (len(parti), len(geneval), len(ddb)) == (1632, 553, 9814)
    assert parti[0] == "bond" and geneval[0].startswith("a photo of")
    assert all(p and p == p.strip() for p in ddb)


def test_plain_text_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert P.load_prompts(f) == ["a cat", "a dog"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(P.PromptError, match=r"p\.jsonl:2"):
        P.load_prompts(bad)
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(P.PromptError, match="no prompts"):
        P.load_prompts(empty)


def test_assign_is_seeded_and_covers_the_set() -> None:
    pool = [f"p{i}" for i in range(10)]
    a = P.assign(pool, 25, seed=4)
    assert a == P.assign(pool, 25, seed=4) and a != P.assign(pool, 25, seed=5)
    assert sorted(a[:10]) == sorted(pool) and sorted(a[10:20]) == sorted(pool)
    assert P.assign_ids(pool, [3, 13]) == ["p3", "p3"]


def test_world_source(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import world.scenes  # noqa: F401
    except ImportError:
        pass
    else:
        got = P.load_prompts("world", n=6, seed=0)
        assert 1 <= len(got) <= 6 and all(isinstance(p, str) and p for p in got)

    def missing(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(P.PromptError, match=r"world\.scenes\.heldout_captions"):
        P.load_prompts("world", n=3)
