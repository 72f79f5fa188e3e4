"""Real-world folders: unreadable and unusual images, odd folder structures, damaged caches and
runs, a full disk, Ctrl-C and two extracts at once. The pipeline reports what it could not use
and never loses or corrupts what it already computed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import ROOT, make_image_folder, tiny_options, write_image
from pipeline.cache import store
from pipeline.cache.store import FeatureStore, shard_paths
from pipeline.cli import main
from pipeline.data.dataset import scan_dataset
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.images.decode_tf import decode_and_resize


def _unreadable_files(folder: Path) -> dict[str, str]:
    """Every kind of file that looks like an image and is not one; returns path -> expected reason."""
    good_jpeg = tf.io.encode_jpeg(np.full((64, 64, 3), 120, np.uint8)).numpy()
    good_png = tf.io.encode_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).numpy()
    files = {
        "cats/zero.jpg": (b"", "empty file"),
        "cats/text.jpg": (b"this is a shopping list, not a photo\n", "cannot decode"),
        "cats/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "cannot decode"),
        "dogs/truncated.png": (good_png[: len(good_png) // 2], "cannot decode"),
        "dogs/random.png": (np.random.default_rng(1).bytes(5000), "cannot decode"),
    }
    for relative, (content, _) in files.items():
        (folder / relative).write_bytes(content)
    return {relative: reason for relative, (_, reason) in files.items()}


def test_unreadable_images_are_skipped_counted_and_listed(image_folder: Path, tmp_path: Path) -> None:
    expected = _unreadable_files(image_folder)
    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))

    reasons = {item["path"]: item["reason"] for item in summary.skipped}
    assert sorted(reasons) == sorted(expected)
    for path, reason in expected.items():
        assert reason in reasons[path]
    assert summary.images == 12 and summary.new == 12  # the 12 good images are all extracted
    manifest = FeatureStore(summary.cache_dir).manifest
    assert {s["path"] for s in manifest["skipped"]} == set(expected)
    assert len(FeatureStore(summary.cache_dir).read().paths) == 12


def test_the_cli_summary_lists_skipped_files(image_folder: Path, tmp_path: Path, capsys) -> None:
    _unreadable_files(image_folder)
    assert main(["extract", "--data", str(image_folder), "--cache", str(tmp_path / "c"), "--weights", "none",
                 "--image-size", "32", "--precision", "fp32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "12 images in cache" in out and "5 skipped" in out
    assert "skipped cats/zero.jpg: empty file" in out


def test_strict_stops_at_the_first_unreadable_file_and_keeps_what_was_done(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=12)
    (data / "dogs" / "img099.png").write_bytes(b"garbage")  # sorts last among dogs
    args = ["extract", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "none", "--image-size", "32",
            "--precision", "fp32", "--batch-size", "4", "--shard-size", "4", "--no-progress", "--strict"]
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "img099.png" in error and "--strict" in error and "so far are kept" in error
    directory = next((tmp_path / "c").iterdir())
    kept = sum(len(h5py.File(p, "r")["paths"]) for p in shard_paths(directory))
    assert kept == 24  # every decodable image was written before the error

    (data / "dogs" / "img099.png").unlink()
    assert main(args) == 0
    assert "0 new, 24 reused" in capsys.readouterr().out


def test_strict_also_fails_on_a_file_skipped_by_an_earlier_run(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "cats" / "bad.png").write_bytes(b"")
    extract_features(tiny_options(image_folder, tmp_path / "cache"))
    with pytest.raises(PipelineError, match="bad.png: empty file"):
        extract_features(tiny_options(image_folder, tmp_path / "cache", strict=True))


def _unusual_images(folder: Path) -> dict[str, np.ndarray]:
    """Valid but unusual images, each with the RGB pixels Pillow sees (EXIF orientation not applied)."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    smooth = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    images = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).quantize(64),
        "sixteen.png": Image.fromarray(rgb[..., 1].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(smooth).convert("CMYK"),
        "exif-rotated.jpg": Image.fromarray(smooth),
        "one-pixel.png": Image.fromarray(rgb[:1, :1]),
        "animated.gif": Image.fromarray(rgb).convert("P"),
    }
    references = {}
    for name, image in images.items():
        path = folder / name
        if name == "exif-rotated.jpg":
            exif = image.getexif()
            exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
            image.save(path, exif=exif, quality=95)
        elif name == "animated.gif":
            second = Image.fromarray(255 - rgb).convert("P")
            image.save(path, save_all=True, append_images=[second], duration=100)
        elif name.endswith(".jpg"):
            image.save(path, quality=95)
        else:
            image.save(path)
        with Image.open(path) as reopened:
            reopened.seek(0)
            pixels = np.asarray(reopened.convert("RGB")) if reopened.mode != "I;16" else \
                np.repeat((np.asarray(reopened) // 257).astype(np.uint8)[..., None], 3, axis=-1)
        references[name] = pixels
    return references


def test_unusual_but_valid_images_are_extracted_and_decoded_as_pillow_sees_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "odd").mkdir(parents=True)
    references = _unusual_images(data / "odd")
    make_image_folder(data, per_class=3, classes=("plain",))
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert not summary.skipped and summary.images == len(references) + 3

    for name, reference in references.items():
        size = 16
        decoded = decode_and_resize(tf.constant(str(data / "odd" / name)), size).numpy()
        expected = tf.image.resize(reference.astype(np.float32), (size, size),
                                   method="area" if reference.shape[0] >= size else "bilinear").numpy()
        tolerance = 12 if name.endswith(".jpg") else 1.5  # decoders differ slightly on JPEG
        assert np.abs(decoded - expected).mean() < tolerance, name


def test_a_very_large_image_is_extracted_without_running_out_of_memory(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    big = np.kron(np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8), np.ones((1000, 1000, 1),
                                                                                               np.uint8))
    Image.fromarray(big).save(data / "cats" / "huge.jpg", quality=70)  # 10000 x 10000
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert not summary.skipped and summary.images == 7


def test_folder_structures(tmp_path: Path) -> None:
    """Nested folders are part of their class, hidden entries and non-images are ignored, links
    to files are read, links to folders (and loops) are not followed, any file name works,
    extensions are matched without case."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    write_image(data / "cats" / "2024" / "june" / "nested.png", seed=50)
    write_image(data / "cats" / "façade à l'été.png", seed=51)
    write_image(data / "dogs" / "with spaces  .png", seed=52)
    write_image(data / "dogs" / "UPPER.PNG", seed=53)
    write_image(data / "dogs" / "photo.JPEG", seed=54, fmt="jpeg")
    write_image(data / "dogs" / ".ipynb_checkpoints" / "hidden.png", seed=55)
    (data / "dogs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "dogs" / "notes.txt").write_text("shot on a phone")
    os.symlink(data / "cats" / "img000.png", data / "dogs" / "link-to-file.png")
    os.symlink(data / "cats", data / "dogs" / "link-to-folder")
    os.symlink(data / "dogs", data / "dogs" / "loop")
    os.symlink(data / "nowhere.png", data / "dogs" / "broken.png")

    scanned = scan_dataset(data)
    paths = sorted(r.path for r in scanned.records)
    assert "cats/2024/june/nested.png" in paths and "cats/façade à l'été.png" in paths
    assert {"dogs/with spaces  .png", "dogs/UPPER.PNG", "dogs/photo.JPEG", "dogs/link-to-file.png"} <= set(paths)
    assert not [p for p in paths if "hidden" in p or "link-to-folder" in p or "loop" in p]
    assert dict(scanned.ignored) == {"dogs/notes.txt": "not an image file extension", "dogs/broken.png": "broken link"}

    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    assert summary.images == len(paths) == 12 and not summary.skipped
    manifest = FeatureStore(summary.cache_dir).manifest
    assert {i["path"] for i in manifest["ignored"]} == {"dogs/notes.txt", "dogs/broken.png"}


def test_a_cache_written_by_a_newer_format_is_refused(image_folder: Path, tmp_path: Path) -> None:
    summary = extract_features(tiny_options(image_folder, tmp_path / "cache"))
    manifest_path = summary.cache_dir / store.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"format_version": store.FORMAT_VERSION + 1}))
    with pytest.raises(PipelineError, match="newer version of this pipeline"):
        FeatureStore(summary.cache_dir)
    manifest_path.write_text(json.dumps(manifest))
    with h5py.File(shard_paths(summary.cache_dir)[0], "a") as handle:
        handle.attrs["format_version"] = store.FORMAT_VERSION + 1
    with pytest.raises(PipelineError, match="newer version of this pipeline"):
        extract_features(tiny_options(image_folder, tmp_path / "cache"))


def test_a_full_disk_leaves_no_partial_shard_and_earlier_shards_intact(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "data", per_class=12)  # 24 images, shards of 8: three shards
    real_file = h5py.File
    opened = []

    def file_that_fills_the_disk(name, mode="r", *args, **kwargs):
        handle = real_file(name, mode, *args, **kwargs)
        if mode == "w":
            opened.append(name)
            if len(opened) == 2:  # the second shard: the disk is full
                handle.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return handle

    monkeypatch.setattr(h5py, "File", file_that_fills_the_disk)
    with pytest.raises(PipelineError, match="No space left on device.*rerun the same command to resume") as error:
        extract_features(tiny_options(data, tmp_path / "cache"))
    assert "\n" not in str(error.value)
    directory = next((tmp_path / "cache").iterdir())
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []
    assert [p.name for p in shard_paths(directory)] == ["shard-00000.h5"]
    with real_file(shard_paths(directory)[0], "r") as handle:
        assert len(handle["paths"]) == 8

    monkeypatch.setattr(h5py, "File", real_file)  # space freed
    resumed = extract_features(tiny_options(data, tmp_path / "cache"))
    assert resumed.reused == 8 and resumed.new == 16


def _extract_args(data: Path, cache: Path, *extra: str) -> list[str]:
    return ["extract", "--data", str(data), "--cache", str(cache), "--weights", "none", "--precision", "fp32",
            "--image-size", "64", "--batch-size", "4", "--shard-size", "4", "--no-progress", *extra]


def _extract_process(data: Path, cache: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "run_pipeline.py"), *_extract_args(data, cache, *extra)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _clean_features(data: Path, cache: Path) -> store.Rows:
    summary = extract_features(tiny_options(data, cache, image_size=64, batch_size=4, shard_size=4))
    return FeatureStore(summary.cache_dir).read()


def _same_features(a: store.Rows, b: store.Rows) -> None:
    order_a, order_b = np.argsort(a.paths), np.argsort(b.paths)
    assert [a.paths[i] for i in order_a] == [b.paths[i] for i in order_b]
    # exact: a resumed run feeds the backbone the same batches (shards hold whole batches)
    np.testing.assert_array_equal(a.features["block5_pool"][order_a], b.features["block5_pool"][order_b])


def test_ctrl_c_stops_after_the_current_batch_and_says_how_to_resume(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=40)  # 20 shards: time to interrupt it mid-run
    cache = tmp_path / "cache"
    process = _extract_process(data, cache, "--json")  # stdout stays for the JSON document alone
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache.glob("*/shard-*.h5"))) < 2 and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "stopping after the current batch" in err and out == "", "nothing on stdout from the signal handler"
    assert err.strip().splitlines()[-1] == "interrupted: finished shards are kept; rerun the same command to resume"
    assert "Traceback" not in err
    directory = next(cache.iterdir())
    done = sum(len(h5py.File(p, "r")["paths"]) for p in shard_paths(directory))
    assert 8 <= done < 80 and not list(directory.glob(".*.tmp"))

    resumed = extract_features(tiny_options(data, cache, image_size=64, batch_size=4, shard_size=4))
    assert resumed.reused == done and resumed.new == 80 - done
    _same_features(FeatureStore(resumed.cache_dir).read(), _clean_features(data, tmp_path / "clean"))


@pytest.mark.parametrize("seed", [1])  # three kills per seed; tests/test_interrupted.py kills extract too
def test_sigkill_at_random_points_then_rerun_equals_an_uninterrupted_run(tmp_path: Path, seed: int) -> None:
    data = make_image_folder(tmp_path / "data", per_class=40)
    cache = tmp_path / "cache"
    rng = np.random.default_rng(seed)
    landed = []
    for _ in range(3):  # killed three times at random moments, each rerun resuming the last
        before = set(cache.glob("*/shard-*.h5"))
        process = _extract_process(data, cache)
        started = time.monotonic()
        while (time.monotonic() - started < 120 and not set(cache.glob("*/shard-*.h5")) - before
               and process.poll() is None):
            time.sleep(0.005)  # until this run's backbone has written a shard: it is extracting
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        process.communicate()
        landed.append(process.returncode == -9 and bool(set(cache.glob("*/shard-*.h5")) - before))
    assert all(landed), f"every kill lands during extraction, not before or after it: {landed}"
    final = extract_features(tiny_options(data, cache, image_size=64, batch_size=4, shard_size=4))
    directory = final.cache_dir
    assert not list(directory.glob(".*.tmp"))
    for shard in shard_paths(directory):
        with h5py.File(shard, "r") as handle:
            assert len(handle["paths"]) == len(handle["features/block5_pool"]) > 0
    assert final.images == 80
    _same_features(FeatureStore(directory).read(), _clean_features(data, tmp_path / "clean"))


def test_two_extracts_at_once_on_the_same_cache(tmp_path: Path) -> None:
    """A second extract while another holds the cache's lock stops with a message and writes
    nothing; the lock is held by this test itself, so the two runs certainly overlap (the second
    runs in a process of its own: a lock is not taken against its own holder)."""
    from pipeline.cache.store import exclusive_lock

    data = make_image_folder(tmp_path / "data", per_class=4)
    cache = tmp_path / "cache"
    assert main(_extract_args(data, cache)) == 0  # the first extract, by this process
    directory = next(cache.iterdir())
    before = sorted(p.name for p in directory.iterdir())
    write_image(data / "cats" / "new.png", seed=77)
    with exclusive_lock(directory):  # "another extract" is writing
        second = _extract_process(data, cache)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1 and "another extract is writing" in err.strip().splitlines()[-1]
        assert sorted(p.name for p in directory.iterdir()) == before, "the refused run wrote nothing"
    assert main(_extract_args(data, cache)) == 0  # the lock released: the same command now runs
    rows = FeatureStore(directory).read()
    assert len(rows.paths) == len(set(rows.paths)) == 9  # nothing written twice or lost


def test_a_run_with_a_missing_or_damaged_file(tmp_path: Path, capsys) -> None:
    from pipeline.training.train import TrainOptions, run_training

    data = make_image_folder(tmp_path / "data", per_class=6)
    cache = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    run = run_training(TrainOptions(head="logreg", features=cache, models=tmp_path / "models",
                                    head_params={"c_grid": "0.1,1", "n_jobs": 1}, progress=False)).directory
    (run / "head.joblib").write_bytes(b"not a pickle")
    (run / "head.npz").unlink()
    assert main(["evaluate", "--model", str(run), "--features", str(cache)]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"error: {run / 'head.npz'} is missing: train the head again"  # the file, and the way out
    (run / "config.json").write_text("{")
    assert main(["predict", "--model", str(run), str(data / "cats" / "img000.png")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "config.json" in error


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    import keras

    from pipeline.backbone.network import build_backbone
    from pipeline.backbone.registry import BACKBONES, get_backbone

    path = tmp_path / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    weights = get_backbone("resnet50").resolve_weights(str(path))
    assert (weights.source, weights.path) == ("file", path)  # accepted as a file: the shapes decide below
    with pytest.raises(PipelineError, match="cannot load weights from .*vgg16.weights.h5"):
        build_backbone(BACKBONES["resnet50"], 32, "fp32", weights)
