"""The approximate cache: codec, NIRVANA rule, local index, Redis store (retrieval, LCBFU
eviction, size budget, incremental sync, concurrent writers)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import redis
import torch

from common import keys
from services.worker.cache import (
    CacheError,
    LatentCache,
    blob_to_tensor,
    cache_namespace,
    k_for_similarity,
    prompt_id,
    tensor_to_blob,
)
from services.worker.cache_index import (
    LatentFormatError,
    LocalIndex,
    choose_k,
    decode_latent,
    encode_latent,
)

NS = cache_namespace("models/world/pipeline", 20, 32, 32)
DIM = 8


def unit(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1.0
    return v


def lat(value: float, shape: tuple[int, ...] = (3, 4, 4)) -> torch.Tensor:
    return torch.full(shape, float(value))


def store_bytes(r: Any, ns: str) -> int:
    """Bytes actually held: every latent string plus every embedding."""
    total = 0
    for key in r.scan_iter(match=f"{keys.cache_prefix(ns)}:lat:*"):
        total += int(r.strlen(key))
    for v in r.hvals(keys.cache_part_key(ns, "emb")):
        total += len(v)
    return total


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_nirvana_rule_scaled() -> None:
    sims = [0.96, 0.91, 0.86, 0.8, 0.7, 0.5]
    assert [k_for_similarity(s) for s in sims] == [25, 20, 15, 10, 5, 0]
    assert [k_for_similarity(s, 20) for s in sims] == [10, 8, 6, 4, 2, 0]
    grid = np.linspace(-1, 1, 401)
    ks = [k_for_similarity(float(s), 20) for s in grid]
    assert ks == sorted(ks) and max(ks) == 10
    assert choose_k(8, (2, 4, 6, 10)) == 6 and choose_k(1, (2, 4)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_latent_codec_round_trip(dtype: torch.dtype) -> None:
    x = torch.randn(1, 4, 8, 8).to(dtype)
    back = blob_to_tensor(tensor_to_blob(x))
    assert back.dtype == dtype and torch.equal(back, x)
    half = blob_to_tensor(tensor_to_blob(x.float(), "float16"))
    assert half.dtype == torch.float16
    blob = encode_latent(np.ones((2, 3), np.float32))
    assert decode_latent(blob)[0].shape == (2, 3)
    for bad in (blob[:-1], b"XXXX" + blob[4:], blob[:5]):
        with pytest.raises(LatentFormatError):
            decode_latent(bad)


def test_local_index_nearest_add_remove_and_speed() -> None:
    idx = LocalIndex()
    for i in range(5):
        idx.add(f"p{i}", unit(i), [2, 4])
    q = unit(3) + 0.1 * unit(4)
    near = idx.nearest(q)
    assert near is not None and near.prompt_id == "p3" and near.available_ks == (2, 4)
    assert tuple(idx.nearest(q, exclude=["p3"]) or ()) == (
        "p4", pytest.approx(0.1 / np.sqrt(1.01)), (2, 4))
    assert idx.remove("p3") and not idx.remove("p3") and "p3" not in idx
    assert idx.nearest(q) is not None and idx.nearest(q).prompt_id == "p4"  # type: ignore[union-attr]
    many = idx.nearest_many(np.stack([unit(0), unit(1)]))
    assert [n.prompt_id if n else None for n in many] == ["p0", "p1"]
    big = LocalIndex()
    rng = np.random.default_rng(0)
    for i, v in enumerate(rng.standard_normal((10_000, 512)).astype(np.float32)):
        big.add(str(i), v, [5])
    e = rng.standard_normal(512).astype(np.float32)
    best = []
    for _ in range(5):
        t = time.perf_counter()
        big.nearest(e)
        best.append(time.perf_counter() - t)
    assert min(best) < 0.02  # ~1-3 ms on one core; generous for a loaded CI machine


def test_put_get_exact_and_nearest(client: redis.Redis) -> None:
    cache = LatentCache(client, NS, steps=20, budget_bytes=1 << 20)
    x2, x4 = torch.randn(3, 32, 32), torch.randn(3, 32, 32)
    assert cache.put("a red circle", unit(0), {2: x2, 4: x4}, seed=7) == (True, 0)
    assert cache.put("A red  circle", unit(0), {2: x2}) == (False, 0)  # same prompt id
    pid = prompt_id("a red circle")
    got = cache.get(pid, 4)
    assert got is not None and torch.equal(got, x4)
    assert cache.get(pid, 6) is None
    cache.put("two blue squares", unit(1), {2: x2, 4: x4})
    other = LatentCache(client, NS, steps=20, budget_bytes=1 << 20)  # another worker
    near = other.nearest(unit(0) + 0.2 * unit(1))
    assert near is not None and near.prompt_id == pid and near.available_ks == (2, 4)
    assert near.similarity == pytest.approx(1 / np.sqrt(1.04), abs=1e-5)
    meta = other.meta(pid)
    assert meta["prompt"] == "a red circle" and meta["seed"] == "7" and meta["hits"] == "0"
    with pytest.raises(CacheError):
        cache.put("x", unit(2), {20: x2})  # K must be < N
    with pytest.raises(CacheError, match="budget"):
        LatentCache(client, NS, 20, budget_bytes=100).put("y", unit(2), {2: x2})


def test_lcbfu_evicts_lowest_hits_times_benefit_oldest_first(client: redis.Redis) -> None:
    one = len(tensor_to_blob(lat(0.0))) + DIM * 4
    cache = LatentCache(client, NS, steps=20, budget_bytes=3 * one)
    for name in "abc":
        cache.put(name, unit(ord(name)), {4: lat(1.0)})
    cache.record_hit(prompt_id("b"))
    cache.record_hit(prompt_id("b"))
    cache.record_hit(prompt_id("c"))
    assert cache.meta(prompt_id("b"))["hits"] == "2"
    assert cache.put("d", unit(4), {4: lat(1.0)}) == (True, 1)  # a: freq 1, oldest
    assert cache.meta(prompt_id("a")) == {}
    assert cache.put("e", unit(5), {4: lat(1.0)}) == (True, 1)  # d: freq 1 < c: 2 < b: 3
    assert cache.meta(prompt_id("d")) == {} and cache.meta(prompt_id("c"))
    # Benefit: at equal frequency, the entry that can skip less goes first.
    cache2 = LatentCache(client, NS + "b", steps=20, budget_bytes=2 * one)
    cache2.put("big-k", unit(0), {10: lat(1.0)})
    cache2.put("small-k", unit(1), {2: lat(1.0)})
    cache2.put("new", unit(2), {6: lat(1.0)})
    assert cache2.meta(prompt_id("small-k")) == {} and cache2.meta(prompt_id("big-k"))
    assert not cache.record_hit(prompt_id("a"))  # evicted: nothing recreated
    assert cache.meta(prompt_id("a")) == {}


def test_budget_respected_and_sync_sees_evictions(client: redis.Redis) -> None:
    one = len(tensor_to_blob(lat(0.0))) * 2 + DIM * 4
    budget = 10 * one + one // 2
    writer = LatentCache(client, NS, steps=20, budget_bytes=budget)
    reader = LatentCache(client, NS, steps=20, budget_bytes=budget, refresh_s=0)
    for i in range(40):
        writer.put(f"prompt {i}", unit(i), {2: lat(i), 4: lat(-i)})
        s = writer.stats()
        assert s["bytes"] <= budget and s["bytes"] == store_bytes(client, NS)
        if i % 7 == 0:
            reader.refresh()
    reader.refresh()
    assert writer.stats()["entries"] == 10 == len(reader.index)
    assert sorted(reader.index.ids()) == sorted(
        prompt_id(f"prompt {i}") for i in range(30, 40))


def test_stale_local_entry_reads_as_missing(client: redis.Redis) -> None:
    one = len(tensor_to_blob(lat(0.0))) + DIM * 4
    a = LatentCache(client, NS, steps=20, budget_bytes=one)
    b = LatentCache(client, NS, steps=20, budget_bytes=one)
    a.put("first", unit(0), {2: lat(1.0)})
    b.put("second", unit(1), {2: lat(2.0)})  # evicts "first"
    near = a.nearest(unit(0), refresh=False)  # a's local copy still has it
    assert near is not None and near.prompt_id == prompt_id("first")
    assert a.get(near.prompt_id, 2) is None and prompt_id("first") not in a.index
    assert a.nearest(unit(0)).prompt_id == prompt_id("second")  # type: ignore[union-attr]


def test_concurrent_writers_never_corrupt_or_overflow(redis_url: str) -> None:
    one = len(tensor_to_blob(lat(0.0, (3, 16, 16)))) * 2 + DIM * 4
    budget = 25 * one
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            cache = LatentCache(redis.Redis.from_url(redis_url), NS, 20, budget)
            for i in range(150):
                name = f"w{w} p{i}" if i % 3 else f"shared {i}"  # some prompts collide
                cache.put(name, unit(i), {2: lat(i, (3, 16, 16)), 6: lat(-i, (3, 16, 16))})
                if i % 5 == 0:
                    cache.record_hit(prompt_id(f"shared {i - 3}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    r: Any = redis.Redis.from_url(redis_url)
    cache = LatentCache(r, NS, 20, budget)
    stats = cache.stats()
    assert stats["bytes"] <= budget and stats["bytes"] == store_bytes(r, NS)
    raw: Any = r.zrange(keys.cache_part_key(NS, "index"), 0, -1)
    members = [m.decode() for m in raw]
    assert len(members) == stats["entries"] == r.zcard(keys.cache_part_key(NS, "lcbfu"))
    for pid in members:
        meta = cache.meta(pid)
        assert meta["ks"] == "2,6" and int(meta["bytes"]) == one
        for k in (2, 6):
            got = cache.get(pid, k)
            assert got is not None and got.shape == (3, 16, 16)
            assert abs(float(got[0, 0, 0])) == abs(float(got.mean()))  # uniform: not torn
    cache.refresh()
    assert sorted(cache.index.ids()) == sorted(members)


def test_registry_cache_opens_the_cache_tiers_namespace(client: redis.Redis,
                                                        tmp_path: object) -> None:
    from pathlib import Path

    from common.tiers import load_registry
    from services.worker.cache import registry_cache
    from tests.tinysd import write_registry, write_world_registry

    assert isinstance(tmp_path, Path)
    reg = load_registry(write_world_registry(tmp_path / "w.yaml", "models/world/pipeline"))
    cache = registry_cache(client, reg, 32, 32)
    assert cache is not None
    assert cache.namespace == cache_namespace("models/world/pipeline", 10, 32, 32)
    plain = load_registry(write_registry(tmp_path / "p.yaml", "m"))
    assert registry_cache(client, plain, 32, 32) is None
