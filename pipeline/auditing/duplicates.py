"""Duplicates in a cache: exact ones by content hash (the same bytes under two names, classes or
splits), and near ones by the cosine similarity of the embeddings: exact neighbours from
scikit-learn's NearestNeighbors up to EXACT_LIMIT images, an HNSW index of faiss above it (an
approximate search: bench/audit.py measures its recall against the exact one)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.auditing import require

EXACT_LIMIT = 20_000  # images; above it the exact search's n^2 costs minutes on two cores (bench/audit.py)
NEIGHBOURS = 10


@dataclass(frozen=True)
class Pair:
    a: int  # row indices, a < b
    b: int
    similarity: float
    exact: bool  # the same bytes


def exact_duplicates(ids: list[str]) -> list[Pair]:
    """Every pair of rows whose images have the same content hash."""
    groups: dict[str, list[int]] = {}
    for row, digest in enumerate(ids):
        groups.setdefault(digest, []).append(row)
    return [Pair(group[i], group[j], 1.0, True) for group in groups.values() if len(group) > 1
            for i in range(len(group)) for j in range(i + 1, len(group))]


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def nearest_neighbours(x: np.ndarray, k: int = NEIGHBOURS, approximate: bool | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(similarities, indices) of each row's k nearest other rows by cosine similarity, and the
    method used. `approximate` None: exact up to EXACT_LIMIT rows, faiss HNSW above."""
    unit = unit_rows(x)
    k = min(k, len(unit) - 1)
    if k < 1:
        return np.zeros((len(unit), 0)), np.zeros((len(unit), 0), np.int64), "none"
    if approximate is None:
        approximate = len(unit) > EXACT_LIMIT
    if approximate:
        require("faiss", f"the neighbour search above {EXACT_LIMIT} images")
        import faiss

        faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
        index = faiss.IndexHNSWFlat(unit.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
        index.add(unit)
        similarities, indices = index.search(unit, k + 1)
        method = "faiss HNSW (approximate)"
    else:
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(unit)
        distances, indices = search.kneighbors(unit)
        similarities = 1.0 - distances
        method = "exact (scikit-learn)"
    # Drop each row itself (or, among exact copies, one of the k + 1): the first k others, in order.
    unusable = (indices == np.arange(len(unit))[:, None]) | (indices < 0)
    columns = np.argsort(unusable, axis=1, kind="stable")[:, :k]
    keep = ~np.take_along_axis(unusable, columns, axis=1)
    similarities = np.take_along_axis(similarities, columns, axis=1)
    indices = np.take_along_axis(indices, columns, axis=1)
    return (np.where(keep, similarities, -np.inf).astype(np.float64), np.where(keep, indices, -1), method)


def near_duplicates(x: np.ndarray, threshold: float, approximate: bool | None = None) -> tuple[list[Pair], str]:
    """Pairs of rows whose embeddings' cosine similarity is at least `threshold`."""
    similarities, indices, method = nearest_neighbours(x, approximate=approximate)
    pairs: dict[tuple[int, int], float] = {}
    for row in range(len(indices)):
        for similarity, other in zip(similarities[row], indices[row]):
            if other < 0 or similarity < threshold:
                continue
            key = (min(row, int(other)), max(row, int(other)))
            pairs[key] = max(pairs.get(key, -1.0), float(similarity))
    return [Pair(a, b, min(s, 1.0), False) for (a, b), s in sorted(pairs.items(), key=lambda item: -item[1])], method


def recall_at_k(exact: np.ndarray, approximate: np.ndarray) -> float:
    """Share of the exact k nearest neighbours that the approximate search found."""
    found = [len(set(e[e >= 0]) & set(a[a >= 0])) / max(1, int((e >= 0).sum())) for e, a in zip(exact, approximate)]
    return float(np.mean(found)) if found else 1.0
