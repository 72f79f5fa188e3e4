"""The library: `import pipeline` is the front door, each stage a function whose keyword arguments
are the command's flags (same names, same defaults, the same checks), the package installs with
pip and its console command runs the stages."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Annotated, Unpack

import pytest

import pipeline
from conftest import ROOT, make_image_folder
from pipeline import api
from pipeline.cli import build_parser, main
from pipeline.errors import PipelineError
from pipeline.options import LABELS_GROUP, LabelsTable, Option, PathLike, declarations, with_defaults

STAGES = {  # subcommand -> (function, its positional inputs as the command names them)
    "extract": (api.extract, {"data": "data"}),
    "train-head": (api.train_head, {"features": "features"}),
    "evaluate": (api.evaluate, {"run": "model"}),
    "finetune": (api.finetune, {"run": "source"}),
    "predict": (api.predict, {"run": "model", "images": "images"}),
    "export": (api.export, {"run": "model"}),
    "runs": (api.list_runs, {}),
    "caches": (api.list_caches, {}),
    "embeddings": (api.embeddings, {"features": "features", "out": "out"}),
    "audit": (api.audit, {"features": "features"}),
}
MINIMAL = {"extract": ["--data", "d"], "evaluate": ["--model", "m"], "predict": ["--model", "m", "x.png"],
           "export": ["--model", "m"]}
COMMAND_ONLY = {"json", "debug", "handler", "command", "no_progress"}


class WiderTable(LabelsTable, total=False):  # the labels-table keywords with one more (a test of the group)
    weight_column: Annotated[str | None, Option("a column of sample weights", metavar="COL", group=LABELS_GROUP)]


def test_the_front_door_names_every_stage_and_class() -> None:
    wanted = {"extract", "train_head", "evaluate", "finetune", "predict", "export", "embeddings", "audit", "list_runs",
              "Run",
              "FeatureStore", "LogRegHead", "DenseHead", "Head"}
    assert wanted <= set(pipeline.__all__)
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert pipeline.Run.__module__.startswith("pipeline.runs")
    assert isinstance(pipeline.__version__, str)


def test_no_subpackage_shadows_a_front_door_function() -> None:
    """Importing pipeline.X.Y sets the attribute pipeline.X to the package X: no package may be
    named like a function of the front door."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if "ray" not in module.name:
            importlib.import_module(module.name)
    for name in pipeline.__all__:
        value = getattr(pipeline, name)
        assert not inspect.ismodule(value), f"pipeline.{name} is a module"


def test_importing_the_package_imports_neither_tensorflow_nor_keras() -> None:
    """So that the backend can still be chosen after `import pipeline`."""
    code = "import sys, pipeline; print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_flag_is_a_keyword_of_its_stage_function_with_the_same_default(command: str) -> None:
    function, positional = STAGES[command]
    parameters = inspect.signature(function).parameters
    args = build_parser().parse_args([command, *MINIMAL.get(command, [])])
    flags = {name: value for name, value in vars(args).items() if name not in COMMAND_ONLY}
    for name in positional.values():
        flags.pop(name, None)
    missing = sorted(set(flags) - set(parameters))
    assert not missing, f"{command}: flags without a keyword argument: {missing}"
    for name, value in flags.items():
        default = parameters[name].default
        if isinstance(value, Path):
            value = str(value)
        if isinstance(default, Path):
            default = str(default)
        assert default == value, f"{command} --{name.replace('_', '-')}: command {value!r}, Python {default!r}"
    if "progress" in parameters:
        assert parameters["progress"].default is True and args.no_progress is False
    for name in positional:
        assert parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (command, name)


def test_a_new_option_is_one_keyword_and_appears_in_the_command_line_the_api_and_the_flag_tables(
        monkeypatch, capsys) -> None:
    """Issue 40: an option is declared once, in its stage function's signature; the command line's
    flag (name, default, help, rule), the API's check and docs/flags.md's row all come from it."""
    from pipeline.arguments import checked
    from pipeline.cli import flag_tables
    from pipeline.cli.commands import runs

    seen: dict[str, object] = {}

    @checked
    def list_runs(models: Annotated[PathLike, Option(rule="path")] = "models", *,
                  data: Annotated[PathLike | None, Option("only the runs of this image folder", rule="path")] = None,
                  newest: Annotated[int, Option("only the N newest runs", rule="positive", metavar="N")] = 10,
                  ) -> list[dict[str, object]]:
        seen.update(models=models, newest=newest)
        return []

    monkeypatch.setattr(runs, "DECLARED", list_runs)
    monkeypatch.setattr(api, "list_runs", list_runs)
    newest = next(a for a in _subcommand(build_parser(), "runs")._actions if a.dest == "newest")
    assert newest.option_strings == ["--newest"] and newest.default == 10 and newest.help == "only the N newest runs"
    assert main(["runs", "--newest", "3"]) == 0 and seen["newest"] == 3
    with pytest.raises(SystemExit):  # the rule: a positive whole number
        build_parser().parse_args(["runs", "--newest", "0"])
    with pytest.raises(PipelineError, match=r"--newest 'three': must be a whole number"):
        list_runs(newest="three")
    assert "| `--newest N` | `10` | only the N newest runs |" in flag_tables()
    capsys.readouterr()


