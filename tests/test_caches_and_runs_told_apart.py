"""Caches and runs told apart: `caches` lists every cache with its layers, `--features` takes a
short form that names one cache (or refuses, listing the candidates), train-head says which cache
it took when none was named, and `runs` shows each run's kind, layers and calibration."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import FAST_LOGREG, make_image_folder, tiny_options
from pipeline.cli import main
from pipeline.extraction.extract import extract_features


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image folder extracted twice by VGG16 at 32 px: its default layer, then block4_pool."""
    root = tmp_path_factory.mktemp("two-caches")
    data = make_image_folder(root / "data", per_class=6)
    cache_root = root / "features"
    default = extract_features(tiny_options(data, cache_root)).cache_dir
    time.sleep(0.05)  # the second manifest is the newer one
    block4 = extract_features(tiny_options(data, cache_root, layers=["block4_pool"], pooling="avg")).cache_dir
    return {"root": root, "cache": cache_root, "default": default, "block4": block4}


def test_caches_lists_every_cache_with_its_layers_newest_first(two_caches: dict[str, Path], capsys) -> None:
    assert main(["caches", "--cache", str(two_caches["cache"])]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["name", "backbone", "size", "layers"]
    assert table[1].startswith(two_caches["block4"].name) and "block4_pool" in table[1] and "avg" in table[1]
    assert table[2].startswith(two_caches["default"].name) and "block5_pool" in table[2]
    assert main(["caches", "--cache", str(two_caches["cache"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["layers"] for row in rows] == [["block4_pool"], ["block5_pool"]]
    assert rows[0]["images"] and sum(rows[0]["images"].values()) == 12


def test_a_short_form_names_one_cache_or_is_refused_with_the_candidates(two_caches: dict[str, Path],
                                                                       capsys) -> None:
    from pipeline.cache.reader import open_cache

    cache = two_caches["cache"]
    assert open_cache(Path("vgg16:32:block4_pool"), cache).directory == two_caches["block4"]
    assert open_cache(Path("vgg16:32:block5_pool"), cache).directory == two_caches["default"]
    assert open_cache(Path(two_caches["default"].name[:-3]), cache).directory == two_caches["default"]
    models = two_caches["root"] / "models-ambiguous"
    assert main(["train-head", "--cache", str(cache), "--features", "vgg16", "--models", str(models),
                 "--no-progress"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--features vgg16 matches 2 caches" in line and two_caches["block4"].name in line
    assert two_caches["default"].name in line and "`caches` lists them" in line
    assert not list(models.glob("*/config.json")), "no run was written"
    assert main(["train-head", "--cache", str(cache), "--features", "resnet50:224", "--models", str(models),
                 "--no-progress"]) == 1
    assert "no cache resnet50:224" in capsys.readouterr().err


def test_train_head_says_which_cache_it_took_and_runs_show_layers_kind_and_calibration(
        two_caches: dict[str, Path], capsys) -> None:
    models = two_caches["root"] / "models"
    common = ["--cache", str(two_caches["cache"]), "--models", str(models), "--no-progress",
              "--c-grid", FAST_LOGREG["c_grid"]]
    assert main(["train-head", *common]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"features: {two_caches['block4'].name} (the cache written last")
    assert main(["train-head", *common, "--features", "vgg16:32:block5_pool"]) == 0
    assert "features:" not in capsys.readouterr().out.splitlines()[0]
    names = sorted(p.name for p in models.iterdir())
    assert any("block4_pool" in name for name in names), "a layer given to extract enters the run's name"
    assert any("block4_pool" not in name for name in names), "the default layer does not"
    assert main(["runs", "--models", str(models)]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[0].split()
    for column in ("kind", "layers", "loss", "ECE"):
        assert column in header
    rows = [line for line in table[1:3]]
    assert any("block4_pool" in row for row in rows) and any("block5_pool" in row for row in rows)
    assert all(" head " in row for row in rows)
    for run in models.iterdir():
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0 <= metrics["test"]["ece"] <= 1 and metrics["test"]["loss"] > 0


def test_the_whole_c_grid_offers_a_quicker_first_look(two_caches: dict[str, Path], capsys) -> None:
    from pipeline.training.train import TrainOptions, run_training

    models = two_caches["root"] / "models-c"
    run_training(TrainOptions(head="logreg", features=two_caches["default"], models=models,
                              head_params={"n_jobs": 1, "c_search": "grid"}))
    err = capsys.readouterr().err
    assert "C search: 45 fits" in err and "--c-grid 1e-4:1e2:7 (7 fits, one a decade)" in err
    assert "--c-search path" in err
    run_training(TrainOptions(head="logreg", features=two_caches["default"], models=models, head_params={"n_jobs": 1}))
    err = capsys.readouterr().err  # the default walks the path: no advice needed, its bar says so
    assert "C path" in err and "quicker first look" not in err
    run_training(TrainOptions(head="logreg", features=two_caches["default"], models=models, head_params=FAST_LOGREG))
    assert "quicker first look" not in capsys.readouterr().err
