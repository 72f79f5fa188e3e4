"""extract --precision int8: the backbone statically quantised and run by ONNX Runtime, calibrated
on the dataset's own training images, its graph kept with its cache. Small images and random
weights, on every CPU (where extract would only advise against it too)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHALLOW, make_image_folder, tiny_options, write_image
from pipeline.backbone import int8
from pipeline.cache.store import FeatureStore
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _features(cache: Path) -> dict[str, np.ndarray]:
    rows = FeatureStore(cache).read()
    return {path: rows.features[SHALLOW[0]][i] for i, path in enumerate(rows.paths)}


def test_the_quantised_graph_gives_the_float_features_closely(tmp_path: Path) -> None:
    """The lower-level path: float graph, static quantisation, ONNX Runtime; same shapes, finite, close."""
    from pipeline.backbone.network import FeatureExtractor, build_backbone
    from pipeline.backbone.registry import get_backbone

    spec = get_backbone("vgg16")
    extractor = FeatureExtractor(build_backbone(spec, 32, "fp32", spec.resolve_weights("none", None)),
                                 ("block2_pool", "block3_pool"), "avg")
    rng = np.random.default_rng(0)
    pixels = rng.normal(0, 1, (48, 32, 32, 3)).astype(np.float32)
    int8.float_graph(extractor, 32, tmp_path / "fp32.onnx")
    used = int8.quantise(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", (pixels[i:i + 8] for i in range(0, 32, 8)))
    assert used == 32
    quantised = int8.Int8Extractor(tmp_path / "int8.onnx", extractor.layers, "avg", extractor.output_shapes())
    expected, found = extractor(pixels[32:]), quantised(pixels[32:])
    for name in extractor.layers:
        assert found[name].shape == expected[name].shape and found[name].dtype == np.float32
        assert np.isfinite(found[name]).all()
        assert _cosines(found[name], expected[name]).min() > 0.99, name
    assert quantised.batches == 1 and quantised.images == 16


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("int8")
    data = make_image_folder(root / "data", per_class=30, classes=("a", "b"))
    summary = extract_features(tiny_options(data, root / "features", precision="int8", layers=SHALLOW))
    fp32 = extract_features(tiny_options(data, root / "features", precision="fp32", layers=SHALLOW))
    return {"root": root, "data": data, "cache": summary.cache_dir, "summary": summary, "fp32": fp32.cache_dir}


def test_extract_int8_writes_a_cache_of_its_own_close_to_fp32(int8_cache: dict) -> None:
    cache, fp32 = int8_cache["cache"], int8_cache["fp32"]
    assert cache != fp32
    store = FeatureStore(cache)
    f = store.fingerprint
    assert f.precision == "int8" and f.backend.startswith("onnxruntime-") and f.calibration == int8.CALIBRATION_RULE
    recorded = store.manifest["int8"]
    assert recorded["runtime"] == f.backend and recorded["calibration"]["rule"] == int8.CALIBRATION_RULE
    record = json.loads((cache / int8.RECORD_FILE).read_text())
    train = {digest for digest, split in zip(store.rows_index().sha256, store.rows_index().splits) if split == "train"}
    assert set(record["calibration"]["ids"]) <= train and len(record["calibration"]["ids"]) == min(len(train), 256)
    assert recorded["calibration"]["images"] == len(record["calibration"]["ids"])
    assert any("no int8 certificate" in note for note in int8_cache["summary"].notes)
    quantised, exact = _features(cache), _features(fp32)
    assert set(quantised) == set(exact)
    paths = sorted(exact)
    assert _cosines(np.stack([quantised[p] for p in paths]), np.stack([exact[p] for p in paths])).min() > 0.99


def test_a_continued_int8_cache_keeps_its_quantisation(int8_cache: dict, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(int8_cache["data"], data)
    import onnx
    from onnx import numpy_helper

    def weights_and_ranges(path: Path) -> list[np.ndarray]:  # in graph order (node names carry Keras' counters)
        return [numpy_helper.to_array(tensor) for tensor in onnx.load(str(path)).graph.initializer]

    first = extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW)).cache_dir
    graph = (first / int8.MODEL_FILE).read_bytes()
    original = weights_and_ranges(first / int8.MODEL_FILE)
    write_image(data / "a" / "new.png", seed=4242)
    again = extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW))
    assert again.cache_dir == first and again.new == 1
    assert (first / int8.MODEL_FILE).read_bytes() == graph  # loaded, not calibrated again
    (first / int8.MODEL_FILE).unlink()  # lost: quantised again from the recorded images, the same quantisation
    write_image(data / "b" / "newer.png", seed=4243)
    assert extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW)).new == 1
    again = weights_and_ranges(first / int8.MODEL_FILE)
    assert len(again) == len(original) and all(np.array_equal(a, b) for a, b in zip(original, again))


def test_a_calibration_killed_halfway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "data", per_class=30, classes=("a", "b"))
    real = int8.quantise

    def killed(float_path, target, batches):  # noqa: ANN001, ANN202
        next(iter(batches))
        raise KeyboardInterrupt

    monkeypatch.setattr(int8, "quantise", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW))
    leftovers = [p for p in (tmp_path / "features").rglob("*") if "int8" in p.name or p.suffix == ".onnx"]
    assert not [p for p in leftovers if p.is_file()]
    monkeypatch.setattr(int8, "quantise", real)
    summary = extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW))
    assert (summary.cache_dir / int8.MODEL_FILE).is_file() and summary.new == 60


@pytest.mark.parametrize("overrides, message", [
    ({"engine": "ray"}, "--engine local"),
])
def test_int8_where_it_cannot_run_is_one_line(tmp_path: Path, overrides: dict, message: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=20, classes=("a", "b"))
    with pytest.raises(PipelineError, match=message):
        extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW, **overrides))


def test_too_few_images_to_calibrate_says_how_many(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, classes=("a", "b"))
    code = main(["extract", "--data", str(data), "--cache", str(tmp_path / "features"), "--backbone", "vgg16",
                 "--image-size", "32", "--weights", "none", "--precision", "int8", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and f"at least {int8.MIN_CALIBRATION}" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "features").glob("*/shard-*"))


def test_a_backbone_that_failed_its_certificate_is_not_offered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(int8, "certificate", lambda: {"vgg16:32": {"passed": False, "seeds": 5,
                                                                   "accuracy_drop_points": 1.2,
                                                                   "agreement_percent": 97.0}})
    data = make_image_folder(tmp_path / "data", per_class=20, classes=("a", "b"))
    with pytest.raises(PipelineError, match=r"not offered in int8.*1\.2 points.*97\.0%.*--precision bf16 or fp32"):
        extract_features(tiny_options(data, tmp_path / "features", precision="int8", layers=SHALLOW))


def test_a_cpu_without_int8_instructions_is_told_what_to_expect(monkeypatch) -> None:
    monkeypatch.setattr(int8, "cpu_int8_instructions", lambda: [])
    monkeypatch.setattr(int8, "certificate", lambda: {"vgg16:150": {"passed": True, "speedup_vs_fp32": 3.7}})
    notes = int8.check_offered("vgg16", 150)
    assert len(notes) == 1 and "no int8 instructions" in notes[0] and "3.7x" in notes[0]
    monkeypatch.setattr(int8, "cpu_int8_instructions", lambda: ["avx512_vnni"])
    assert int8.check_offered("vgg16", 150) == []


def test_the_fingerprint_tells_runtimes_and_float_caches_apart(int8_cache: dict) -> None:
    f = FeatureStore(int8_cache["cache"]).fingerprint
    other_runtime = dataclasses.replace(f, backend="onnxruntime-0.1")
    assert other_runtime.digest() != f.digest()
    assert FeatureStore(int8_cache["fp32"]).fingerprint.digest() != f.digest()
    assert "calibration" not in FeatureStore(int8_cache["fp32"]).fingerprint.as_dict()  # float digests unchanged


def test_a_head_trains_on_int8_features(int8_cache: dict) -> None:
    import pipeline

    run = pipeline.train_head(int8_cache["cache"], models=int8_cache["root"] / "models", c_grid="1e-2:1e1:4",
                              progress=False)
    assert run.fingerprint.precision == "int8" and 0 <= run.metrics["test"]["accuracy"] <= 1


def test_int8_on_the_jax_backend_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    data = make_image_folder(tmp_path / "data", per_class=20, classes=("a", "b"))
    done = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "extract", "--data", str(data), "--cache",
                           str(tmp_path / "features"), "--image-size", "32", "--weights", "none", "--backend", "jax",
                           "--precision", "int8", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "--backend tensorflow" in last and "int8" in last