def test_the_labels_table_keywords_are_one_group_every_labelled_stage_takes(monkeypatch, capsys) -> None:
    """Issue 40: the labels-table keywords are declared once (options.LabelsTable) and taken by every
    stage that reads labels as `**table`: each stage shows them in its signature and flags, refuses
    a keyword outside them, and a new member appears in a stage's signature, flags, API check and
    docs/flags.md rows without touching the stage."""
    from pipeline.arguments import checked
    from pipeline.cli import flag_tables
    from pipeline.cli.commands import runs

    members = list(LabelsTable.__annotations__)
    for function in (api.train_head, api.evaluate, api.embeddings, api.audit):
        own = inspect.signature(inspect.unwrap(function)).parameters  # as written: the group, not its members
        assert own["table"].kind is inspect.Parameter.VAR_KEYWORD and not set(members) & set(own), function
        shown = inspect.signature(function).parameters  # as help() shows it: every member, with its default
        assert [name for name in shown if name in members] == members
        assert shown["path"].default == "path" and shown["missing"].default == "error"
        assert shown["labels"].default is None
        assert [d.name for d in declarations(function)][-len(members):] == members
    with pytest.raises(PipelineError, match=r"^evaluate\(\): got an unexpected keyword argument 'lable'$"):
        pipeline.evaluate("models/none", lable="cls")

    seen: dict[str, object] = {}

    @checked
    def list_runs(models: Annotated[PathLike, Option(rule="path")] = "models",
                  **table: Unpack[WiderTable]) -> list[dict[str, object]]:
        seen.update(with_defaults(WiderTable, table))
        return []

    monkeypatch.setattr(runs, "DECLARED", list_runs)
    monkeypatch.setattr(api, "list_runs", list_runs)
    assert main(["runs", "--weight-column", "w", "--label-column", "cls"]) == 0
    assert seen["weight_column"] == "w" and seen["label"] == "cls" and seen["path"] == "path"
    with pytest.raises(PipelineError, match=r"--weight-column 3: must be a string"):
        list_runs(weight_column=3)
    assert "weight_column" in inspect.signature(list_runs).parameters
    assert "| `--weight-column COL` |  | a column of sample weights |" in flag_tables()
    capsys.readouterr()


def test_options_are_checked_in_their_constructors_with_the_commands_words(tmp_path: Path, capsys) -> None:
    """One check per options type: Python gets the PipelineError the command line prints."""
    from pipeline.extraction.extract import ExtractOptions
    from pipeline.training.train import TrainOptions

    with pytest.raises(PipelineError, match="--image-size 5000"):
        ExtractOptions(data=tmp_path, image_size=5000)
    with pytest.raises(PipelineError, match="unknown backbone"):
        pipeline.extract(tmp_path, backbone="alexnet")
    with pytest.raises(PipelineError, match="unknown head 'xgboost'"):
        TrainOptions(head="xgboost")
    with pytest.raises(PipelineError, match="--units does not apply to --head logreg"):
        pipeline.train_head(tmp_path, head="logreg", units=3)
    assert main(["extract", "--data", str(tmp_path), "--image-size", "5000"]) == 1
    assert "--image-size 5000" in capsys.readouterr().err


@pytest.fixture(scope="module")
def library_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The issue's recipe, from Python, on a small folder."""
    root = tmp_path_factory.mktemp("library")
    data = make_image_folder(root / "data", per_class=8)
    cache = pipeline.extract(data, image_size=48, weights="none", pooling="avg", precision="fp32",
                             cache=root / "features", progress=False)
    run = pipeline.train_head(cache, head="logreg", models=root / "models", c_grid="1e-2:1e2:5", progress=False)
    return {"root": root, "data": data, "cache": cache, "run": run}


def test_extract_returns_the_cache_that_train_head_takes(library_run: dict[str, object]) -> None:
    cache, run = library_run["cache"], library_run["run"]
    assert isinstance(cache, pipeline.ExtractedCache) and isinstance(cache, pipeline.FeatureStore)
    assert cache.path.is_dir() and cache.fingerprint.image_size == 48 and cache.fingerprint.pooling == "avg"
    assert cache.summary.images == 16 and cache.summary.new == 16 and cache.class_names == ["cats", "dogs"]
    assert isinstance(run, pipeline.RunResult) and isinstance(run, pipeline.Run) and run.kind == "head"
    assert 0 <= run.metrics["test"]["accuracy"] <= 1
    assert run.summary.metrics["test"] == run.metrics["test"] and run.summary.directory == run.directory
    assert run.comparison is None  # one head, not auto
    opened = pipeline.open_run(run.directory)
    assert not isinstance(opened, pipeline.RunResult) and not hasattr(opened, "summary")  # no stage ran
    assert run.features().directory == cache.directory
    again = pipeline.train_head(str(cache.path), head="logreg", models=library_run["root"] / "models",
                                c_grid="1e-2:1e2:5", progress=False)
    assert again.directory == run.directory  # a path does what the cache did: the same run


