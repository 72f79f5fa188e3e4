"""Stage one as a user sees it: a folder in, a cache out, reused and updated incrementally."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf

from commandline import in_process, one_error_line
from conftest import assert_features_close, make_image_folder, tiny_options, train_test_folder, write_image
from pipeline import artefacts
from pipeline.backbone import network as backbones
from pipeline.backbone.network import build_backbone
from pipeline.backbone.registry import get_backbone
from pipeline.cache import store
from pipeline.cache.store import FeatureStore, shard_paths
from pipeline.cli import main
from pipeline.data.dataset import SplitConfig, scan_dataset
from pipeline.errors import PipelineError
from pipeline.extraction import extract
from pipeline.extraction.extract import extract_features


def _forbid_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built although the cache holds every image")

    monkeypatch.setattr(extract, "build_backbone", refuse)
    monkeypatch.setattr(extract, "take_kept_extractor", refuse)  # nor an earlier extract's taken


def _by_path(store: FeatureStore) -> dict[str, np.ndarray]:
    everything = store.read()
    layer = store.layers[0]
    return dict(zip(everything.paths, everything.features[layer]))


def test_the_next_extract_of_the_same_backbone_reuses_the_kept_extractor(tmp_path: Path, monkeypatch) -> None:
    """A process keeps the extractor its last extract built: the next extract of the same backbone
    (another folder here) builds none and gives the features a fresh build gives; other settings
    build their own; an extract running holds it alone (taken out, put back when it ends)."""
    from pipeline.backbone import network

    network.forget_kept_extractor()
    built: list[int] = []
    original = extract.build_backbone

    def counting(*args, **kwargs):  # noqa: ANN202 - build_backbone's own signature
        built.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(extract, "build_backbone", counting)
    first = make_image_folder(tmp_path / "first", per_class=3)
    second = make_image_folder(tmp_path / "second", per_class=4, seed=1)
    extract_features(tiny_options(first, tmp_path / "cache"))
    again = extract_features(tiny_options(second, tmp_path / "cache"))
    assert built == [32], "the second folder's extract built no backbone"
    assert (again.new, again.backbone_images) == (8, 8)  # its own pass, counted from its own start
    network.forget_kept_extractor()
    fresh = extract_features(tiny_options(second, tmp_path / "fresh"))
    assert built == [32, 32]
    kept, rebuilt = _by_path(FeatureStore(again.cache_dir)), _by_path(FeatureStore(fresh.cache_dir))
    assert kept.keys() == rebuilt.keys()
    for path in kept:
        np.testing.assert_array_equal(kept[path], rebuilt[path])
    extract_features(tiny_options(first, tmp_path / "cache", image_size=48))
    assert built == [32, 32, 48], "another size is another network"

    run = extract._Extraction(tiny_options(first, tmp_path / "other", image_size=48))
    taken = run.feature_extractor()
    assert network.take_kept_extractor(run.extractor_key) is None, "while a run holds it, no one else gets it"
    run._keep_extractor()
    assert network.take_kept_extractor(run.extractor_key) is taken


def test_cache_holds_every_image_with_labels_splits_and_features(image_folder: Path, tmp_path: Path) -> None:
    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    store = FeatureStore(summary.cache_dir)
    everything = store.read()
    assert summary.images == summary.new == summary.backbone_images == 12
    assert store.class_names == ["cats", "dogs"]
    assert sorted(everything.paths) == sorted(p.relative_to(image_folder).as_posix()
                                              for p in image_folder.rglob("*.png"))
    assert everything.features["block5_pool"].shape == (12, 1, 1, 512)
    for path, label in zip(everything.paths, everything.labels):
        assert store.class_names[label] == path.split("/")[0]
    split_sizes = [len(store.read(split).paths) for split in ("train", "validation", "test")]
    assert sum(split_sizes) == 12 and min(split_sizes) >= 1
    assert len(shard_paths(summary.cache_dir)) == 2  # 12 rows, 8 per shard


def test_cached_features_equal_the_backbones_direct_output(image_folder: Path, tmp_path: Path) -> None:
    options = tiny_options(image_folder, tmp_path / "cache", pooling="avg", layers=["block4_pool", "block5_conv3"])
    store = FeatureStore(extract_features(options).cache_dir)
    cached = store.read()

    spec = get_backbone("vgg16")
    weights = spec.resolve_weights("none")
    model = build_backbone(spec, 32, "fp32", weights)
    probe = tf.keras.Model(model.input, [model.get_layer("block4_pool").output, model.get_layer("block5_conv3").output])
    images = []
    for path in cached.paths:  # decoded and preprocessed here by hand, torch-style
        pixels = tf.io.decode_png(tf.io.read_file(str(image_folder / path)), channels=3)
        resized = tf.image.resize(pixels, (32, 32), method="area")  # 40 px shrinks: area
        images.append((resized.numpy() / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    block4, block5 = probe(np.stack(images).astype(np.float32), training=False)

    np.testing.assert_allclose(cached.features["block4_pool"], block4.numpy().mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached.features["block5_conv3"], block5.numpy().mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_second_run_makes_no_backbone_pass(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    before = _by_path(FeatureStore(first.cache_dir))
    _forbid_backbone(monkeypatch)

    second = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    assert (second.new, second.reused, second.backbone_batches, second.backbone_images) == (0, 12, 0, 0)
    assert second.cache_dir == first.cache_dir
    after = _by_path(FeatureStore(second.cache_dir))
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[p], before[p]) for p in before)  # exact: kept rows are never recomputed


def test_added_images_alone_go_through_the_backbone(image_folder: Path, tmp_path: Path) -> None:
    extract_features(tiny_options(image_folder, tmp_path / "cache"))
    write_image(image_folder / "cats" / "new1.png", seed=991)
    write_image(image_folder / "dogs" / "new2.png", seed=992)

    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    assert (summary.new, summary.backbone_images, summary.reused, summary.images) == (2, 2, 12, 14)
    assert {"cats/new1.png", "dogs/new2.png"} <= set(FeatureStore(summary.cache_dir).read().paths)


def test_changed_bytes_are_extracted_again(image_folder: Path, tmp_path: Path) -> None:
    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    before = _by_path(FeatureStore(first.cache_dir))
    write_image(image_folder / "cats" / "img002.png", seed=4242)  # same name, other bytes

    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    assert (summary.new, summary.backbone_images, summary.images) == (1, 1, 12)
    after = _by_path(FeatureStore(summary.cache_dir))
    assert not np.array_equal(after["cats/img002.png"], before["cats/img002.png"])
    assert all(np.array_equal(after[p], before[p]) for p in before if p != "cats/img002.png")  # exact: kept, copied


def test_removed_image_drops_out_of_what_a_reader_returns(image_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    extract_features(tiny_options(image_folder, tmp_path / "cache"))
    (image_folder / "dogs" / "img001.png").unlink()
    _forbid_backbone(monkeypatch)

    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    store = FeatureStore(summary.cache_dir)
    assert summary.images == 11 and summary.new == 0
    assert "dogs/img001.png" not in store.read().paths
    assert sum(store.manifest["counts"].values()) == 11


def test_renamed_image_and_new_class_reuse_cached_features(image_folder: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    before = _by_path(FeatureStore(first.cache_dir))
    (image_folder / "cats" / "img000.png").rename(image_folder / "cats" / "renamed.png")
    (image_folder / "ants").mkdir()  # a new first class shifts every label
    (image_folder / "dogs" / "img003.png").rename(image_folder / "ants" / "img003.png")
    _forbid_backbone(monkeypatch)

    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    store = FeatureStore(summary.cache_dir)
    everything = store.read()
    assert summary.new == 0 and summary.images == 12
    assert store.class_names == ["ants", "cats", "dogs"]
    for path, label in zip(everything.paths, everything.labels):
        assert store.class_names[label] == path.split("/")[0]
    after = dict(zip(everything.paths, everything.features["block5_pool"]))
    # exact: a renamed or relabelled image's row is copied by hash, not recomputed
    assert np.array_equal(after["cats/renamed.png"], before["cats/img000.png"])
    assert np.array_equal(after["ants/img003.png"], before["dogs/img003.png"])


@pytest.mark.parametrize("change", [
    {"image_size": 48},
    {"pooling": "avg"},
    {"precision": "bf16"},
    {"layers": ["block4_pool"]},
    {"backbone": "resnet50"},
    {"weights": "FILE"},
])
def test_another_fingerprint_never_reuses_a_cache(image_folder: Path, tmp_path: Path, change: dict) -> None:
    if change.get("weights") == "FILE":  # other weights, same architecture, from a file
        model = tf.keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
        change = {"weights": str(tmp_path / "other.weights.h5"), "preprocessing": "torch"}
        model.save_weights(change["weights"])
    base = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    other = extract_features(tiny_options(image_folder, tmp_path / "cache", **change))

    assert other.cache_dir != base.cache_dir
    assert other.new == other.backbone_images == 12 and other.reused == 0
    assert FeatureStore(base.cache_dir).fingerprint != FeatureStore(other.cache_dir).fingerprint
    # A shard carried over by hand into the other cache is refused, never mixed in.
    stray = shard_paths(base.cache_dir)[0]
    (other.cache_dir / "shard-09999.h5").write_bytes(stray.read_bytes())
    with pytest.raises(PipelineError, match="another feature fingerprint"):
        extract_features(tiny_options(image_folder, tmp_path / "cache", **change))


def test_resnet50_batchnorm_runs_in_inference_mode(image_folder: Path, tmp_path: Path) -> None:
    spec = get_backbone("resnet50")
    weights = spec.resolve_weights("none")
    model = build_backbone(spec, 32, "fp32", weights)
    bn = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    rng = np.random.default_rng(1)
    for layer in bn:  # moving statistics far from what a batch would give
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([gamma, beta, rng.normal(size=mean.shape) * 3, rng.uniform(2, 5, size=variance.shape)])
    model.trainable = True  # worst case: even an unfrozen backbone must extract in inference mode
    moving_before = [np.array(layer.moving_mean) for layer in bn]
    extractor = backbones.FeatureExtractor(model, ["conv5_block3_out"], "avg")
    images = tf.constant(rng.normal(size=(4, 32, 32, 3)).astype(np.float32))

    features = extractor(images)["conv5_block3_out"]

    for layer, before in zip(bn, moving_before):
        np.testing.assert_array_equal(np.array(layer.moving_mean), before)
    inference = model(images, training=False).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(features, inference, rtol=1e-4, atol=1e-5)
    batch_statistics = model(images, training=True).numpy().mean(axis=(1, 2))
    assert not np.allclose(features, batch_statistics, rtol=1e-2, atol=1e-3)


def test_resnet50_extract_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    summary = extract_features(tiny_options(image_folder, tmp_path / "cache", backbone="resnet50", pooling="avg"))
    store = FeatureStore(summary.cache_dir)
    assert store.read().features["conv5_block3_out"].shape == (12, 2048)
    assert store.manifest["weights"]["pretrained"] is False
    assert "random initialisation" in store.manifest["weights"]["note"]


def test_undecodable_files_are_skipped_and_listed(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "cats" / "empty.png").write_bytes(b"")
    (image_folder / "dogs" / "text.jpg").write_text("not a picture")

    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    again = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    reasons = {item["path"]: item["reason"] for item in summary.skipped}
    assert reasons == {"cats/empty.png": "empty file",
                       "dogs/text.jpg": "TensorFlow cannot decode it (corrupt, truncated or not an image)"}
    assert "cannot decode" in reasons["dogs/text.jpg"]
    assert summary.images == 12 and summary.new == 12
    assert again.backbone_batches == 0 and len(again.skipped) == 2
    assert len(FeatureStore(summary.cache_dir).manifest["skipped"]) == 2


def test_unknown_layer_is_a_clear_error_and_leaves_no_cache(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no layer block9_pool"):
        extract_features(tiny_options(image_folder, tmp_path / "cache", layers=["block9_pool"]))
    assert not any((tmp_path / "cache").glob("*/shard-*"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_grayscale_and_rgba_images_become_rgb(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(3):
        write_image(data / "gray" / f"g{i}.png", seed=i, channels=1)
        write_image(data / "rgba" / f"a{i}.png", seed=10 + i, channels=4)
        write_image(data / "jpeg" / f"j{i}.jpg", seed=20 + i, fmt="jpeg")
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert summary.images == 9 and not summary.skipped


def test_split_folders_are_taken_as_given(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=4)
    make_image_folder(data / "val", per_class=2, seed=1)
    make_image_folder(data / "test", per_class=2, seed=2)
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    store = FeatureStore(summary.cache_dir)
    assert store.manifest["counts"] == {"train": 8, "validation": 4, "test": 4}
    assert all(p.startswith("val/") for p in store.read("validation").paths)


def test_a_second_writer_on_the_same_cache_stops_with_a_message(image_folder: Path, tmp_path: Path) -> None:
    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    write_image(image_folder / "cats" / "late.png", seed=77)
    with store.exclusive_lock(first.cache_dir):  # as if another extract were running
        with pytest.raises(PipelineError, match="another extract is writing"):
            extract_features(tiny_options(image_folder, tmp_path / "cache"))
    assert extract_features(tiny_options(image_folder, tmp_path / "cache")).new == 1


def test_a_damaged_manifest_is_rewritten_by_the_next_extract(image_folder: Path, tmp_path: Path) -> None:
    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    (first.cache_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(PipelineError, match="manifest.json is damaged"):
        FeatureStore(first.cache_dir)
    again = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    assert again.new == 0 and len(FeatureStore(first.cache_dir).read().paths) == 12


def test_a_damaged_shard_is_named_with_the_way_out(image_folder: Path, tmp_path: Path) -> None:
    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    shard = shard_paths(first.cache_dir)[0]
    shard.write_bytes(shard.read_bytes()[:2000])  # truncated by hand
    with pytest.raises(PipelineError, match=f"{shard.name} is damaged.*delete it and rerun extract"):
        extract_features(tiny_options(image_folder, tmp_path / "cache"))
    shard.unlink()
    assert extract_features(tiny_options(image_folder, tmp_path / "cache")).new == 8


def test_bmp_and_the_first_frame_of_an_animated_gif(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    data = tmp_path / "data"
    (data / "gif").mkdir(parents=True)
    (data / "png").mkdir()
    (data / "bmp").mkdir()
    frames[0].save(data / "gif" / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].convert("RGB").save(data / "png" / "first.png")  # the GIF's first frame, losslessly
    frames[1].convert("RGB").save(data / "png" / "second.png")
    frames[0].convert("RGB").save(data / "bmp" / "first.BMP")

    summary = extract_features(tiny_options(data, tmp_path / "cache"))

    assert summary.images == 4 and not summary.skipped
    features = _by_path(FeatureStore(summary.cache_dir))
    np.testing.assert_allclose(features["gif/anim.gif"], features["png/first.png"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features["bmp/first.BMP"], features["png/first.png"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(features["gif/anim.gif"], features["png/second.png"])


def test_rescan_of_an_unchanged_folder_reads_no_image_bytes(image_folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:


    for path in image_folder.rglob("*.png"):  # older than the racy window
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    extract_features(tiny_options(image_folder, tmp_path / "cache"))
    read = []
    original = artefacts.file_sha256
    monkeypatch.setattr(artefacts, "file_sha256", lambda path: read.append(path) or original(path))

    unchanged = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    assert read == [] and unchanged.new == 0

    write_image(image_folder / "cats" / "img004.png", seed=31337)  # new bytes, new mtime
    changed = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    assert [p.name for p in read] == ["img004.png"] and changed.new == 1

    read.clear()
    forced = extract_features(tiny_options(image_folder, tmp_path / "cache", rehash=True))
    assert len(read) == 12 and forced.new == 0


def test_a_copied_data_folder_reuses_the_features_of_the_first(image_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:

    first = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    copy = tmp_path / "copy-of-data"
    shutil.copytree(image_folder, copy)
    write_image(copy / "dogs" / "only-here.png", seed=4040)
    before = _by_path(FeatureStore(first.cache_dir))

    second = extract_features(tiny_options(copy, tmp_path / "cache"))

    assert second.cache_dir != first.cache_dir
    assert (second.new, second.backbone_images, second.reused) == (1, 1, 12)
    after = _by_path(FeatureStore(second.cache_dir))
    assert all(np.array_equal(after[p], before[p]) for p in before)  # exact: copied from the sibling cache


def _rows_by_path(cache: Path) -> dict[str, tuple[str, np.ndarray]]:
    rows = {}
    for shard in store.shard_paths(cache):
        with h5py.File(shard, "r") as handle:
            for path, digest, values in zip(handle["paths"][()], handle["sha256"][()],
                                            handle["features/block5_pool"][()]):
                rows[path.decode()] = (digest.decode(), values)
    return rows


def test_an_image_overwritten_between_scan_and_decode_gets_the_hash_of_the_bytes_decoded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    victim = data / "cats" / "img001.png"
    old_bytes = victim.read_bytes()
    new_bytes = write_image(tmp_path / "other.png", seed=999).read_bytes()
    reference = extract_features(tiny_options(data, tmp_path / "reference")).cache_dir
    old_features = _rows_by_path(reference)["cats/img001.png"][1]

    import pipeline.extraction.extract as extract_module

    real_scan = extract_module.scan_dataset

    def scan_then_overwrite(*args, **kwargs):
        scanned = real_scan(*args, **kwargs)
        victim.write_bytes(new_bytes)  # after the scan hashed the old bytes, before the decode
        return scanned

    monkeypatch.setattr(extract_module, "scan_dataset", scan_then_overwrite)
    cache = extract_features(tiny_options(data, tmp_path / "cache")).cache_dir
    monkeypatch.undo()
    digest, features = _rows_by_path(cache)["cats/img001.png"]
    assert digest == hashlib.sha256(new_bytes).hexdigest(), "the row records the bytes it was computed from"
    new_features = _rows_by_path(extract_features(tiny_options(data, tmp_path / "fresh")).cache_dir)[
        "cats/img001.png"][1]
    assert_features_close(features, new_features)  # computed beside other images: see conftest

    victim.write_bytes(old_bytes)  # the old bytes come back: that image must be extracted again
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert summary.new == 1
    digest, features = _rows_by_path(cache)["cats/img001.png"]
    assert digest == hashlib.sha256(old_bytes).hexdigest()
    assert_features_close(features, old_features)  # a batch of one now, of four before


def test_resource_failures_are_errors_not_skipped_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    import pipeline.images.decode_tf as images_module

    data = make_image_folder(tmp_path / "data", per_class=4)
    victim = hashlib.sha256((data / "dogs" / "img002.png").read_bytes()).hexdigest()
    real = images_module.decode_bytes_and_resize

    def exhausting(encoded, size):
        def check(value):
            if hashlib.sha256(value.numpy()).hexdigest() == victim:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return np.int32(0)

        done = tf.py_function(check, [encoded], tf.int32)
        with tf.control_dependencies([done]):
            return real(encoded, size)

    monkeypatch.setattr(images_module, "decode_bytes_and_resize", exhausting)
    with pytest.raises(PipelineError, match="lack of resources"):
        extract_features(tiny_options(data, tmp_path / "cache"))
    monkeypatch.undo()
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    assert manifest["skipped"] == [] and manifest["counts"]["train"] + manifest["counts"]["validation"] + \
        manifest["counts"]["test"] == 7
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert (summary.new, summary.images, summary.skipped) == (1, 8, [])


def test_image_size_and_pixel_count_are_bounded(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    line = one_error_line(in_process(capsys, "extract", "--data", str(data), "--cache", str(tmp_path / "c"),
                                     "--weights", "none",
                                "--image-size", "100000", "--no-progress"))
    assert "--image-size 100000" in line
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    write_image(data / "cats" / "big.png", seed=5, size=1200)
    result = in_process(capsys, "extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none",
                  "--image-size", "32", "--precision", "fp32", "--no-progress", "--max-megapixels", "1")
    line = one_error_line(result)
    assert "big.png is 1200 x 1200 pixels" in line and "--max-megapixels" in line
    manifest = json.loads(next((tmp_path / "c").glob("*/manifest.json")).read_text())
    assert sum(manifest["counts"].values()) == 6 and manifest["skipped"] == []
    result = in_process(capsys, "extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none",
                  "--image-size", "32", "--precision", "fp32", "--no-progress")
    assert result.returncode == 0 and "1 new, 6 reused" in result.stdout


def test_a_cache_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    with pytest.raises(PipelineError, match="inside the data folder"):
        extract_features(tiny_options(data, data / "features"))
    assert not (data / "features").exists()


def test_extract_says_where_validation_came_from_and_that_the_images_are_small(tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    from pipeline.extraction.local_engine import LocalEngine

    root = train_test_folder(tmp_path / "data", train=12, test=2, size=8)
    said_before_the_backbone = []
    original = LocalEngine.run

    def run(self, *args, **kwargs):  # noqa: ANN202 - the engine's own signature
        said_before_the_backbone.append(capsys.readouterr().err)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LocalEngine, "run", run)
    assert main(["extract", "--data", str(root), "--cache", str(tmp_path / "c"), "--weights", "none",
                 "--image-size", "64", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "note: no validation folder: validation is 15% of each class's train/ images" in out
    note = "about 8 px on their shorter side and the input is 64 px: each is enlarged 8.0x"
    assert note in out and "for vgg16 try --image-size 32 --layer block4_pool --pooling avg (measured" in out
    assert "docs/commands.md: Small images" in out
    speed = next(line for line in out.splitlines() if line.startswith("  speed:"))
    assert "images/s by wall clock" in speed and "in the extraction loop" in speed and "progress bar" in speed
    assert note in said_before_the_backbone[0], "the note comes before the backbone pass, not after it"
    manifest = json.loads(next((tmp_path / "c").glob("*/manifest.json")).read_text())
    assert manifest["dataset"]["split"]["carved_from_train"] == {"validation": 0.15}
    assert manifest["counts"]["validation"] >= 2, "train-head has a validation split to choose on"


def test_images_near_the_input_size_get_no_small_image_note(tmp_path: Path) -> None:
    from pipeline.backbone.registry import get_backbone
    from pipeline.extraction.extract import small_image_note

    root = train_test_folder(tmp_path / "data", train=4, test=1, size=40)
    scanned = scan_dataset(root, SplitConfig.from_flags(None, None, 0))
    assert small_image_note(scanned, 64, get_backbone("vgg16")) is None
    assert "enlarged 3.8x" in small_image_note(scanned, 150, get_backbone("vgg16"))


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "efficientnet_lite0", "efficientnet_lite2"])
def test_the_small_image_advice_does_not_fire_on_its_own_recipe(tmp_path: Path, backbone: str) -> None:
    """28 px images at each backbone's default size get a note with the backbone's measured
    advice; extracting as it says gets none."""
    import re

    from pipeline.backbone.registry import get_backbone
    from pipeline.errors import speak_as_command_line
    from pipeline.extraction.extract import small_image_note

    spec = get_backbone(backbone)
    root = train_test_folder(tmp_path / "data", train=4, test=1, size=28)
    scanned = scan_dataset(root, SplitConfig.from_flags(None, None, 0))
    speak_as_command_line()  # the note as the command line says it (Python's words: tests/test_newcomer_three.py)
    try:
        note = small_image_note(scanned, spec.default_image_size, spec)
    finally:
        speak_as_command_line(False)
    advised = int(re.search(r"try --image-size (\d+)", note).group(1))
    assert advised < spec.default_image_size and ("measured" in note)
    assert small_image_note(scanned, advised, spec) is None
    if backbone == "vgg16":
        assert advised == 64 and "--layer block4_pool --pooling avg" in note
    if backbone.startswith("efficientnet_lite"):
        assert "try --image-size 128 (measured" in note, "Lite's measured best kept its default layers at 128 px"


def test_an_interrupted_first_extract_donates_its_shards_to_the_next(tmp_path: Path) -> None:

    from conftest import make_image_folder

    first = make_image_folder(tmp_path / "first", per_class=6)
    summary = extract_features(tiny_options(first, tmp_path / "c"))
    (summary.cache_dir / "manifest.json").unlink()  # as if killed before its manifest was written
    second = tmp_path / "second"
    shutil.copytree(first, second)
    again = extract_features(tiny_options(second, tmp_path / "c"))
    assert (again.new, again.reused) == (0, 12), "every image's features were copied, none recomputed"


def test_the_same_bytes_under_two_classes_are_listed_and_said(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    shutil.copy(data / "cats" / "img001.png", data / "dogs" / "copy-of-a-cat.png")
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    [note] = [n for n in summary.notes if "same bytes" in n]
    assert "cats/img001.png and dogs/copy-of-a-cat.png" in note
    manifest = json.loads((summary.cache_dir / "manifest.json").read_text())
    [clash] = manifest["same_bytes_in_several_classes"]
    assert clash["paths"] == ["cats/img001.png", "dogs/copy-of-a-cat.png"] and clash["classes"] == ["cats", "dogs"]
    assert len(clash["sha256"]) == 64
