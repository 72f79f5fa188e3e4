"""Shared helpers: small image folders made by the tests themselves, synthetic feature caches, and
one module-scoped "small cache and a head run" (tests/commandline.py runs the command line).
Importing this imports no TensorFlow: only the tests that need it do."""

from __future__ import annotations

import gc
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Ray's memory monitor kills a local instance's workers once the whole machine passes 95% of its
# memory, counting every process on it: under `-n auto` the other test workers' TensorFlow, so CI
# saw a Ray test killed for memory other tests held (22.5 of 23.5 GB). Off in the tests (a local
# instance's raylet inherits this environment); the kernel's own limit still holds.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
# TensorFlow in each test worker, and in the commands its tests start, computes on one thread: `-n
# auto` runs a worker more than there are cores, and each worker's TensorFlow kept pools of a thread
# a core; they waited on each other (five heavy files: 162 s with the pools, 150 s without, on a
# 2-core AMD EPYC, side by side).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
# Likewise OpenBLAS (numpy, scipy) and OpenMP (scikit-learn): a pool of a thread a core in each
# worker, whose idle threads spin; one thread each (test_heads and test_audit, one process: 57.6
# CPU-s with the pools, 49.7 without, the same wall time, 2-core AMD EPYC).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc's malloc gives freed memory back to the kernel at once (above 128 KiB at the heap's top) and
# serves large blocks by mmap: TensorFlow's tensors, allocated and freed batch after batch, then
# fault in fresh zeroed pages each time. The test workers (and the commands they start) keep up to
# 1 GiB of freed memory for reuse instead, and serve blocks up to 32 MiB from the heap; the release
# past 4 GiB below still trims. The whole suite, one run after the other on a 2-core AMD EPYC: 40.1
# million page faults and 144 s of system CPU before, 26.5 million and 116 s after; 8:30 -> 8:06.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=268435456:"
                                        "glibc.malloc.mmap_threshold=33554432")

import numpy as np
import pytest
from PIL import Image


def _keep_freed_memory_for_reuse() -> None:
    """GLIBC_TUNABLES' malloc settings for this process too (glibc read its environment before
    they were there) with mallopt."""
    codes = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3}  # malloc.h's M_TRIM_THRESHOLD, ...
    settings = dict(item.removeprefix("glibc.malloc.").split("=", 1) for item in
                    os.environ["GLIBC_TUNABLES"].split(":") if item.startswith("glibc.malloc.") and "=" in item)
    for name, value in settings.items():
        if name in codes and value.isdigit():
            _glibc_malloc("mallopt", codes[name], int(value))


def _glibc_malloc(function: str, *arguments: int) -> None:
    """Call one of glibc's malloc functions (elsewhere, another allocator as it is: nothing)."""
    import ctypes
    import ctypes.util

    try:
        getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)(*arguments)
    except (OSError, AttributeError):
        pass


_keep_freed_memory_for_reuse()

ROOT = Path(__file__).resolve().parent.parent
THREE_CLASSES = ["birds", "cats", "dogs"]  # sorted, as the pipeline names classes
FAST_LOGREG = {"c_grid": "1e-3:1e1:5", "n_jobs": 1}  # a five-value C search: seconds, not minutes
# VGG16 read at its third block (`--layer block3_pool`): the model holds blocks 1-3, 1.7 of VGG16's
# 14.7 million weights, where what a test is about does not depend on the depth (exports, their
# checks, fine-tuning's plumbing): an ONNX conversion of it takes 4 s against 16 s, a TFLite one 2.7
# against 5.2 (2-core AMD EPYC).
SHALLOW = ["block3_pool"]


