"""Weights: the converted torchvision VGG16 is really ImageNet-trained; the loader is safe."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import keras
import numpy as np
import pytest
import sklearn
import tensorflow as tf

from pipeline.backbone.network import FeatureExtractor, build_backbone, preprocess
from pipeline.backbone.registry import get_backbone
from pipeline.backbone.weights import converted_vgg16_path, load_numpy_pickle
from pipeline.errors import PipelineError

PHOTOS = Path(sklearn.__file__).parent / "datasets" / "images"  # two real photos shipped by scikit-learn


def _three_views(name: str) -> list[tf.Tensor]:
    image = tf.io.decode_jpeg(tf.io.read_file(str(PHOTOS / name)), channels=3)
    h, w = image.shape[:2]
    crops = [image[: h * 3 // 4, : w * 3 // 4], image[h // 4 :, w // 4 :],
             tf.image.flip_left_right(image[h // 8 :, : w * 7 // 8])]
    return [tf.image.resize(crop, (112, 112), antialias=True) for crop in crops]


def _similarity_gap(weights_choice: str) -> float:
    """min cosine similarity between views of one photo minus max similarity across photos."""
    spec = get_backbone("vgg16")
    weights = spec.resolve_weights(weights_choice)
    extractor = FeatureExtractor(build_backbone(spec, 112, "fp32", weights), ["block5_conv3"], "avg")
    images = tf.stack(_three_views("china.jpg") + _three_views("flower.jpg"))
    features = extractor(preprocess(images, weights.preprocessing))["block5_conv3"]
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    similarity = features @ features.T
    same = [similarity[i, j] for i in range(6) for j in range(i + 1, 6) if (i < 3) == (j < 3)]
    across = [similarity[i, j] for i in range(3) for j in range(3, 6)]
    return float(min(same) - max(across))


def test_converted_vgg16_is_imagenet_trained() -> None:
    imagenet_gap = _similarity_gap("imagenet")
    random_gap = _similarity_gap("none")
    # Measured: about 0.45 with ImageNet weights, about 0.003 with random ones.
    assert imagenet_gap > 0.3
    assert random_gap < 0.05


def test_conversion_happens_once_and_is_checksummed() -> None:
    path = converted_vgg16_path()
    stamp = path.stat().st_mtime_ns
    spec = get_backbone("vgg16")
    first = spec.resolve_weights("imagenet")
    second = get_backbone("vgg16").resolve_weights("torchvision")
    assert first == second and first.preprocessing == "torch" and first.path == path
    assert path.stat().st_mtime_ns == stamp  # reused, not converted again
    sidecar = json.loads(path.with_name(path.name.replace(".weights.h5", ".json")).read_text())
    assert sidecar["sha256"] == first.identity


def test_damaged_converted_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    path = converted_vgg16_path()
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\x00damage\x00")
    spec = get_backbone("vgg16")
    with pytest.raises(PipelineError, match="checksum"):
        spec.resolve_weights("imagenet")


@pytest.mark.parametrize("damage", ["not json", "no checksum", "a fifo"])
def test_a_damaged_or_hostile_weights_sidecar_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         damage: str) -> None:
    from pipeline.backbone.weights import CONVERTED_VGG16_NAME

    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / f"{CONVERTED_VGG16_NAME}.weights.h5").write_bytes(b"weights")
    sidecar = tmp_path / f"{CONVERTED_VGG16_NAME}.json"
    if damage == "a fifo":
        os.mkfifo(sidecar)  # opening it to read would wait for a writer forever
    else:
        sidecar.write_text("{not json" if damage == "not json" else '{"source": "x"}')
    with pytest.raises(PipelineError, match="is damaged .*: delete it and .*weights.h5 to convert them again"):
        get_backbone("vgg16").resolve_weights("imagenet")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_unpickler_refuses_a_pickle_that_would_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    malicious = pickle.dumps({"VGG16_0": _RunsCode()})
    with pytest.raises(PipelineError, match="refusing to load global"):
        load_numpy_pickle(malicious)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_unpickler_loads_numpy_arrays() -> None:
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.ones(2)]}
    loaded = load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(loaded["a"]["kernel"], tree["a"]["kernel"])
    np.testing.assert_array_equal(loaded["b"][0], tree["b"][0])


def test_resnet50_without_weights_says_how_to_provide_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))

    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    spec = get_backbone("resnet50")
    with pytest.raises(PipelineError, match="--weights PATH"):
        spec.resolve_weights("imagenet")


def test_a_weights_file_declaring_more_than_the_backbone_holds_is_refused_before_reading(tmp_path: Path) -> None:
    """An HDF5 dataset can declare 2 GiB and store nothing; reading it would allocate it all."""
    import h5py

    spec = get_backbone("vgg16")
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16.weights.h5"
    donor.save_weights(path)
    with h5py.File(path, "a") as handle:
        handle.create_dataset("layers/block1_conv1/vars/huge", shape=(1 << 29,), dtype="float32")  # nothing stored
    assert path.stat().st_size < 100 << 20
    weights = spec.resolve_weights(str(path))
    with pytest.raises(PipelineError, match="declares shape .536870912,. .2 GiB as float32.*nothing was read"):
        build_backbone(spec, 32, "fp32", weights)


def test_resnet50_from_a_local_weights_file(tmp_path: Path) -> None:
    spec = get_backbone("resnet50")
    donor = tf.keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    donor.save_weights(tmp_path / "resnet50.weights.h5")
    weights = get_backbone("resnet50").resolve_weights(str(tmp_path / "resnet50.weights.h5"))
    model = build_backbone(spec, 32, "fp32", weights)
    assert weights.source == "file" and weights.preprocessing == "caffe"
    np.testing.assert_array_equal(model.get_layer("conv1_conv").get_weights()[0],
                                  donor.get_layer("conv1_conv").get_weights()[0])


def test_keras_imagenet_weights_are_taken_from_the_keras_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in Keras' own legacy .h5 layout, where keras.applications caches it."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    spec = get_backbone("resnet50")
    cached = tmp_path / "keras-home" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir(parents=True)
    donor = tf.keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    with h5py.File(cached, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, donor)

    weights = get_backbone("resnet50").resolve_weights("imagenet")
    model = build_backbone(spec, 32, "fp32", weights)

    assert (weights.source, weights.preprocessing, weights.path) == ("keras", "caffe", cached)
    np.testing.assert_array_equal(model.get_layer("conv5_block3_3_conv").get_weights()[0],
                                  donor.get_layer("conv5_block3_3_conv").get_weights()[0])


def test_kernels_are_left_undrawn_only_while_this_thread_constructs_a_backbone() -> None:
    """build_backbone replaces every kernel at once, so Keras' draws are skipped while it
    constructs (on JAX each kernel shape compiled a random-number program); another thread's
    layers, and layers built outside the scope, are drawn as usual; the network is the same."""
    import threading

    from pipeline.backbone.network import kernels_left_undrawn
    from pipeline.backbone.precision import dtype_policy
    from pipeline.backbone.weights import initialise_randomly

    def kernel() -> np.ndarray:
        layer = keras.layers.Dense(8)
        layer.build((None, 16))
        return np.asarray(layer.kernel)

    elsewhere: list[np.ndarray] = []
    with kernels_left_undrawn():
        assert not kernel().any()
        other = threading.Thread(target=lambda: elsewhere.append(kernel()))
        other.start()
        other.join()
        with kernels_left_undrawn():  # nested: still undrawn, and still after the inner one ends
            assert not kernel().any()
        assert not kernel().any()
    assert elsewhere[0].any() and kernel().any()
    spec = get_backbone("vgg16")
    built = build_backbone(spec, 32, "bf16", spec.resolve_weights("none"))
    with dtype_policy("bf16"):
        reference = spec.constructor(include_top=False, weights=None, input_shape=(32, 32, 3))
    initialise_randomly(reference)
    assert str(built.weights[0].dtype) == "bfloat16" and any(np.asarray(v).any() for v in built.weights)
    for ours, theirs in zip(built.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours).astype(np.float32), np.asarray(theirs).astype(np.float32))
