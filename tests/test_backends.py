"""Backends: the image path without TensorFlow equals TensorFlow's, the JAX backend's features equal
the TensorFlow backend's through the whole `extract` command, and nothing on the JAX path imports
TensorFlow (tests/without_tensorflow.py runs the command line with `import tensorflow` raising).

Equality of features across backends is within 1e-4 relative (fp32), JPEGs included: the two
backends' kernels sum in different orders, and a wrong row differs by orders of magnitude more.
Decoded pixels of PNG, BMP, GIF and JPEG are exactly TensorFlow's; after a resize they agree to
float32 rounding."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from commandline import in_process
from conftest import ROOT, make_image_folder, write_image
from pipeline.cache.fingerprint import Fingerprint
from pipeline.cli import main
from pipeline.images import decode_pillow as pixels
from pipeline.images.decode_tf import decode_bytes_and_resize, resize_like_extract

WITHOUT_TF = ROOT / "tests" / "without_tensorflow.py"


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow writes no 16-bit RGB)."""
    height, width, _ = values.shape
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _lossless_images() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    return {
        "png rgb": _encoded(Image.fromarray(rgb), "PNG"),
        "png rgba": _encoded(Image.fromarray(np.dstack([rgb, gray])), "PNG"),
        "png gray": _encoded(Image.fromarray(gray), "PNG"),
        "png gray+alpha": _encoded(Image.fromarray(np.dstack([gray, rgb[..., 1]]), "LA"), "PNG"),
        "png palette": _encoded(Image.fromarray(rgb).quantize(50), "PNG"),
        "png 1-bit": _encoded(Image.fromarray(gray > 128), "PNG"),
        "png 16-bit gray": _encoded(Image.fromarray(rng.integers(0, 65536, (40, 30)).astype(np.uint16)), "PNG"),
        "png 16-bit rgb": _png16_rgb(rng.integers(0, 65536, (40, 30, 3)).astype(np.uint16)),
        "bmp": _encoded(Image.fromarray(rgb), "BMP"),
        "gif": _encoded(Image.fromarray(rgb).quantize(60), "GIF"),
    }


@pytest.mark.parametrize("name", sorted(_lossless_images()))
def test_pillow_path_gives_tensorflows_pixels(name: str) -> None:
    data = _lossless_images()[name]
    # 40 x 30 at its own size: no resize, so the decoders alone are compared: exactly equal
    expected = tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8).numpy()
    decoded = pixels.decode(data)
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded[..., 0], expected[..., 0])
    for size in (16, 24, 40, 64):  # shrinking (area), mixed and growing (bilinear)
        ours = pixels.decode_and_resize(data, size)
        theirs = decode_bytes_and_resize(tf.constant(data), size).numpy()
        assert ours.shape == theirs.shape == (size, size, 3)
        assert np.allclose(ours, theirs, rtol=0, atol=1e-3), (size, np.abs(ours - theirs).max())


@pytest.mark.parametrize("shape,size", [((300, 300), 150), ((500, 375), 224), ((28, 28), 64), ((37, 50), 32),
                                        ((7, 300), 150), ((151, 150), 150), ((31, 29), 224), ((150, 150), 150)])
def test_resize_matrices_reproduce_tensorflows_resize(shape: tuple[int, int], size: int) -> None:
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.uint8)
    ours = pixels.resize(image, size)
    theirs = resize_like_extract(tf.constant(image), size).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 255 * 3e-5  # float32 rounding of two summation orders