def write_image(path: Path, seed: int, size: int = 40, channels: int = 3, fmt: str = "png") -> Path:
    """A small random image, PNG (lossless) or JPEG (quality 95), encoded by Pillow."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    encoded = io.BytesIO()
    if fmt == "png":
        image.save(encoded, format="PNG")
    else:
        image.convert("L" if channels == 1 else "RGB").save(encoded, format="JPEG", quality=95)
    path.write_bytes(encoded.getvalue())
    return path


def train_test_folder(root: Path, train: int = 20, test: int = 4, size: int = 40) -> Path:
    """A DIR/{train,test}/<class>/ layout without a validation folder."""
    for c, name in enumerate(("boot", "shirt")):
        for i in range(train):
            write_image(root / "train" / name / f"{name}{i:03d}.png", seed=c * 1000 + i, size=size)
        for i in range(test):
            write_image(root / "test" / name / f"t{name}{i:03d}.png", seed=50_000 + c * 1000 + i, size=size)
    return root


def make_image_folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cats", "dogs"),
                      seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img{i:03d}.png", seed=seed * 100_000 + c * 1000 + i)
    return root


def tiny_options(data: Path, cache: Path, **overrides):  # noqa: ANN201 - an ExtractOptions
    """VGG16 with random weights at 32x32 in float32: fast and deterministic."""
    from pipeline.data.dataset import SplitConfig
    from pipeline.extraction.extract import ExtractOptions

    values = dict(
        data=data, backbone="vgg16", image_size=32, weights="none", precision="fp32",
        batch_size=4, shard_size=8, cache_root=cache, progress=False,
        splits=SplitConfig(0.2, 0.2, 0),
    )
    values.update(overrides)
    return ExtractOptions(**values)


QUICK_TIER = Path(__file__).with_name("quick.txt")  # node ids measured under 0.5 s each


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the quick tier (`make test-quick`, `-m quick`): the tests listed in tests/quick.txt."""
    listed = {line.strip() for line in QUICK_TIER.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.quick)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than cores. Much of the suite waits (a subprocess importing
    TensorFlow, a Ray instance starting, a process to kill): on a 2-core Xeon, three workers ran
    the suite in 15:13; two had taken 19:46 (with a few slow tests since trimmed)."""
    return (os.cpu_count() or 1) + 1


RELEASE_ABOVE_BYTES = 4 << 30
RELEASE_AGAIN_AFTER_BYTES = 2 << 30
_release = {"above": RELEASE_ABOVE_BYTES}  # the size past which the next release comes


@pytest.fixture(autouse=True)
def _release_keras_state() -> Iterator[None]:
    """After a test, a worker holding more than 4 GiB drops Keras' global state, collects and
    gives freed memory back to the system: a worker keeps every model its tests built until then
    (the ONNX export tests, one worker under --dist loadfile, had grown it to 17 GB; released, its
    peak is the largest test's). The next release waits until the worker has grown 2 GiB past
    what it held after this one: memory a release cannot give back had made every later test of
    the worker pay for one (99 releases, 89 s in a suite of 540 s)."""
    yield
    keras = sys.modules.get("keras")
    if keras is not None and _resident_bytes() > _release["above"]:
        network = sys.modules.get("pipeline.backbone.network")
        if network is not None:
            network.forget_kept_extractor()
        keras.backend.clear_session()
        gc.collect()
        _glibc_malloc("malloc_trim", 0)  # freed heap pages back to the system
        _release["above"] = max(RELEASE_ABOVE_BYTES, _resident_bytes() + RELEASE_AGAIN_AFTER_BYTES)


def _resident_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: never released
        return 0


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="module")
def head_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small cache (three classes, six images each, VGG16 with random weights at 32 px) and a
    logistic-regression run on it named "run": one per test module that asks for it. Tests that
    change the run work on a copy, or restore what they change. A module whose tests convert or
    export the run, and do not fine-tune it, sets HEAD_RUN_LAYERS = SHALLOW: its run reads VGG16
    at block3_pool (a TFLite conversion of it 2.7 s against 5.2)."""
    from pipeline.extraction.extract import extract_features
    from pipeline.training.train import TrainOptions, run_training

    root = tmp_path_factory.mktemp("head-run")
    data = make_image_folder(root / "data", per_class=6, classes=tuple(THREE_CLASSES))
    layers = getattr(request.module, "HEAD_RUN_LAYERS", None)
    cache = extract_features(tiny_options(data, root / "features", layers=layers)).cache_dir
    models = root / "models"
    run = run_training(TrainOptions(head="logreg", features=cache, models=models, name="run", head_params=FAST_LOGREG,
                                    progress=False)).directory
    return {"root": root, "data": data, "cache": cache, "models": models, "run": run}


@pytest.fixture(autouse=True)
def _isolated_weights_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted weights go to a per-session folder, not the user's cache."""
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path_factory.getbasetemp() / "weights"))


