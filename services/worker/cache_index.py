"""Pure parts of the approximate cache: the NIRVANA similarity -> K rule, the latent wire
codec and the worker-local embedding index. No I/O here.

Guarantees:
- :func:`k_for_similarity` is NIRVANA's published rule (0.95/0.90/0.85/0.75/0.65 ->
  K = 25/20/15/10/5 of N = 50), scaled to an N-step schedule as ``round(K * N / 50)``;
  it is monotone non-decreasing in the similarity and never exceeds ``N // 2``.
- :func:`encode_latent` / :func:`decode_latent` round-trip any float16/bfloat16/float32
  array bit for bit; a truncated or foreign blob raises :class:`LatentFormatError`.
- :class:`LocalIndex` answers exact (brute force) top-1 cosine searches over unit
  vectors: ``nearest`` is the arg max of ``M @ e`` over live rows (about 1-2 ms for 10k
  x 512 float32 on one core).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

#: NIRVANA's similarity thresholds and the K (of 50 steps) each allows (``heuristics_K``).
NIRVANA_RULE: tuple[tuple[float, int], ...] = (
    (0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5))
NIRVANA_STEPS = 50


def k_for_similarity(similarity: float, steps: int = NIRVANA_STEPS,
                     rule: Sequence[tuple[float, int]] = NIRVANA_RULE) -> int:
    """NIRVANA's K for a query whose nearest cached prompt has cosine ``similarity``.

    Args:
        similarity: CLIP text cosine similarity to the top-1 cached prompt.
        steps: N, the schedule length of the model served (K scales by N / 50).
        rule: ``(threshold, K of 50)`` pairs, highest threshold first.

    Returns:
        The K for the first threshold strictly exceeded, scaled to ``steps``; 0 (a cache
        miss: generate from scratch) when none is.
    """
    for threshold, k in rule:
        if similarity > threshold:
            return round(k * steps / NIRVANA_STEPS)
    return 0


def choose_k(target_k: int, available: Iterable[int]) -> int:
    """The largest available K not above ``target_k`` (0 when there is none).

    Skipping fewer steps than asked never loses quality; skipping more would.
    """
    ok = [k for k in available if 0 < k <= target_k]
    return max(ok) if ok else 0


# --------------------------------------------------------------------------- codec
class LatentFormatError(ValueError):
    """A stored latent blob is truncated, corrupt or of an unknown format."""


_MAGIC = b"T2IL"
_VERSION = 1
_DTYPES = ("float16", "float32", "bfloat16")


def encode_latent(array: np.ndarray, dtype: str = "float32") -> bytes:
    """``MAGIC, version, dtype code, ndim, dims (u32 each)`` followed by the raw bytes.

    ``dtype`` "bfloat16" expects ``array`` to hold the raw bfloat16 bits as uint16
    (numpy has no bfloat16); the others are cast with numpy.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported latent dtype {dtype!r}; one of {_DTYPES}")
    if dtype == "bfloat16":
        if array.dtype != np.uint16:
            raise ValueError("bfloat16 latents are passed as their uint16 bits")
        raw = np.ascontiguousarray(array)
    else:
        raw = np.ascontiguousarray(array, dtype=dtype)
    head = struct.pack("<4sBBB", _MAGIC, _VERSION, _DTYPES.index(dtype), raw.ndim)
    return head + struct.pack(f"<{raw.ndim}I", *raw.shape) + raw.tobytes()


def decode_latent(blob: bytes) -> tuple[np.ndarray, str]:
    """Inverse of :func:`encode_latent`: ``(array, dtype name)`` (bfloat16 as uint16 bits).

    Raises:
        LatentFormatError: Wrong magic/version, or a length that does not match the header.
    """
    if len(blob) < 7 or blob[:4] != _MAGIC:
        raise LatentFormatError("not an encoded latent (bad magic)")
    _, version, code, ndim = struct.unpack_from("<4sBBB", blob)
    if version != _VERSION or code >= len(_DTYPES):
        raise LatentFormatError(f"unknown latent format v{version} dtype code {code}")
    end = 7 + 4 * ndim
    if len(blob) < end:
        raise LatentFormatError("truncated latent header")
    shape = struct.unpack_from(f"<{ndim}I", blob, 7)
    name = _DTYPES[code]
    np_dtype = np.uint16 if name == "bfloat16" else np.dtype(name)
    expected = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    if len(blob) - end != expected:
        raise LatentFormatError(f"latent payload is {len(blob) - end} bytes, header says "
                                f"{expected}")
    return np.frombuffer(blob, dtype=np_dtype, offset=end).reshape(shape).copy(), name


