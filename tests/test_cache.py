"""The feature cache read back: shards checked on every read, damaged or changing caches refused."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from commandline import in_process, one_error_line
from conftest import ROOT, THREE_CLASSES, clustered_features, make_image_folder, tiny_options, write_feature_cache
from pipeline.cache import store
from pipeline.cache.reader import FeatureView, load_splits
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features


def test_a_reader_of_a_cache_being_rewritten_stops_with_a_clear_message(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(160, 3, seed=5)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES, shard_size=40)
    feature_store = store.FeatureStore(cache)
    data = load_splits(feature_store, FeatureView.for_cache(feature_store), stream=True)["train"]
    # extract rewrites a shard (other rows, same name) while a streamed head is reading
    shard = store.shard_paths(cache)[1]
    fingerprint = feature_store.fingerprint
    rows = store.read_shard_rows(shard, fingerprint.layers, list(range(10)))
    store.write_shard(shard, rows, THREE_CLASSES, fingerprint)
    with pytest.raises(PipelineError, match="changed while it was being read"):
        for _ in data.chunks(rows=16, order=np.random.default_rng(0).permutation(len(data))):
            pass
    with pytest.raises(PipelineError, match="changed while it was being read"):
        list(data.chunks())


@pytest.mark.parametrize("damage", ["shape", "nan", "strings", "labels", "splits"])
def test_a_shard_with_damaged_content_is_refused_naming_the_file(tmp_path: Path, damage: str, capsys) -> None:
    features, labels, splits = clustered_features(120, 3, seed=6)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES, shard_size=60)
    shard = store.shard_paths(cache)[1]
    with h5py.File(shard, "r+") as handle:
        rows = handle["labels"].shape[0]
        if damage == "shape":
            del handle["features/block5_pool"]
            handle["features/block5_pool"] = np.zeros((rows, 7), np.float32)
        elif damage == "nan":
            values = handle["features/block5_pool"][()]
            values[3, 0] = np.nan
            handle["features/block5_pool"][...] = values
        elif damage == "strings":
            del handle["features/block5_pool"]
            handle.create_dataset("features/block5_pool", data=np.array([b"x"] * rows, dtype=object),
                                  dtype=h5py.string_dtype())
        elif damage == "labels":
            handle["labels"][0] = 7
        else:
            del handle["splits"]
            handle.create_dataset("splits", data=np.array([b"holdout"] * rows, dtype=object),
                                  dtype=h5py.string_dtype())
    result = in_process(capsys, "train-head", "--head", "logreg", "--features", str(cache), "--models",
                        str(tmp_path / "m"),
                  "--c-grid", "1", "--n-jobs", "1", "--no-progress")
    line = one_error_line(result)
    assert shard.name in line and "damaged" in line and "delete it and rerun extract" in line
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    first = extract_features(tiny_options(data, tmp_path / "c"))
    from pipeline.cache import store

    fifo = first.cache_dir / store.shard_name(99)
    os.mkfifo(fifo)
    code = ("import sys; from pipeline.extraction.extract import extract_features; sys.path.insert(0, 'tests'); "
            "from conftest import tiny_options; from pathlib import Path; "
            f"extract_features(tiny_options(Path({str(data)!r}), Path({str(tmp_path / 'c')!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode != 0
    assert "is named like a shard but is not a regular file" in result.stderr
    assert math.isfinite(first.seconds)


def test_fused_features_are_read_one_cache_at_a_time(tmp_path: Path) -> None:
    """The fused matrices are allocated once and filled shard by shard: the peak is the fused
    features and one shard's vectors (holding every cache and their concatenation took more than
    twice the fused features)."""
    import tracemalloc

    from pipeline.cache.reader import load_fused_splits

    features, labels, splits = clustered_features(3000, 3, seed=2, shape=(512,))
    first = write_feature_cache(tmp_path / "a", features, labels, splits, THREE_CLASSES, shard_size=500,
                                layer="pool", pooling="avg")
    second = write_feature_cache(tmp_path / "b", features * 2, labels, splits, THREE_CLASSES, shard_size=500,
                                 layer="pool", pooling="avg", backbone="resnet50")
    stores = [store.FeatureStore(first), store.FeatureStore(second)]
    views = [FeatureView.for_cache(s) for s in stores]
    fused_bytes = 3000 * 1024 * 4
    tracemalloc.start()
    fused = load_fused_splits(stores, views)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fused["train"].matrix.shape[1] == 1024
    np.testing.assert_array_equal(fused["train"].matrix[:, 512:], 2 * fused["train"].matrix[:, :512])
    assert peak < 1.5 * fused_bytes, f"peak {peak / fused_bytes:.2f}x the fused features"
    with pytest.raises(PipelineError, match="more than the memory budget"):
        load_fused_splits(stores, views, memory_budget=int(0.9 * fused_bytes))
