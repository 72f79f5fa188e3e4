"""Images: the header parser, the pixel limit, images whose size cannot be read."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image_folder, tiny_options
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features


def _webp(width: int, height: int, lossless: bool) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "WEBP", lossless=lossless)
    return buffer.getvalue()


def _jpeg_with_a_stray_byte(width: int, height: int) -> bytes:
    """A JPEG with one junk byte before its frame header: libjpeg warns and decodes it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "JPEG")
    data = buffer.getvalue()
    frame = data.index(b"\xff\xc0")
    return data[:frame] + b"\x00" + data[frame:]


@pytest.mark.parametrize("make", [lambda w, h: _jpeg_with_a_stray_byte(w, h),
                                  lambda w, h: _webp(w, h, lossless=False),
                                  lambda w, h: _webp(w, h, lossless=True)], ids=["jpeg-stray-byte", "webp", "webp-ll"])
def test_the_header_parser_reads_what_the_decoder_accepts(make) -> None:
    from pipeline.images.formats import image_dimensions

    assert image_dimensions(make(321, 123)) == (321, 123)


def test_disguised_large_images_are_held_back_by_predict_and_extract(tmp_path: Path, capsys,
                                                                    head_run: dict[str, Path]) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "cats" / "bomb.png").write_bytes(_webp(400, 300, lossless=False))  # WebP bytes named .png
    (data / "dogs" / "bomb.jpg").write_bytes(_jpeg_with_a_stray_byte(400, 300))
    options = tiny_options(data, tmp_path / "c", max_pixels=100_000)
    with pytest.raises(PipelineError, match=r"is 400 x 300 pixels, above the limit"):
        extract_features(options)
    for name in ("cats/bomb.png", "dogs/bomb.jpg"):
        assert main(["predict", "--model", "best", "--models", str(tmp_path / "m"), str(data / name)]) == 1
    capsys.readouterr()
    for name in ("cats/bomb.png", "dogs/bomb.jpg"):
        assert main(["predict", "--model", str(head_run["run"]), "--max-megapixels", "0.05", str(data / name)]) == 1
    err = capsys.readouterr()
    assert "400 x 300 pixels, above the limit of 0.05 megapixels" in err.out + err.err


def test_an_image_whose_size_cannot_be_read_is_not_decoded(tmp_path: Path) -> None:
    from pipeline.images.reading import EncodedImages, unchecked_reason

    jpeg = _jpeg_with_a_stray_byte(40, 40)
    headless = jpeg[:jpeg.index(b"\xff\xc0")]  # a JPEG cut before its frame header
    path = tmp_path / "cut.jpg"
    path.write_bytes(headless)
    source = EncodedImages([path])
    assert list(source._encoded()) == []
    assert source.failure_reason(0, 32) == unchecked_reason(headless)
    assert "header does not say how large" in unchecked_reason(headless)


def test_a_gif_whose_frame_is_far_larger_than_its_screen_is_never_decoded(tmp_path: Path, capsys,
                                                                          head_run: dict[str, Path]) -> None:
    """Its header says 16 x 16 and its one frame 20000 x 20000 (2.7 GB on TensorFlow once decoded):
    extract and predict refuse it from its blocks, whatever --max-megapixels says."""
    import struct

    screen = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 20000, 20000, 0x80) + b"\x00\x00\x00\xff\xff\xff"
    bomb = screen + frame + b"\x02\x02\x4c\x01\x00" + b"\x3b"
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "cats" / "bomb.gif").write_bytes(bomb)
    summary = extract_features(tiny_options(data, tmp_path / "c", max_pixels=10**6))
    [skipped] = summary.skipped
    assert skipped["path"] == "cats/bomb.gif"
    assert "20000 x 20000" in skipped["reason"] and "outside" in skipped["reason"]
    bomb_file = str(data / "cats" / "bomb.gif")
    assert main(["predict", "--model", str(head_run["run"]), "--max-megapixels", "1", bomb_file]) == 1
    out = capsys.readouterr().out
    assert "bomb.gif  error:" in out and "20000 x 20000" in out


def test_a_hash_index_of_the_wrong_shape_is_started_afresh(tmp_path: Path) -> None:
    """file_hashes.json holding a list where a mapping belongs (damage, or another tool's file)."""
    from pipeline.cache import store

    data = make_image_folder(tmp_path / "data", per_class=3)
    first = extract_features(tiny_options(data, tmp_path / "c"))
    (first.cache_dir / store.HASH_INDEX_NAME).write_text('{"saved_at_ns": 1, "files": []}')
    again = extract_features(tiny_options(data, tmp_path / "c"))
    assert (again.new, again.reused) == (0, 6)


def test_a_fifo_named_like_an_image_is_an_error_row_not_a_hang(tmp_path: Path, capsys,
                                                               head_run: dict[str, Path]) -> None:
    import os

    fifo = tmp_path / "cat.png"
    os.mkfifo(fifo)
    good = sorted(head_run["data"].rglob("*.png"))[0]
    assert main(["predict", "--model", str(head_run["run"]), str(fifo), str(good)]) == 1
    out = capsys.readouterr().out
    assert "cat.png  error: not a readable image: unreadable: not a regular file" in out and str(good) in out


def test_decode_threads_each_call_blas_in_their_own_thread(tmp_path: Path, monkeypatch) -> None:
    """Several decode threads each starting OpenBLAS's whole pool oversubscribed a 16-core machine
    (bench/RESULTS.md, GPU: 3x slower); one decode thread keeps the pool."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    from pipeline.images import reading

    folder = make_image_folder(tmp_path / "data", per_class=3, classes=("a",))
    files = sorted(folder.rglob("*.png"))
    seen: list[int] = []

    def transform(x):
        seen.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
        return x

    with threadpool_limits(limits=2, user_api="blas"):  # a pool of two, as on a machine of two cores (the
        # test workers run BLAS on one thread: conftest.py)
        batches = list(reading.EncodedImages(files)._threaded_batches(32, 2, transform, workers=2))
        assert sum(len(indices) for indices, _ in batches) == 3 and seen and set(seen) == {1}
        outside = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert outside and set(outside) == {2}
        with reading.one_blas_thread_each(1):  # one decode thread: BLAS's pool is left as it is
            assert [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] == outside
    assert np.isfinite(batches[0][1]).all()
