"""The run object: a run directory opened once, typed and versioned, that every command stands on;
and the shape of the house around it (who imports whom)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_image_folder, tiny_options
from pipeline import runs
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.runs import FORMAT_VERSION, Run, list_runs
from pipeline.training.train import TrainOptions, train_head


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    data = make_image_folder(root / "data", per_class=6)
    cache = extract_features(tiny_options(data, root / "features")).cache_dir
    run = train_head(TrainOptions(head="logreg", features=cache, models=root / "models", progress=False,
                                  head_params={"c_grid": "0.1,1", "n_jobs": 1})).directory
    return {"root": root, "data": data, "cache": cache, "run": run, "models": root / "models"}


def _copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_run_opens_once_with_everything_a_command_needs(head_run: dict[str, Path]) -> None:
    run = Run.open(head_run["run"])
    assert run.kind == "head" and run.format_version == FORMAT_VERSION
    assert run.class_names == ["cats", "dogs"] and run.fingerprint.image_size == 32
    assert run.view.layers == ("block5_pool",) and run.view.pooling == "none"
    assert set(run.metrics) == {"train", "validation", "test"}
    assert set(run.split_record.values()) <= {"train", "validation", "test"} and len(run.split_record) == 12
    assert run.features().directory == head_run["cache"]
    assert Run.open("best", head_run["models"]).directory == run.directory
    assert json.loads((run.directory / "config.json").read_text())["format_version"] == FORMAT_VERSION


def test_runs_without_a_format_version_are_refused_in_one_line(head_run: dict[str, Path], tmp_path: Path,
                                                               capsys) -> None:
    """One policy for older formats: a run from before format versions is refused, saying what to
    run again; `runs` lists it with that problem instead of failing."""
    old = _copy_run(head_run["run"], tmp_path / "models" / "old-run")
    config = json.loads((old / "config.json").read_text())
    del config["format_version"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="early version.*train the run again"):
        Run.open(old)
    assert main(["predict", "--model", str(old), str(head_run["data"] / "cats" / "img000.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train the run again" in error[0]
    [row] = list_runs(tmp_path / "models")
    assert row["name"] == "old-run" and "early version" in row["problem"]


def test_a_boolean_format_version_is_damage(head_run: dict[str, Path], tmp_path: Path) -> None:
    damaged = _copy_run(head_run["run"], tmp_path / "damaged-run")
    config = json.loads((damaged / "config.json").read_text())
    config["format_version"] = True
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="damaged .format_version True"):
        Run.open(damaged)


def test_a_run_from_a_newer_version_is_refused_in_one_line(head_run: dict[str, Path], tmp_path: Path,
                                                           capsys) -> None:
    newer = _copy_run(head_run["run"], tmp_path / "newer-run")
    config = json.loads((newer / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(config))
    for command in (["predict", "--model", str(newer), str(head_run["data"] / "cats" / "img000.png")],
                    ["evaluate", "--model", str(newer)],
                    ["export", "--model", str(newer), "--format", "keras", "--out", str(tmp_path / "out")]):
        assert main(command) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "newer version" in error[0] and "upgrade" in error[0]


@pytest.mark.parametrize("damage", [
    lambda c: c.update(view=["block5_pool"]),
    lambda c: c.pop("features"),
    lambda c: c["features"].update(fingerprint="vgg16"),
    lambda c: c.update(kind="resnet"),
    lambda c: c["view"].update(pooling="median"),
    lambda c: c["features"]["fingerprint"].update(image_size=3000),
])
def test_a_config_of_the_wrong_shape_is_one_line(head_run: dict[str, Path], tmp_path: Path, damage, capsys) -> None:
    broken = _copy_run(head_run["run"], tmp_path / "broken-run")
    config = json.loads((broken / "config.json").read_text())
    damage(config)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="config.json is damaged"):
        Run.open(broken)
    assert main(["predict", "--model", str(broken), str(head_run["data"] / "cats" / "img000.png")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "damaged" in error[0]


def test_labels_that_disagree_with_the_run_are_refused(head_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    edited = _copy_run(head_run["run"], tmp_path / "edited-run")
    (edited / runs.LABELS_FILE).write_text("cats\ndogs\nbirds\n")
    for command in (["predict", "--model", str(edited), str(head_run["data"] / "cats" / "img000.png")],
                    ["export", "--model", str(edited), "--format", "keras", "--out", str(tmp_path / "out")]):
        assert main(command) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "labels.txt lists 3 classes" in error[0]


def test_the_classifier_of_a_run_is_built_in_one_place(head_run: dict[str, Path]) -> None:
    """predict and export stand on Run.classifier: the same model, the same probabilities."""
    run = Run.open(head_run["run"])
    model = run.classifier("fp32")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    probabilities = np.asarray(model.predict(pixels, verbose=0))
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(PipelineError, match="fine-tune starts from a head run|no separate head"):
        Run(run.directory, run.config | {"kind": "finetune"}, run.class_names, run.metrics).head()


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_stage_three_and_the_run_users_do_not_borrow_from_stage_two() -> None:
    assert not any(name.startswith("pipeline.training") for name in _imports("finetuning/finetune"))
    for module in ("serving/predict", "serving/export"):
        assert not any(name.startswith("pipeline.heads") for name in _imports(module)), module
    for bench in (ROOT / "bench").glob("*.py"):  # bench calls public functions only
        tree = ast.parse(bench.read_text())
        private = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                   and node.attr.startswith("_") and not node.attr.startswith("__")
                   and isinstance(node.value, ast.Name) and node.value.id in ("head", "store", "extractor", "run")]
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("pipeline") for alias in node.names
                    if alias.name.startswith("_")]
        assert not private and not imported, (bench.name, private, imported)
