"""Scanning folders: classes, stable stratified splits, clear errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from commandline import in_process, one_error_line
from conftest import FAST_LOGREG, make_image_folder, tiny_options, train_test_folder, write_image
from pipeline.cli import main
from pipeline.data.dataset import SplitConfig, scan_dataset, split_position
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.training.train import TrainOptions, run_training


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


@pytest.mark.parametrize("flag", ["--val-fraction", "--test-fraction"])
def test_fractions_must_be_finite(tmp_path: Path, flag: str, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    result = in_process(capsys, "extract", "--data", str(data), "--cache", str(tmp_path / "c"), flag, "nan")
    assert result.returncode != 0 and "finite" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(PipelineError, match="finite"):
        extract_features(tiny_options(data, tmp_path / "c", splits=SplitConfig(float("nan"), 0.2, 0)))


def test_a_class_folder_with_a_control_character_is_refused_by_name(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "dogs").rename(data / "dogs\nand wolves")
    line = one_error_line(in_process(capsys, "extract", "--data", str(data), "--cache", str(tmp_path / "c"),
                                     "--weights", "none",
                                "--image-size", "32", "--no-progress"))
    assert "dogs\\nand wolves" in line and "control character" in line


def test_adding_an_image_keeps_a_small_class_s_fixed_up_splits(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    # three cats whose names all fall in train: the fix-up gives one to validation and one to test
    (data / "cats").mkdir(exist_ok=True)
    for path in (data / "cats").iterdir():
        path.unlink()
    names = [f"cat{i}.png" for i in range(1000) if split_position(f"cat{i}.png", 0) >= 0.4][:3]
    for i, name in enumerate(names):
        write_image(data / "cats" / name, seed=500 + i)
    config = SplitConfig(0.2, 0.2, 0)
    first = extract_features(tiny_options(data, tmp_path / "c", splits=config))
    from pipeline.cache.store import FeatureStore

    before = {p: s for shard in FeatureStore(first.cache_dir).split_indexes().items() for p, s in
              [(path, shard[0]) for path in shard[1].paths]}
    # a new cat whose name falls in validation by itself: the old fix-up was undone by it
    name = next(f"new{i}.png" for i in range(1000) if 0.2 <= split_position(f"new{i}.png", 0) < 0.4)
    write_image(data / "cats" / name, seed=999)
    second = extract_features(tiny_options(data, tmp_path / "c", splits=config))
    after = {p: s for shard in FeatureStore(second.cache_dir).split_indexes().items() for p, s in
             [(path, shard[0]) for path in shard[1].paths]}
    assert sorted(s for p, s in before.items() if p.startswith("cats/")) == ["test", "train", "validation"]
    assert {p: after[p] for p in before} == before
    assert after[f"cats/{name}"] == "validation"


@pytest.mark.parametrize("name", ["a\u2028b", "a\u2029b", "a\x85b", "a\x0bb", "a\x1cb"])
def test_a_class_name_with_any_line_boundary_is_refused(tmp_path: Path, name: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2)
    write_image(data / name / "x.png", seed=3)
    with pytest.raises(PipelineError, match="line break"):
        scan_dataset(data)


def test_a_class_folder_named_train_beside_other_classes_is_refused_with_them_listed(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2)
    write_image(data / "train" / "sub" / "x.png", seed=3)
    with pytest.raises(PipelineError, match=r"mixes split folders \(train\) with other folders \(cats, dogs\)"):
        scan_dataset(data)


def test_a_file_name_that_is_not_utf8_is_listed_and_the_rest_extracted(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    odd = os.fsdecode(b"caf\xe9.png")
    write_image(data / "cats" / odd, seed=77)
    summary = extract_features(tiny_options(data, tmp_path / "c"))
    assert summary.images == 6
    manifest = json.loads((summary.cache_dir / "manifest.json").read_text())
    assert {"path": "cats/caf\\xe9.png", "reason": manifest["ignored"][0]["reason"]} in manifest["ignored"]
    assert main(["predict", "--model", "best", "--models", str(tmp_path / "none"), str(data / "cats" / odd)]) == 1


def test_a_train_test_layout_gets_a_stratified_validation_split_carved_out_of_train(tmp_path: Path) -> None:
    root = train_test_folder(tmp_path / "data")
    scanned = scan_dataset(root, SplitConfig.from_flags(None, None, 0))
    assert scanned.carved == {"validation": 0.15}
    for label in (0, 1):
        splits = Counter(r.split for r in scanned.records if r.label == label)
        assert splits["test"] == 4, "test/ stays the test split, whole"
        assert splits["validation"] >= 1 and splits["train"] >= 10
    validation = {r.path for r in scanned.records if r.split == "validation"}
    assert all(path.startswith("train/") for path in validation), "validation comes out of train/ only"
    assert validation == {r.path for r in scan_dataset(root, SplitConfig.from_flags(None, None, 0)).records
                          if r.split == "validation"}, "the carve-out is stable"
    bigger = scan_dataset(root, SplitConfig.from_flags(0.4, None, 0))
    assert sum(r.split == "validation" for r in bigger.records) > len(validation), "--val-fraction sets it"


def test_a_fraction_that_a_split_folder_overrides_is_refused_not_ignored(tmp_path: Path) -> None:
    root = train_test_folder(tmp_path / "data")
    with pytest.raises(PipelineError, match="--test-fraction does not apply.*test folder"):
        scan_dataset(root, SplitConfig.from_flags(None, 0.2, 0))
    for name in ("boot", "shirt"):
        write_image(root / "validation" / name / "v.png", seed=7)
    with pytest.raises(PipelineError, match="--val-fraction does not apply.*validation folder"):
        scan_dataset(root, SplitConfig.from_flags(0.2, None, 0))
    assert not scan_dataset(root, SplitConfig.from_flags(None, None, 0)).carved


def test_a_tiny_extract_with_a_carved_split_trains_a_head(tmp_path: Path) -> None:
    root = train_test_folder(tmp_path / "data", train=10, test=2, size=16)
    summary = extract_features(tiny_options(root, tmp_path / "c", splits=SplitConfig.from_flags(None, None, 0)))
    run = run_training(TrainOptions(features=summary.cache_dir, models=tmp_path / "m", head_params=FAST_LOGREG,
                                    progress=False))
    assert run.metrics["validation"]["images"] >= 2 and run.metrics["test"]["images"] == 4