# --------------------------------------------------------------------------- index
class Neighbor(NamedTuple):
    """The nearest cached prompt: its id, cosine similarity and the Ks it has latents for."""

    prompt_id: str
    similarity: float
    available_ks: tuple[int, ...]


class LocalIndex:
    """A growable matrix of unit embeddings with O(1) add/remove by prompt id."""

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self._mat = np.zeros((0, dim or 0), dtype=np.float32)
        self._ids: list[str] = []
        self._ks: list[tuple[int, ...]] = []
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._row

    def ids(self) -> list[str]:
        """Prompt ids held, in row order."""
        return list(self._ids)

    def add(self, prompt_id: str, embedding: np.ndarray, ks: Sequence[int]) -> None:
        """Insert (or replace) one entry; ``embedding`` is normalised here.

        Raises:
            ValueError: The embedding's dimension differs from the index's.
        """
        e = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if self.dim is None:
            self.dim = e.shape[0]
            self._mat = np.zeros((0, self.dim), dtype=np.float32)
        if e.shape[0] != self.dim:
            raise ValueError(f"embedding dim {e.shape[0]} != index dim {self.dim}")
        e = e / max(float(np.linalg.norm(e)), 1e-12)
        if prompt_id in self._row:
            r = self._row[prompt_id]
            self._mat[r] = e
            self._ks[r] = tuple(sorted(ks))
            return
        n = len(self._ids)
        if n == self._mat.shape[0]:  # grow geometrically: amortised O(1) appends
            grown = np.zeros((max(16, 2 * n), self.dim), dtype=np.float32)
            grown[:n] = self._mat[:n]
            self._mat = grown
        self._mat[n] = e
        self._ids.append(prompt_id)
        self._ks.append(tuple(sorted(ks)))
        self._row[prompt_id] = n

    def remove(self, prompt_id: str) -> bool:
        """Drop one entry (swap with the last row); False when absent."""
        r = self._row.pop(prompt_id, None)
        if r is None:
            return False
        last = len(self._ids) - 1
        if r != last:
            self._mat[r] = self._mat[last]
            self._ids[r] = self._ids[last]
            self._ks[r] = self._ks[last]
            self._row[self._ids[r]] = r
        self._ids.pop()
        self._ks.pop()
        return True

    def clear(self) -> None:
        """Forget every entry (the dimension is kept)."""
        self._ids, self._ks, self._row = [], [], {}
        self._mat = np.zeros((0, self.dim or 0), dtype=np.float32)

    def nearest(self, embedding: np.ndarray, exclude: Iterable[str] = ()) -> Neighbor | None:
        """Top-1 by cosine similarity, skipping ids in ``exclude``; None when empty."""
        if not self._ids:
            return None
        e = np.asarray(embedding, dtype=np.float32).reshape(-1)
        e = e / max(float(np.linalg.norm(e)), 1e-12)
        sims = self._mat[: len(self._ids)] @ e
        for pid in exclude:
            r = self._row.get(pid)
            if r is not None:
                sims[r] = -np.inf
        r = int(np.argmax(sims))
        if not np.isfinite(sims[r]):
            return None
        return Neighbor(self._ids[r], float(sims[r]), self._ks[r])

    def nearest_many(self, embeddings: np.ndarray) -> list[Neighbor | None]:
        """:meth:`nearest` for each row of ``embeddings`` (one matrix product)."""
        if not self._ids:
            return [None] * len(embeddings)
        e = np.asarray(embeddings, dtype=np.float32)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sims = e @ self._mat[: len(self._ids)].T
        best = sims.argmax(axis=1)
        return [Neighbor(self._ids[j], float(sims[i, j]), self._ks[j])
                for i, j in enumerate(best)]
