"""Embeddings out of the cache, with stable ids, for other tools: one row per image with `id` (the
content sha256), `path`, `class`, `label`, `split` and `embedding`, as Parquet (a fixed-size list
of float32; the cache's fingerprint in the file's key-value metadata) or as .npz (`embeddings`,
`ids`, `paths`, `labels`, `splits`, with a JSON sidecar for the fingerprint).

Written one shard at a time (a Parquet row group per shard; the .npz arrays streamed into the
archive), so memory stays bounded by the shard size whatever the cache holds. Either file loads
with pyarrow/pandas or NumPy alone.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.auditing import require
from pipeline.cache.reader import FeatureView
from pipeline.cache.store import UNLABELLED, FeatureStore
from pipeline.errors import PipelineError

FORMATS = (".parquet", ".npz")
METADATA_KEY = b"bottleneck_pipeline"  # the Parquet key-value metadata entry holding the fingerprint


@dataclass
class EmbeddingsSummary:
    path: Path
    rows: int
    dimension: int
    seconds: float
    metadata: dict[str, Any]


def metadata(store: FeatureStore, view: FeatureView) -> dict[str, Any]:
    """What the file says of where its vectors come from: the cache's fingerprint and the view."""
    return {
        "cache": str(store.directory.resolve()),
        "fingerprint": store.fingerprint.as_dict(),
        "fingerprint_digest": store.fingerprint.digest(),
        "view": view.as_dict(),
        "class_names": store.class_names,
        "pretrained": store.pretrained,
        "id": "sha256 of the image file's bytes",
    }


def _batches(store: FeatureStore, view: FeatureView) -> Iterator[tuple[Any, np.ndarray]]:
    """(rows, vectors) shard by shard, in shard order, every image of the cache: labelled ones
    with their label and split (the labelling's where the store was relabelled), unlabelled ones
    with label -1 and split "" (written with class "")."""
    relabelled = None
    if store.labelling is not None:
        relabelled = {path: (int(label), split) for split, index in store.split_indexes().items()
                      for path, label in zip(index.paths, index.labels)}
    for rows in store.iter_shards(None, view.layers):
        if relabelled is not None:
            given = [relabelled.get(path, (UNLABELLED, "")) for path in rows.paths]
            rows.labels = np.array([label for label, _ in given], np.int32)
            rows.splits = [split for _, split in given]
        else:
            rows.splits = [split if label != UNLABELLED else "" for split, label in zip(rows.splits, rows.labels)]
        yield rows, view.vectors(rows.features).astype(np.float32)


def _class(names: list[str], label: int) -> str:
    return "" if label == UNLABELLED else names[label]


def check_output(out: Path) -> Path:
    out = Path(out)
    if out.suffix not in FORMATS:
        raise PipelineError(f"--out {out}: write FILE.parquet or FILE.npz")
    if out.exists() and out.is_dir():
        raise PipelineError(f"--out {out} is a folder: name a file, e.g. {out / 'embeddings.parquet'}")
    if not out.parent.is_dir():
        raise PipelineError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not _earlier_embeddings(out):
        raise PipelineError(f"--out {out} already exists and is not an earlier embeddings file: it is not replaced; "
                            "name a new file (or delete it first)")
    return out


def _earlier_embeddings(path: Path) -> bool:
    """Whether `path` is a file this command wrote (and may replace): a Parquet file carrying its
    metadata key, or an .npz holding its arrays."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                return {"embeddings.npy", "ids.npy", "paths.npy"} <= set(archive.namelist())
        import pyarrow.parquet as pq

        return METADATA_KEY in (pq.read_schema(str(path)).metadata or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to replace
        return False


def write_embeddings(store: FeatureStore, view: FeatureView, out: Path, progress: bool = True) -> EmbeddingsSummary:
    """Every image of the cache as a row of `out` (.parquet or .npz), written whole or not at all."""
    import time

    out = check_output(out)
    if out.suffix == ".parquet":
        require("pyarrow", "a Parquet file")
    started = time.perf_counter()
    total = len(store.rows_index())
    if total == 0:
        raise PipelineError(f"{store.directory} holds no images: nothing to export")
    dimension = view.dimension(store.manifest["feature_shapes"])
    described = metadata(store, view) | {"dimension": dimension, "rows": total}
    bar = _progress(total, progress)
    with atomic.replacing(out, suffix=out.suffix) as temporary:
        if out.suffix == ".parquet":
            _write_parquet(Path(temporary), store, view, dimension, described, bar)
        else:
            _write_npz(Path(temporary), store, view, total, dimension, bar)
    if out.suffix == ".npz":
        atomic.write_json(out.with_suffix(".json"), described)
    bar.close()
    return EmbeddingsSummary(out, total, dimension, time.perf_counter() - started, described)


def _progress(total: int, shown: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embeddings", disable=not shown, leave=False)


def _write_parquet(path: Path, store: FeatureStore, view: FeatureView, dimension: int, described: dict[str, Any],
                   bar: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("class", pa.string()), ("label", pa.int32()),
        ("split", pa.string()), ("embedding", pa.list_(pa.float32(), dimension)),
    ], metadata={METADATA_KEY: json.dumps(described).encode()})
    names = store.class_names
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        for rows, vectors in _batches(store, view):
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dimension)
            writer.write_table(pa.table([
                pa.array(rows.sha256, pa.string()), pa.array(rows.paths, pa.string()),
                pa.array([_class(names, label) for label in rows.labels], pa.string()),
                pa.array(rows.labels.astype(np.int32), pa.int32()), pa.array(rows.splits, pa.string()), embedding,
            ], schema=schema))
            bar.update(len(rows))


def _write_npz(path: Path, store: FeatureStore, view: FeatureView, total: int, dimension: int, bar: Any) -> None:
    """An .npz (a zip of .npy files, as np.savez writes it) streamed: the embeddings array is
    written shard by shard after its header; the small columns follow."""
    ids: list[str] = []
    paths: list[str] = []
    labels: list[np.ndarray] = []
    splits: list[str] = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("embeddings.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (total, dimension)})
            written = 0
            for rows, vectors in _batches(store, view):
                member.write(np.ascontiguousarray(vectors, "<f4").tobytes())
                written += len(rows)
                ids += rows.sha256
                paths += rows.paths
                labels.append(rows.labels.astype(np.int32))
                splits += rows.splits
                bar.update(len(rows))
            if written != total:
                raise PipelineError(f"{store.directory} changed while being read ({written} rows, {total} listed): "
                                    "rerun when extract is done")
        for name, values in (("ids", np.asarray(ids)), ("paths", np.asarray(paths)),
                             ("labels", np.concatenate(labels)), ("splits", np.asarray(splits))):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, values, allow_pickle=False)