def test_predict_export_evaluate_and_list_runs_take_the_run(library_run: dict[str, object], tmp_path: Path) -> None:
    run, data = library_run["run"], library_run["data"]
    images = sorted((data / "cats").glob("*.png"))[:3]
    results = pipeline.predict(run, images, top=1)
    assert [Path(r.path).name for r in results] == [p.name for p in images]
    assert all(r.error is None and len(r.labels) == 1 for r in results)
    exported = pipeline.export(run, "keras", tmp_path / "out")
    assert exported.path == tmp_path / "out" / "model.keras" and exported.path.is_file() and exported.bytes > 0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["parts"][0]["fingerprint"]["image_size"] == 48
    scored = pipeline.evaluate(run, split="validation")
    assert isinstance(scored, pipeline.RunResult) and scored.metrics["validation"] == run.metrics["validation"]
    assert scored.summary.metrics["validation"] == run.metrics["validation"]
    [row] = pipeline.list_runs(library_run["root"] / "models")
    assert row["name"] == run.name and row["kind"] == "head"


def test_the_readme_python_section_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The README's "From Python" code, run as written, as a script's top level, from a folder
    holding a small image folder under data/elpv (with real weights where the README names them:
    the example is run with random weights and a small image size, swapped in the one marked
    line). In this Python: a fresh one would add only TensorFlow's import, and importing the
    package without it is a test of its own."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "pipeline.extract(" in code and "pipeline.train_head(" in code and "pipeline.finetune(" in code
    make_image_folder(tmp_path / "data" / "elpv", per_class=8, classes=("defective", "functional"))
    (tmp_path / "data" / "elpv" / "defective" / "img000.png").rename(tmp_path / "data" / "elpv" / "defective" /
                                                                     "cell0001.png")
    images = sorted((tmp_path / "data" / "elpv").rglob("*.png"))  # the demo-data table the README reads labels from
    (tmp_path / "data" / "elpv" / "elpv_labels.csv").write_text(
        "file,class\n" + "".join(f"{p.parent.name}/{p.name},{p.parent.name}\n" for p in images))
    fast = code.replace('backbone="efficientnet_lite0"',
                        'backbone="efficientnet_lite0", weights="none", image_size=48, precision="fp32"')
    assert fast != code, "the README's extract line names its backbone as the test expects"
    monkeypatch.chdir(tmp_path)
    exec(compile(fast, str(ROOT / "README.md"), "exec"), {"__name__": "__main__"})  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert "images" in printed and "out" in printed
    assert (tmp_path / "out").is_dir() and list((tmp_path / "models").iterdir())


def test_the_package_installs_and_its_command_runs_the_stages(tmp_path: Path) -> None:
    """pip builds the wheel from pyproject.toml; installed on its own (a folder outside the
    repository, ahead of everything on the path), its console command runs extract -> train-head
    -> predict on a small folder, from the installed files."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("bottleneck_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
    assert "bottleneck-pipeline = pipeline.cli:main" in entry_points
    assert "Requires-Python: >=3.11" in metadata and "Requires-Dist: tensorflow" in metadata
    assert {"pipeline/api.py", "pipeline/runs/writer.py", "pipeline/heads/logreg.py"} <= set(names)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    command = target / "bin" / "bottleneck-pipeline"
    work = tmp_path / "work"
    data = make_image_folder(work / "data", per_class=6)
    environment = os.environ | {"PYTHONPATH": str(target), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, str(command), *args], capture_output=True, text=True, cwd=work,
                              env=environment, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                           text=True, cwd=work, env=environment, check=True).stdout
    assert where.startswith(str(target)), where
    run("extract", "--data", str(data), "--image-size", "32", "--weights", "none", "--precision", "fp32",
        "--pooling", "avg", "--no-progress")
    assert "run:" in run("train-head", "--head", "logreg", "--c-grid", "1,10", "--no-progress")
    assert "img000.png" in run("predict", "--model", "best", str(data / "cats" / "img000.png"))


def test_the_flag_tables_are_generated_from_the_parser() -> None:
    from pipeline.cli import flag_tables

    assert (ROOT / "docs" / "flags.md").read_text() == flag_tables(), "run make docs"


def test_the_readme_is_for_users_and_its_links_hold() -> None:
    """About 300 lines; the manual in docs/; every relative link points at a file that exists."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 320
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_the_import_paths_of_0_1_are_gone_and_import_pipeline_installs_no_finder() -> None:
    """0.2 kept 0.1's module paths for one release through a sys.meta_path finder; 0.3 drops both."""
    import importlib
    import sys

    assert not any(type(finder).__module__.startswith("pipeline") for finder in sys.meta_path)
    for old in ("pipeline.classifier", "pipeline.store", "pipeline.reader", "pipeline.dataset", "pipeline.fitting"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    from pipeline.images import EncodedImages, resize_like_extract  # names of the old pipeline/images.py
    from pipeline.images.decode_tf import resize_like_extract as moved
    from pipeline.images.reading import EncodedImages as reading

    assert resize_like_extract is moved and EncodedImages is reading
    assert callable(pipeline.extract) and callable(pipeline.export)  # the front door is not shadowed