def test_damaged_bytes_are_undecodable_on_both_paths() -> None:
    png = _lossless_images()["png rgb"]
    for damaged in (png[: len(png) // 2], b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(pixels.UndecodableImage):
            pixels.decode(damaged)
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode_bytes_and_resize(tf.constant(damaged), 16).numpy()


def _jpegs() -> dict[str, bytes]:
    """JPEGs of a photo-like image (gradients, texture and noise) as cameras and tools write them."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:120, 0:160]
    photo = np.dstack([(x * 0.6 + 20 * np.sin(y / 7)) % 256, (y * 0.8) % 256, (x + y) % 256])
    photo = np.clip(photo + rng.normal(0, 12, photo.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(photo)
    return {
        "jpeg 4:2:0 q75": _encoded(image, "JPEG", quality=75),
        "jpeg 4:4:4 q95": _encoded(image, "JPEG", quality=95, subsampling=0),
        "jpeg progressive": _encoded(image, "JPEG", quality=85, progressive=True),
        "jpeg gray": _encoded(Image.fromarray(photo[..., 0]), "JPEG", quality=80),
        "jpeg cmyk": _encoded(image.convert("CMYK"), "JPEG", quality=90),
    }


@pytest.mark.parametrize("name", sorted(_jpegs()))
def test_jpegs_decode_on_tensorflow_exactly_as_pillow_decodes_them(name: str) -> None:
    """TensorFlow's default inverse DCT (fast integer) is not Pillow's (accurate integer): the
    pipeline asks TensorFlow for the accurate one, and the pixels are the same to the level."""
    from pipeline.images.decode_tf import decode_pixels

    data = _jpegs()[name]
    ours = pixels.decode(data).astype(int)
    theirs = decode_pixels(tf.constant(data)).numpy().astype(int)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    if name != "jpeg cmyk":  # the reason for asking: the default differs
        assert np.abs(tf.io.decode_jpeg(data).numpy().astype(int) - theirs).max() > 0
    for size in (32, 100, 224):
        got = decode_bytes_and_resize(tf.constant(data), size).numpy()
        assert np.abs(pixels.decode_and_resize(data, size) - got).max() <= 255 * 3e-5


def test_decoders_are_named_in_the_fingerprint() -> None:
    """Each decoder is named in the fingerprint, so caches never mix them: Pillow with its libjpeg,
    TensorFlow with the accurate JPEG decoding (caches made before it are named "tensorflow")."""
    from pipeline.images import decode_tf

    assert pixels.decoder_identity().startswith("pillow-")
    common = dict(backbone="vgg16", weights_source="none", weights_identity="x", image_size=32,
                  resize_method="area-down-bilinear-up", preprocessing="torch", layers=("block5_pool",),
                  pooling="none", precision="fp32")
    before = Fingerprint(**common, tensorflow="2.21")
    on_tf = Fingerprint(**common, tensorflow="2.21", decoder=decode_tf.decoder_identity())
    on_jax = Fingerprint(**common, tensorflow="none", backend="jax-0.10", decoder=pixels.decoder_identity())
    assert len({before.digest(), on_tf.digest(), on_jax.digest()}) == 3
    assert "backend" not in before.as_dict(), "a cache of the old decoding keeps its digest: found, not continued"
    assert Fingerprint.from_dict(on_jax.as_dict()) == on_jax and Fingerprint.from_dict(on_tf.as_dict()) == on_tf


def test_a_cache_of_the_fast_jpeg_decoding_is_not_continued(tmp_path: Path, capsys) -> None:
    import dataclasses

    from conftest import tiny_options
    from pipeline.cache import store
    from pipeline.cache.fingerprint import cache_directory_name
    from pipeline.extraction.extract import extract_features

    data = make_image_folder(tmp_path / "data", per_class=3)
    first = extract_features(tiny_options(data, tmp_path / "cache"))
    # the same cache as an earlier version named it: decoder "tensorflow"
    fingerprint = dataclasses.replace(store.FeatureStore(first.cache_dir).fingerprint, backend="tensorflow",
                                      decoder="tensorflow")
    old = tmp_path / "cache" / cache_directory_name(fingerprint, data)
    first.cache_dir.rename(old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest |= {"fingerprint": fingerprint.as_dict(), "fingerprint_digest": fingerprint.digest()}
    (old / "manifest.json").write_text(json.dumps(manifest))
    again = extract_features(tiny_options(data, tmp_path / "cache"))
    assert again.cache_dir != old and again.new == 6 and again.reused == 0
    assert any(str(old) in note and "not continued" in note for note in again.notes)
    assert old.is_dir(), "the old cache is left as it was"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in a fresh Python, TensorFlow importable."""
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"} | (env or {})
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def on_jax(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """The JAX side of the module's comparisons: command lines run in one Python where `import
    tensorflow` raises (tests/without_tensorflow.py --serve: one JAX import for the module, not
    one a command), each checked afterwards to have imported no TensorFlow; reported as a
    finished process (exit code, stdout, stderr). KERAS_BACKEND is unset unless a call sets it."""
    log = tmp_path_factory.mktemp("jax-python") / "native-stderr.log"  # XLA's own lines: never read, never full
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    with log.open("w") as native:
        server = subprocess.Popen([sys.executable, str(WITHOUT_TF), "--serve"], cwd=ROOT, env=environment,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=native, text=True)

        def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
            server.stdin.write(json.dumps({"argv": list(args), "env": env or {}}) + "\n")
            server.stdin.flush()
            reply = server.stdout.readline()
            assert reply, f"the JAX Python ended: {log.read_text()[-2000:]}"
            answer = json.loads(reply)
            return subprocess.CompletedProcess([str(WITHOUT_TF), *args], answer["rc"], answer["stdout"],
                                               answer["stderr"])

        yield run
        server.stdin.close()
        server.wait(timeout=120)


def _rows(cache: Path) -> dict[str, np.ndarray]:
    rows = {}
    for shard in sorted(cache.glob("shard-*.h5")):
        with h5py.File(shard, "r") as handle:
            paths = [p.decode() for p in handle["paths"][:]]
            layers = sorted(handle["features"])
            for i, path in enumerate(paths):
                rows[path] = np.concatenate([handle["features"][name][i].ravel() for name in layers])
    return rows


def _cache_of(output: str) -> Path:
    return Path(json.loads(output)["cache_dir"])


@pytest.mark.parametrize("backbone,size,pooling", [("vgg16", 32, "none"), ("resnet50", 64, "avg")])
def test_jax_extract_equals_tensorflow_extract_without_importing_tensorflow(tmp_path: Path, on_jax, backbone: str,
                                                                               size: int, pooling: str,
                                                                               capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=5)
    write_image(data / "cats" / "big.png", seed=99, size=90)  # shrinks: area
    write_image(data / "dogs" / "small.png", seed=98, size=20, channels=1)  # grows, gray: bilinear
    for name, encoded in list(_jpegs().items())[:3]:  # JPEGs: one inverse DCT on both backends
        (data / "cats" / f"{name.replace(' ', '-').replace(':', '')}.jpg").write_bytes(encoded)
    common = ["extract", "--data", str(data), "--cache", str(tmp_path / "cache"), "--backbone", backbone,
              "--weights", "none", "--image-size", str(size), "--pooling", pooling, "--precision", "fp32",
              "--batch-size", "4", "--no-progress", "--json"]
    jax_side = on_jax(*common, "--backend", "jax")
    assert jax_side.returncode == 0, jax_side.stderr[-2000:]
    on_tf = in_process(capsys, *common, "--backend", "tensorflow")
    assert on_tf.returncode == 0, on_tf.stderr[-2000:]
    jax_cache, tf_cache = _cache_of(jax_side.stdout), _cache_of(on_tf.stdout)
    assert jax_cache != tf_cache  # the fingerprint names the backend: never one cache for both
    fingerprint = json.loads((jax_cache / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["backend"].startswith("jax-") and fingerprint["decoder"].startswith("pillow-")
    ours, theirs = _rows(jax_cache), _rows(tf_cache)
    assert sorted(ours) == sorted(theirs) and len(ours) == 15
    for path in theirs:
        scale = np.abs(theirs[path]).max()
        assert np.abs(ours[path] - theirs[path]).max() <= 1e-4 * scale, path
    # a rerun on the same backend continues its own cache: nothing new
    again = on_jax(*common, "--backend", "jax")
    assert again.returncode == 0 and json.loads(again.stdout)["new"] == 0


def test_jax_predict_matches_tensorflow_predict_without_importing_tensorflow(tmp_path: Path, on_jax,
                                                                             capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6)
    write_image(data / "dogs" / "small.png", seed=97, size=24)
    cache, models = tmp_path / "cache", tmp_path / "models"
    extracted = on_jax("extract", "--data", str(data), "--cache", str(cache), "--weights", "none", "--image-size", "32",
                       "--precision", "fp32", "--backend", "jax", "--no-progress", "--json")
    assert extracted.returncode == 0, extracted.stderr[-2000:]
    trained = on_jax("train-head", "--head", "logreg", "--features", str(_cache_of(extracted.stdout)), "--models",
                     str(models), "--backend", "jax", "--no-progress", "--c-grid", "0.01,1")
    assert trained.returncode == 0, trained.stderr[-2000:]
    outputs = {}
    for name, hidden in (("jax", True), ("tensorflow", False)):
        target = tmp_path / f"{name}.json"
        command = ["predict", "--model", "best", "--models", str(models), str(data), "--output", str(target),
                   "--backend", name]
        result = on_jax(*command) if hidden else in_process(capsys, *command)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = {row["path"]: dict(zip(row["labels"], row["probabilities"]))
                         for row in json.loads(target.read_text())}
    assert len(outputs["jax"]) == 13 and outputs["jax"].keys() == outputs["tensorflow"].keys()
    for path, probabilities in outputs["tensorflow"].items():
        for label, p in probabilities.items():
            assert outputs["jax"][path][label] == pytest.approx(p, abs=1e-4)


def test_failures_follow_the_same_rules_on_jax(tmp_path: Path, on_jax) -> None:
    """A damaged image is skipped with a reason; an image whose header (read by Pillow where the
    parser cannot: a WebP in a .png file) announces too many pixels is held back, never decoded,
    with one line; the rest is kept. KERAS_BACKEND chooses the backend when --backend is absent."""
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    big = Image.fromarray(np.zeros((1200, 1100, 3), np.uint8))
    (data / "dogs" / "webp-in-disguise.png").write_bytes(_encoded(big, "WEBP", lossless=True))
    common = ["extract", "--data", str(data), "--cache", str(tmp_path / "cache"), "--weights", "none",
              "--image-size", "32", "--precision", "fp32", "--no-progress"]
    held = on_jax(*common, "--max-megapixels", "1", env={"KERAS_BACKEND": "jax"})
    assert held.returncode == 1
    errors = [line for line in held.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1100 x 1200 pixels" in errors[0], held.stderr[-1500:]
    rerun = on_jax(*common, "--json", env={"KERAS_BACKEND": "jax"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert (summary["new"], summary["skipped"], summary["images"]) == (1, 1, 7)  # the six were kept
    assert "cannot decode" in summary["skipped_images"][0]["reason"]
    assert "jax" in json.loads((_cache_of(rerun.stdout) / "manifest.json").read_text())["fingerprint"]["backend"]


def test_commands_that_need_tensorflow_say_so_in_one_line(tmp_path: Path, on_jax) -> None:
    for command in (["export", "--model", "best", "--models", str(tmp_path), "--backend", "jax"],
                    ["finetune", "--from", "best", "--models", str(tmp_path), "--backend", "jax"]):
        result = on_jax(*command)
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--backend tensorflow" in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_unknown_backends_and_late_choices_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    wrong = _run("extract", "--data", str(data), env={"KERAS_BACKEND": "theano"})
    assert wrong.returncode == 1 and "unknown backend 'theano'" in wrong.stderr
    # in a process whose Keras already runs on TensorFlow, asking for JAX is one line, not a mix
    assert main(["extract", "--data", str(data), "--backend", "jax"]) == 1
    assert "already running on tensorflow" in capsys.readouterr().err


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _gif_bomb() -> bytes:
    """A 297-byte-class GIF: its screen says 16 x 16, its one frame says 20000 x 20000."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 20000, 20000, 0x80) + b"\x00\x00\x00\xff\xff\xff"
    return screen + frame + b"\x02\x02\x4c\x01\x00" + b"\x3b"


def _rule_corpus() -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, read by the pipeline on both backends)."""
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    palette = rng.integers(0, 256, 48).tolist()
    indices = rng.integers(0, 16, (40, 30), dtype=np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette)
    png = _encoded(Image.fromarray(rgb), "PNG")
    damaged_crc = bytearray(png)
    idat = png.index(b"IDAT")
    damaged_crc[idat + 10] ^= 0xFF  # a byte of the compressed pixels: its CRC no longer matches
    big_text = zlib.compress(b"\0" * (2 << 20))  # 2 MB once inflated: Pillow refuses text chunks past 1 MB
    with_metadata = png[:33] + _chunk(b"zTXt", b"comment\0\0" + big_text) + \
        _chunk(b"iCCP", b"profile\0\0" + big_text) + png[33:]
    partial = bytearray(_encoded(paletted, "GIF"))
    partial[6:10] = struct.pack("<HH", 60, 60)  # the screen grows: the frame covers a corner of it
    return {
        "bmp 24-bit": (_encoded(Image.fromarray(rgb), "BMP"), True),
        "bmp 32-bit": (_encoded(Image.fromarray(np.dstack([rgb, gray])), "BMP"), True),
        "bmp 8-bit gray": (_encoded(Image.fromarray(gray), "BMP"), True),
        "bmp 8-bit palette": (_encoded(paletted, "BMP"), False),
        "bmp 1-bit": (_encoded(Image.fromarray(gray > 128), "BMP"), False),
        "gif transparent": (_encoded(paletted, "GIF", transparency=5), True),
        "gif partial first frame": (bytes(partial), False),
        "gif frame beyond its screen": (_gif_bomb(), False),
        "png bad idat crc": (bytes(damaged_crc), False),
        "png big ztxt and iccp": (with_metadata, True),
    }


@pytest.mark.parametrize("name", sorted(_rule_corpus()))
def test_one_file_rule_on_both_backends(name: str) -> None:
    """Each file of the corpus is read by both decoders to the same pixels, or refused before
    either decodes it, with one reason (pipeline/images/formats.py, refusal)."""
    from pipeline.images.reading import checked_before_decoding

    data, read = _rule_corpus()[name]
    problem, found = checked_before_decoding(data, 10**8)
    assert (problem is None) == read, (problem, found)
    if read:
        for size in (16, 30, 64):
            ours = pixels.decode_and_resize(data, size)
            theirs = decode_bytes_and_resize(tf.constant(data), size).numpy()
            assert np.abs(ours - theirs).max() <= 255 * 3e-5, (size, np.abs(ours - theirs).max())
    else:
        assert problem == "skipped" and isinstance(found, str) and found


def test_the_pixel_limit_counts_every_gif_frame_decoded() -> None:
    from pipeline.images.reading import checked_before_decoding

    frames = [Image.fromarray(np.full((100, 100), i, np.uint8)).convert("P") for i in range(30)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    animated = buffer.getvalue()
    assert checked_before_decoding(animated, 250_000) == ("too large", (100, 100))  # 30 x 10^4 pixels
    assert checked_before_decoding(animated, 300_000)[0] is None
    assert checked_before_decoding(_gif_bomb(), 10**6)[0] == "skipped"


def test_the_rule_corpus_gives_one_cache_on_both_backends(tmp_path: Path, on_jax,
                                                           capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    for name, (encoded, _) in _rule_corpus().items():
        kind = name.split()[0]
        (data / ("cats" if len(name) % 2 else "dogs") / f"{name.replace(' ', '-')}.{kind}").write_bytes(encoded)
    common = ["extract", "--data", str(data), "--cache", str(tmp_path / "cache"), "--weights", "none",
              "--image-size", "32", "--precision", "fp32", "--batch-size", "4", "--no-progress", "--json"]
    caches = {}
    for backend, hidden in (("jax", True), ("tensorflow", False)):
        command = [*common, "--backend", backend]
        result = on_jax(*command) if hidden else in_process(capsys, *command)
        assert result.returncode == 0, result.stderr[-2000:]
        caches[backend] = _cache_of(result.stdout)
    skipped = {backend: sorted((s["path"], s["reason"]) for s in
                               json.loads((cache / "manifest.json").read_text())["skipped"])
               for backend, cache in caches.items()}
    assert skipped["jax"] == skipped["tensorflow"] and len(skipped["jax"]) == 5, skipped
    ours, theirs = _rows(caches["jax"]), _rows(caches["tensorflow"])
    assert sorted(ours) == sorted(theirs) and len(ours) == 6 + 5
    for path in theirs:
        assert np.abs(ours[path] - theirs[path]).max() <= 1e-4 * np.abs(theirs[path]).max(), path
