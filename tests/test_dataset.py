"""Scanning folders: classes, stable stratified splits, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image_folder, write_image
from pipeline.data.dataset import SplitConfig, scan_dataset, split_position
from pipeline.errors import PipelineError


def _splits(root: Path, config: SplitConfig = SplitConfig()) -> dict[str, str]:
    return {r.path: r.split for r in scan_dataset(root, config).records}


def test_splits_are_stratified_and_close_to_the_fractions(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=100)
    records = scan_dataset(root, SplitConfig(0.2, 0.25, 7)).records
    for label in (0, 1):
        splits = [r.split for r in records if r.label == label]
        assert 10 <= splits.count("validation") <= 30
        assert 15 <= splits.count("test") <= 35


def test_adding_images_never_moves_existing_ones(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=30)
    before = _splits(root)
    for i in range(30):
        write_image(root / "cats" / f"added{i}.png", seed=5000 + i)
    after = _splits(root)
    assert all(after[path] == split for path, split in before.items())


def test_nohash_variants_share_a_split() -> None:
    positions = {split_position(f"car7_nohash_{i}.jpg", seed=3) for i in range(10)}
    assert len(positions) == 1
    assert split_position("car7.jpg", 3) == positions.pop()


def test_small_classes_still_get_validation_and_test_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    for label in (0, 1):
        splits = sorted(r.split for r in scan_dataset(root).records if r.label == label)
        assert splits == ["test", "train", "validation"]


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    (root / "cats" / ".DS_Store").write_bytes(b"\0\0")
    (root / ".ipynb_checkpoints" / "x").mkdir(parents=True)
    (root / "dogs" / "notes.txt").write_text("hello")
    write_image(root / "dogs" / "nested" / "deep.PNG", seed=1)
    scanned = scan_dataset(root)
    assert scanned.class_names == ["cats", "dogs"]
    assert "dogs/nested/deep.PNG" in {r.path for r in scanned.records}
    assert scanned.ignored == [("dogs/notes.txt", "not an image file extension")]


def test_empty_class_folder_is_a_clear_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    (root / "birds").mkdir()
    with pytest.raises(PipelineError, match="birds .*hold no images"):
        scan_dataset(root)


def test_a_single_class_is_a_clear_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3, classes=("only",))
    with pytest.raises(PipelineError, match="at least two"):
        scan_dataset(root)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_content_hash_identifies_bytes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    (root / "cats" / "copy.png").write_bytes((root / "cats" / "img000.png").read_bytes())
    hashes = {r.path: r.sha256 for r in scan_dataset(root).records}
    assert hashes["cats/copy.png"] == hashes["cats/img000.png"] != hashes["cats/img001.png"]