def write_feature_cache(directory: Path, features: np.ndarray, labels: np.ndarray, splits: list[str],
                        class_names: list[str], shard_size: int = 64, layer: str = "block5_pool",
                        pooling: str = "none", backbone: str = "vgg16") -> Path:
    """A feature cache written straight through the store, without a backbone: synthetic features
    with a known structure for the head tests."""
    from pipeline import atomic
    from pipeline.cache import store

    fingerprint = store.Fingerprint(backbone, "none", "synthetic", 32, "area-down-bilinear-up", "torch",
                                    (layer,), pooling, "fp32", "2.21")
    directory.mkdir(parents=True, exist_ok=True)
    indexes = []
    for number, start in enumerate(range(0, len(labels), shard_size)):
        part = slice(start, start + shard_size)
        paths = [f"{class_names[y]}/img{start + i:05d}.png" for i, y in enumerate(labels[part])]
        rows = store.Rows(paths, [f"{start + i:064x}" for i in range(len(paths))], np.asarray(labels[part], np.int32),
                          list(splits[part]), {layer: features[part]})
        path = directory / store.shard_name(number)
        store.write_shard(path, rows, class_names, fingerprint)
        indexes.append(store.read_shard_index(path, fingerprint))
    manifest = store.manifest_core(fingerprint, class_names, indexes, {layer: features.shape[1:]})
    manifest["weights"] = {"source": "none", "pretrained": False}
    manifest["dataset"] = {"root": str(directory.parent / "synthetic")}
    atomic.write_json(directory / store.MANIFEST_NAME, manifest)
    return directory


def clustered_features(n: int, classes: int, seed: int = 0, shape: tuple[int, ...] = (2, 2, 8),
                       separation: float = 3.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Gaussian clusters, one per class, in feature maps of `shape`; splits 60/20/20, interleaved
    so every shard holds every split and class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    centres = rng.normal(size=(classes, *shape)) * separation
    features = (centres[labels] + rng.normal(size=(n, *shape))).astype(np.float32)
    splits = [("train", "train", "train", "validation", "test")[i % 5] for i in range(n)]
    return features, labels.astype(np.int32), splits


def pooled_cluster_cache(root: Path, rows: int, seed: int, dimension: int, separation: float) -> Path:
    """A pooled cache of three classes a, b, c (clustered_features) under root/features/synthetic:
    the heads' tests' cache."""
    features, labels, splits = clustered_features(rows, 3, seed=seed, shape=(dimension,), separation=separation)
    return write_feature_cache(root / "features" / "synthetic", features, labels, splits, ["a", "b", "c"],
                               pooling="avg")


def assert_features_close(actual: np.ndarray, expected: np.ndarray, what: str = "features") -> None:
    """Features of one image computed in batches of different composition (another engine, a
    rerun with other images beside it). oneDNN's fp32 kernels do not promise bit-identical results
    across batch shapes (on a 2-core AMD EPYC with AVX2 they differ by up to 3e-5 relative), so
    they are compared within 1e-4 of the row's largest value; another image's features differ by
    orders of magnitude more. Rows copied or resumed in the same batches are compared exactly
    where they are asserted (np.array_equal), and say so."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shapes {actual.shape} and {expected.shape}"
    scale = float(np.abs(expected).max()) or 1.0
    difference = float(np.abs(actual - expected).max())
    assert difference <= 1e-4 * scale, f"{what} differ: {difference:.3g} against a scale of {scale:.3g}"

