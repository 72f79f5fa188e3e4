"""Runs: a run directory written whole by one writer, opened once (typed and versioned) by every
command, listed and chosen; staging, leftovers, races and damage; and the shape of the house around
it (who imports whom)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from commandline import dead_pid, in_process, one_error_line
from conftest import (
    FAST_LOGREG,
    ROOT,
    THREE_CLASSES,
    clustered_features,
    make_image_folder,
    tiny_options,
    write_feature_cache,
)
from pipeline import atomic, runs
from pipeline.cli import main
from pipeline.data.dataset import SplitConfig, split_position
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.runs import FORMAT_VERSION, Run, list_runs
from pipeline.training.train import TrainOptions, evaluate_run, run_training


def _copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def _edited_copy(head_run: dict[str, Path], target: Path, edit) -> Path:  # noqa: ANN001 - edits the config
    """A copy of the shared run at `target` whose config.json `edit` changed."""
    copy = _copy_run(head_run["run"], target)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _commands_say_one_line(head_run: dict[str, Path], run: Path, tmp_path: Path, capsys, *words: str) -> None:
    """predict, evaluate and export on `run`: exit status 1 and one line holding every word."""
    for command in (["predict", "--model", str(run), str(head_run["data"] / "cats" / "img000.png")],
                    ["evaluate", "--model", str(run)],
                    ["export", "--model", str(run), "--format", "keras", "--out", str(tmp_path / "out")]):
        assert main(command) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and all(word in error[0] for word in words), (command, error)


def test_a_run_opens_once_with_everything_a_command_needs(head_run: dict[str, Path]) -> None:
    run = Run.open(head_run["run"])
    assert run.kind == "head" and run.format_version == FORMAT_VERSION
    assert run.class_names == THREE_CLASSES and run.fingerprint.image_size == 32
    assert run.view.layers == ("block5_pool",) and run.view.pooling == "none"
    assert set(run.metrics) == {"train", "validation", "test"}
    assert set(run.split_record.values()) <= {"train", "validation", "test"} and len(run.split_record) == 18
    assert run.features().directory == head_run["cache"]
    assert Run.open("best", head_run["models"]).directory == run.directory
    assert json.loads((run.directory / "config.json").read_text())["format_version"] == FORMAT_VERSION


def test_runs_without_a_format_version_are_refused_in_one_line(head_run: dict[str, Path], tmp_path: Path,
                                                               capsys) -> None:
    """One policy for older formats: a run from before format versions is refused, saying what to
    run again; `runs` lists it with that problem instead of failing."""
    old = _edited_copy(head_run, tmp_path / "models" / "old-run", lambda config: config.pop("format_version"))
    with pytest.raises(PipelineError, match="early version.*train the run again"):
        Run.open(old)
    _commands_say_one_line(head_run, old, tmp_path, capsys, "train the run again")
    [row] = list_runs(tmp_path / "models")
    assert row["name"] == "old-run" and "early version" in row["problem"]


def test_a_boolean_format_version_is_damage(head_run: dict[str, Path], tmp_path: Path) -> None:
    damaged = _edited_copy(head_run, tmp_path / "damaged-run", lambda config: config.update(format_version=True))
    with pytest.raises(PipelineError, match="damaged .format_version True"):
        Run.open(damaged)


def test_a_run_from_a_newer_version_is_refused_in_one_line(head_run: dict[str, Path], tmp_path: Path,
                                                           capsys) -> None:
    newer = _edited_copy(head_run, tmp_path / "newer-run",
                         lambda config: config.update(format_version=FORMAT_VERSION + 1))
    _commands_say_one_line(head_run, newer, tmp_path, capsys, "newer version", "upgrade")


@pytest.mark.parametrize("damage", [
    lambda c: c.update(view=["block5_pool"]),
    lambda c: c.pop("features"),
    lambda c: c["features"].update(fingerprint="vgg16"),
    lambda c: c.update(kind="resnet"),
    lambda c: c["view"].update(pooling="median"),
    lambda c: c["features"]["fingerprint"].update(image_size=3000),
    lambda c: c.update(fusion=[]),
    lambda c: c.update(fusion=[{"features": c["features"], "view": c["view"]}]),
    lambda c: c["view"].update(layers=["nope"]),
])
def test_a_config_of_the_wrong_shape_is_one_line(head_run: dict[str, Path], tmp_path: Path, damage, capsys) -> None:
    broken = _edited_copy(head_run, tmp_path / "broken-run", damage)
    with pytest.raises(PipelineError, match="config.json is damaged"):
        Run.open(broken)
    _commands_say_one_line(head_run, broken, tmp_path, capsys, "damaged")


def test_a_run_without_content_hashes_in_its_split_record_is_refused(head_run: dict[str, Path], tmp_path: Path,
                                                                     capsys) -> None:
    early = _copy_run(head_run["run"], tmp_path / "early-run")
    rows = (early / runs.SPLIT_RECORD).read_text().splitlines()
    (early / runs.SPLIT_RECORD).write_text("path,split\n" + "".join(",".join(r.split(",")[:2]) + "\n"
                                                                 for r in rows[1:]))
    _commands_say_one_line(head_run, early, tmp_path, capsys, "no content hashes", "train the run again")


def test_labels_that_disagree_with_the_run_are_refused(head_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    edited = _copy_run(head_run["run"], tmp_path / "edited-run")
    (edited / runs.LABELS_FILE).write_text("cats\ndogs\n")
    for command in (["predict", "--model", str(edited), str(head_run["data"] / "cats" / "img000.png")],
                    ["export", "--model", str(edited), "--format", "keras", "--out", str(tmp_path / "out")]):
        assert main(command) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "labels.txt lists 2 classes" in error[0]


def test_the_classifier_of_a_run_is_built_in_one_place(head_run: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """predict and export stand on Run.classifier: the same model, the same probabilities."""
    run = Run.open(head_run["run"])
    model = run.classifier("fp32")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    probabilities = np.asarray(model.predict(pixels, verbose=0))
    assert probabilities.shape == (2, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)

    # predict answers with whatever Run.classifier builds: a model of its own would not say 0.7
    class Marked:
        output_shape = (None, 3)

        def predict_on_batch(self, batch):
            return np.tile(np.array([[0.1, 0.2, 0.7]], np.float32), (len(batch), 1))

    built = []
    monkeypatch.setattr(Run, "classifier", lambda self, *args, **kwargs: built.append(args) or Marked())
    from pipeline import api

    found = api.predict(head_run["run"], [str(head_run["data"] / "cats" / "img000.png")])
    assert built and found[0].labels[0] == run.class_names[2] and found[0].probabilities[0] == pytest.approx(0.7)
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


def _cache_of(tmp_path: Path, name: str, seed: int) -> Path:
    features, labels, splits = clustered_features(150, 3, seed=seed)
    cache = write_feature_cache(tmp_path / "features" / name, features, labels, splits, ["a", "b", "c"])
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dataset"]["root"] = str(tmp_path / name)  # each cache of its own image folder
    manifest_path.write_text(json.dumps(manifest))
    return cache


def _damaged_copy(source: dict[str, Path], tmp_path: Path, relative: str, shape: str) -> dict[str, Path]:
    import shutil

    copy = {"data": source["data"]}
    shutil.copytree(source["root"] / "features", tmp_path / "features")
    shutil.copytree(source["root"] / "models", tmp_path / "models")
    copy["cache"] = tmp_path / "features" / source["cache"].name
    copy["run"] = tmp_path / "models" / "run"
    target = {"manifest.json": copy["cache"] / "manifest.json",
              "file_hashes.json": copy["cache"] / "file_hashes.json"}.get(relative, copy["run"] / relative)
    value = _SHAPES[shape]
    if shape == "wrong types":  # the right keys with values of the wrong type
        original = json.loads(target.read_text())
        value = {key: [] for key in original} if isinstance(original, dict) else [{}]
    target.write_text(value if shape == "deep nesting" else json.dumps(value))
    return copy


_SHAPES = {"a list": [1, 2], "missing keys": {"unexpected": 1}, "wrong types": None,
           "deep nesting": "[" * 100_000 + "]" * 100_000}  # written as it is: deeper than any parser recurses


def _head_run(tmp_path: Path, name: str) -> Path:
    features, labels, splits = clustered_features(120, 3, seed=2)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    return run_training(TrainOptions(features=cache, models=tmp_path / "models", name=name, head_params=FAST_LOGREG,
                                     progress=False)).directory


_HOLDER = """
import sys, time
from pathlib import Path
from pipeline import atomic
with atomic.replacing_directory(Path(sys.argv[1])) as staging:
    (staging / "head.json").write_text("{}")
    print(staging, flush=True)
    time.sleep(120)
"""


_AUDIT_HOOKS: list = []  # sys.addaudithook cannot be undone: one hook that calls these
_RECORDING = True
sys.addaudithook(lambda event, args: [hook(event, args) for hook in _AUDIT_HOOKS])


def test_staging_directories_are_never_listed_or_chosen_and_dead_ones_are_removed(tmp_path: Path, capsys) -> None:
    features, labels, splits = clustered_features(120, 3, seed=2)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    models = tmp_path / "models"
    real = run_training(TrainOptions(head="logreg", features=cache, models=models, name="real",
                                     head_params=FAST_LOGREG, progress=False)).directory
    # A run killed after its staging directory was complete, before the rename: a perfect copy
    # with a better validation accuracy, under the staging name of a process that is gone.
    leftover = models / f".ghost.tmp-{dead_pid()}"
    shutil.copytree(real, leftover)
    metrics = json.loads((leftover / "metrics.json").read_text())
    metrics["validation"]["accuracy"] = 1.5
    (leftover / "metrics.json").write_text(json.dumps(metrics))
    live = models / f".busy.tmp-{os.getpid()}"  # a staging directory of a live process
    shutil.copytree(real, live)

    assert [row["name"] for row in runs.list_runs(models)] == ["real"]
    assert runs.best_run(models) == real
    result = in_process(capsys, "runs", "--models", str(models), "--json")
    assert [row["name"] for row in json.loads(result.stdout)] == ["real"]
    with pytest.raises(PipelineError, match="staging directory"):
        runs.read_config(leftover)

    run_training(TrainOptions(head="logreg", features=cache, models=models, name="next",
                              head_params=FAST_LOGREG, progress=False))
    assert not leftover.exists(), "the next run removes a dead process's leftovers"
    assert live.exists(), "a live process's staging directory is left alone"


def test_a_killed_evaluate_leaves_no_empty_metrics_and_evaluate_recovers(tmp_path: Path) -> None:
    import signal
    import subprocess

    features, labels, splits = clustered_features(120, 3, seed=3)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    run = run_training(TrainOptions(head="logreg", features=cache, models=tmp_path / "models",
                                    head_params=FAST_LOGREG, progress=False)).directory
    rng = np.random.default_rng(5)
    killed = 0
    for _ in range(4):  # SIGKILL evaluate at random moments while it writes its reports
        before = (run / "metrics.json").stat().st_mtime_ns
        process = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "evaluate", "--model", str(run)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while time.monotonic() - started < 120 and process.poll() is None and not any(
                p.name.startswith(".") for p in run.iterdir()):
            time.sleep(0.001)  # until it begins to write
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed += process.returncode == -signal.SIGKILL
        metrics = json.loads((run / "metrics.json").read_text())  # never empty, never half written
        assert metrics["test"]["images"] > 0
        assert (run / "metrics.json").stat().st_mtime_ns >= before
    assert killed >= 3, "the kills landed while evaluate ran"
    (run / "metrics.json").write_text("")  # what a kill between open and write used to leave
    summary = evaluate_run(run)
    assert summary.metrics["test"]["accuracy"] > 0.9
    assert json.loads((run / "metrics.json").read_text())["validation"]["images"] > 0


def test_every_file_a_run_writes_is_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers only ever open hidden temporary names: a kill at any moment leaves the old file or
    the new one, never an empty or half one."""
    features, labels, splits = clustered_features(120, 3, seed=4)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, THREE_CLASSES)
    run = run_training(TrainOptions(head="logreg", features=cache, models=tmp_path / "models",
                                    head_params=FAST_LOGREG, progress=False)).directory
    opened: list[str] = []

    def record(event: str, args: tuple) -> None:
        if event == "open" and _RECORDING and isinstance(args[0], str | Path) and str(args[0]).startswith(str(run)):
            mode, flags = args[1], args[2]
            if (mode and any(flag in mode for flag in "wax")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                opened.append(Path(args[0]).name)

    _AUDIT_HOOKS.append(record)
    try:
        evaluate_run(run)
        evaluate_run(run, "validation")
    finally:
        _AUDIT_HOOKS.remove(record)
    assert opened, "evaluate writes its reports"
    assert all(name.startswith(".") and ".tmp" in name for name in opened), opened

    # train-head and finetune write every file of a run inside a hidden staging directory (or
    # under a hidden temporary name): nothing visible is ever open for writing
    models = tmp_path / "models"
    written: list[Path] = []

    def record_runs(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | Path) and str(args[0]).startswith(str(models)):
            mode, flags = args[1], args[2]
            if (mode and any(flag in mode for flag in "wax")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(Path(args[0]).relative_to(models))

    data = make_image_folder(tmp_path / "images", per_class=6)
    image_cache = extract_features(tiny_options(data, tmp_path / "image-cache")).cache_dir
    _AUDIT_HOOKS.append(record_runs)
    try:
        head = run_training(TrainOptions(head="logreg", features=image_cache, models=models, name="watched",
                                         head_params=FAST_LOGREG, progress=False)).directory
        from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning

        run_finetuning(FinetuneOptions(source=str(head), models=models, epochs=1, batch_size=4, progress=False))
    finally:
        _AUDIT_HOOKS.remove(record_runs)
    staged = {path.parts[0] for path in written}
    assert any(name.startswith(".watched.tmp-") for name in staged), staged  # train-head was watched
    assert any(name.startswith(".watched-finetuned") for name in staged), staged  # and finetune
    visible = [str(path) for path in written if not any(part.startswith(".") for part in path.parts)]
    assert not visible, visible


def _a_head_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A logistic-regression run "run" on a small cache; extract's flags, to re-split that cache."""
    data = make_image_folder(tmp_path / "data", per_class=10)
    cache_root, models = tmp_path / "features", tmp_path / "models"
    common = ["--data", str(data), "--cache", str(cache_root), "--weights", "none", "--image-size", "32",
              "--precision", "fp32", "--no-progress"]
    assert main(["extract", *common]) == 0
    assert main(["train-head", "--head", "logreg", "--cache", str(cache_root), "--models", str(models),
                 "--c-grid", "0.1,1", "--n-jobs", "1", "--name", "run", "--no-progress"]) == 0
    return models, common


def test_evaluate_refuses_a_cache_that_was_re_split_since_training(tmp_path: Path, capsys) -> None:
    models, common = _a_head_run(tmp_path)
    before = (models / "run" / "metrics.json").read_text()
    assert (models / "run" / runs.SPLIT_RECORD).is_file()
    assert main(["extract", *common, "--val-fraction", "0.05", "--test-fraction", "0.6"]) == 0
    result = in_process(capsys, "evaluate", "--model", str(models / "run"))
    line = one_error_line(result)
    assert "other splits than run run was trained with" in line
    assert (models / "run" / "metrics.json").read_text() == before, "the run's metrics are untouched"
    result = in_process(capsys, "evaluate", "--model", str(models / "run"), "--tta", "flip")  # from images: the same
    assert "other splits than run run was trained with" in one_error_line(result)
    assert not (models / "run" / "tta-flip").exists()
    assert main(["extract", *common]) == 0  # the split the run was trained with: evaluate works again
    assert main(["evaluate", "--model", str(models / "run")]) == 0


def test_finetune_refuses_a_cache_that_was_re_split_since_the_head_was_trained(tmp_path: Path, capsys) -> None:
    models, common = _a_head_run(tmp_path)
    assert main(["extract", *common, "--split-seed", "7"]) == 0  # the same images, dealt into other splits
    result = in_process(capsys, "finetune", "--from", str(models / "run"), "--models", str(models), "--epochs", "1",
                     "--batch-size", "4", "--no-progress")
    line = one_error_line(result)
    assert "other splits than run run was trained with" in line
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["run"], "nothing written"


@pytest.mark.parametrize("target", ["file_hashes.json", "classification_report.txt", "config.json"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing_half_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, target: str) -> None:
    import errno

    data = make_image_folder(tmp_path / "data", per_class=5)
    common = ["--cache", str(tmp_path / "features")]
    extract = ["extract", "--data", str(data), *common, "--weights", "none", "--image-size", "32",
               "--precision", "fp32", "--no-progress"]
    if target != "file_hashes.json":
        assert main(extract) == 0
    real_write_text = Path.write_text

    failed_after_writing: list[Path] = []

    def full_disk(self: Path, text: str, *args, **kwargs):
        if target in self.name:  # the disk fills up half way through the temporary file
            real_write_text(self, text[:len(text) // 2], *args, **kwargs)
            failed_after_writing.append(self)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    command = extract if target == "file_hashes.json" else [
        "train-head", *common, "--models", str(tmp_path / "models"), "--c-grid", "1", "--n-jobs", "1",
        "--no-progress", "--name", "run"]
    capsys.readouterr()
    assert main(command) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and "No space left on device" in err[0] and target in err[0], err
    assert failed_after_writing and failed_after_writing[0].name.startswith("."), "a temporary was half written"
    assert not failed_after_writing[0].exists(), "the half-written temporary is removed"
    assert not list(tmp_path.rglob(f".{target}*")), "no temporary file is left"
    assert not (tmp_path / "models" / "run").exists()
    models = tmp_path / "models"
    leftovers = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
    assert not leftovers, f"no staging directory with the files written before the failure: {leftovers}"


def test_a_live_staging_directory_survives_a_cleaner_that_cannot_see_its_pid(tmp_path: Path,
                                                                                monkeypatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(models / "run")], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        staging = Path(holder.stdout.readline().strip())
        assert staging.name.startswith(f".run.tmp-{holder.pid}-"), "the PID and a random token"
        # Another PID namespace (a container, an NFS client): the writer's PID looks dead.
        monkeypatch.setattr(atomic, "process_alive", lambda pid: False)
        assert runs.remove_leftovers(models) == []
        assert (staging / "head.json").exists(), "a live run's staging directory is left alone"
    finally:
        holder.kill()
        holder.wait()
    assert runs.remove_leftovers(models) == [staging], "once its writer is gone, it is a leftover"


def test_a_run_whose_staging_directory_was_deleted_says_so(tmp_path: Path) -> None:
    import shutil

    with pytest.raises(PipelineError, match="deleted or replaced by another process.*nothing was saved"):
        with atomic.replacing_directory(tmp_path / "run") as staging:
            shutil.rmtree(staging)
    assert not (tmp_path / "run").exists()


def test_two_writers_with_one_pid_never_mix_their_files(tmp_path: Path) -> None:
    """Two containers sharing --models can run train-heads with the same PID: each writer's staging
    directory is its own (PID and a random token), and the run renamed in is one writer's, whole."""
    final = tmp_path / "run"
    with atomic.replacing_directory(final) as first:
        (first / "head.json").write_text("first")
        with atomic.replacing_directory(final) as second:  # the same PID, as in another PID namespace
            assert second != first and first.is_dir()
            (second / "head.json").write_text("second")
            (second / "config.json").write_text("second")
        assert (final / "head.json").read_text() == "second"
        (first / "config.json").write_text("first")
    assert (final / "head.json").read_text() == "first" and (final / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing else is left"


def test_a_writer_renames_in_only_its_own_staging_directory(tmp_path: Path) -> None:
    import shutil

    final = tmp_path / "run"
    with pytest.raises(PipelineError, match="deleted or replaced by another process"):
        with atomic.replacing_directory(final) as staging:
            (staging / "head.json").write_text("mine")
            shutil.rmtree(staging)  # another process's cleaner, then another writer, under the same name
            staging.mkdir()
            (staging / atomic.STAGING_LOCK).write_text("")
            (staging / "head.json").write_text("theirs")
    assert not final.exists(), "another writer's files are never renamed in as this run"


def test_replacing_a_run_leaves_the_old_or_the_new_one_whole_at_every_instant(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """The old run and the new one are swapped in one rename; a writer killed right after it
    leaves the new run in place (its old one is a leftover the next writer removes)."""
    final = tmp_path / "models" / "run"
    final.mkdir(parents=True)
    (final / "head.json").write_text("old")
    seen = []
    real_exchange = atomic._exchange

    def exchange_then_look(first: Path, second: Path) -> bool:
        done = real_exchange(first, second)
        seen.append((second / "head.json").read_text())  # the instant after the swap
        return done

    monkeypatch.setattr(atomic, "_exchange", exchange_then_look)
    with atomic.replacing_directory(final) as staging:
        (staging / "head.json").write_text("new")
    assert seen == ["new"] and (final / "head.json").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["run"]


def test_a_writer_killed_between_moving_the_old_run_aside_and_renaming_the_new_one_in(tmp_path: Path) -> None:
    """Where the file system cannot swap two directories, the old run is moved aside first: a kill
    between the two renames leaves it whole under its retired name, and the next writer puts it
    back instead of removing it (and removes the dead writer's staging directory)."""
    models = tmp_path / "models"
    models.mkdir()
    pid = dead_pid()
    retired = models / f".run.old-{pid}-0a1b2c3d"
    retired.mkdir()
    (retired / "head.json").write_text("old")
    staging = models / f".run.tmp-{pid}-0a1b2c3d"
    staging.mkdir()
    (staging / atomic.STAGING_LOCK).write_text("")
    (staging / "head.json").write_text("new, never renamed in")
    removed = runs.remove_leftovers(models)
    assert removed == [staging]
    assert (models / "run" / "head.json").read_text() == "old"
    assert sorted(p.name for p in models.iterdir()) == ["run"]


def test_a_fifo_where_a_lock_or_json_file_belongs_is_never_waited_on(tmp_path: Path, head_run: dict[str, Path],
                                                                    capsys) -> None:
    models = tmp_path / "models"
    leftover = models / f".run.tmp-{dead_pid()}-0a1b2c3d"
    leftover.mkdir(parents=True)
    os.mkfifo(leftover / atomic.STAGING_LOCK)
    assert atomic.staging_is_abandoned(leftover) is False  # answered at once, not waited on
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(OSError, match="not a regular file"):
        atomic.read_json(tmp_path / "config.json")
    assert main(["train-head", "--features", str(head_run["cache"]), "--models", str(models), "--no-progress",
                 "--c-grid", "1", "--n-jobs", "1", "--name", "next"]) == 0
    assert (models / "next" / "config.json").is_file()


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, "0.9", float("inf")])
def test_an_accuracy_that_is_not_a_fraction_never_wins_best_and_runs_json_stays_json(
        tmp_path: Path, capsys, bad: object) -> None:
    good = _head_run(tmp_path, "zz-good")
    broken = _head_run(tmp_path, "aa-broken")
    metrics = json.loads((broken / "metrics.json").read_text())
    metrics["validation"]["accuracy"] = bad
    metrics["test"]["accuracy_ci95_low"] = bad
    (broken / "metrics.json").write_text(json.dumps(metrics))
    assert runs.best_run(tmp_path / "models") == good
    assert main(["runs", "--models", str(tmp_path / "models"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in runs --json"))
    assert {r["name"]: r["validation_accuracy"] for r in rows}["aa-broken"] is None


@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("relative", ["manifest.json", "file_hashes.json", "config.json", "head.json",
                                      "metrics.json"])
def test_json_of_the_wrong_shape_is_one_line_in_every_command(head_run: dict[str, Path], tmp_path: Path,
                                                              capsys, relative: str, shape: str) -> None:
    copy = _damaged_copy(head_run, tmp_path, relative, shape)
    commands = {
        "extract": ["extract", "--data", str(copy["data"]), "--cache", str(tmp_path / "features"), "--weights",
                    "none", "--image-size", "32", "--precision", "fp32", "--batch-size", "4", "--shard-size", "8",
                    "--val-fraction", "0.2", "--test-fraction", "0.2", "--no-progress"],
        "train-head": ["train-head", "--features", str(copy["cache"]), "--models", str(tmp_path / "models"),
                       "--c-grid", "0.1,1", "--n-jobs", "1", "--no-progress", "--name", "again"],
        "evaluate": ["evaluate", "--model", str(copy["run"])],
        "predict": ["predict", "--model", str(copy["run"]), str(next(copy["data"].rglob("*.png")))],
        "runs": ["runs", "--models", str(tmp_path / "models")],
    }
    for name, argv in commands.items():
        code = main(argv)  # a traceback would escape main and fail the test
        err = capsys.readouterr().err.strip()
        assert code in (0, 1), name
        if code:
            assert len(err.splitlines()) == 1 and err.startswith("error: "), f"{name}: {err[-500:]}"


def test_a_training_image_renamed_into_the_test_split_is_never_scored_as_a_test_image(tmp_path: Path,
                                                                                      capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8)
    config = SplitConfig(0.2, 0.2, 0)
    cache = extract_features(tiny_options(data, tmp_path / "c", splits=config)).cache_dir
    run = run_training(TrainOptions(features=cache, models=tmp_path / "m", head_params=FAST_LOGREG,
                                    progress=False)).directory
    from pipeline.cache.store import FeatureStore

    trained = FeatureStore(cache).split_indexes()["train"].paths[0]
    name = next(f"renamed{i}.png" for i in range(1000) if split_position(f"renamed{i}.png", 0) < 0.2)
    (data / trained).rename(data / trained.split("/")[0] / name)
    extract_features(tiny_options(data, tmp_path / "c", splits=config))
    assert main(["evaluate", "--model", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert "in the test split, with the same content as" in err and trained in err and len(err.splitlines()) == 1


def test_a_killed_evaluates_temporary_metrics_file_is_removed_by_the_next_evaluate(head_run: dict[str, Path]) -> None:
    import shutil

    from pipeline.training.train import evaluate_run

    leftover = head_run["run"] / f".metrics.json.{dead_pid()}.tmp"
    leftover.write_text('{"half": ')
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live evaluate elsewhere
    live = head_run["run"] / f".metrics.json.{writer.pid}.tmp"
    live.write_text("{}")
    try:
        evaluate_run(head_run["run"])
        assert not leftover.exists(), "a dead process's temporary is removed"
        assert live.exists(), "a live writer's temporary is left alone"
    finally:
        writer.kill()
        writer.wait()
        live.unlink(missing_ok=True)
        shutil.rmtree(head_run["run"] / "validation", ignore_errors=True)


def test_a_run_name_with_a_newline_stays_on_its_row_of_the_runs_table() -> None:
    from pipeline.report import runs_table

    table = runs_table([{"name": "evil\nname", "head": "logreg", "validation_accuracy": 0.5},
                        {"name": "plain", "head": "dense", "validation_accuracy": 0.4}])
    rows = table.splitlines()
    assert rows[1].startswith("evil\\nname") and rows[2].startswith("plain")


def test_best_chooses_among_one_data_folders_runs_and_runs_shows_the_folder(tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    full = run_training(TrainOptions(features=_cache_of(tmp_path, "full", 1), models=models, name="full",
                                     head_params=FAST_LOGREG, progress=False))
    subset = run_training(TrainOptions(features=_cache_of(tmp_path, "subset", 2), models=models, name="subset",
                                       head_params=FAST_LOGREG, progress=False))
    assert full.config["features"]["data"] == str(tmp_path / "full")
    with pytest.raises(PipelineError, match="trained on 2 data folders.*--data DIR"):
        runs.best_run(models)
    assert runs.best_run(models, data=tmp_path / "full") == full.directory
    assert runs.best_run(models, data=tmp_path / "subset") == subset.directory
    assert [r["name"] for r in runs.list_runs(models, tmp_path / "subset")] == ["subset"]

    assert main(["runs", "--models", str(models)]) == 0
    table = capsys.readouterr().out
    assert "data" in table.splitlines()[0] and "subset" in table and "2 folders" in table
    assert main(["runs", "--models", str(models), "--json"]) == 0
    assert {row["data"] for row in json.loads(capsys.readouterr().out)} == {str(tmp_path / "full"),
                                                                            str(tmp_path / "subset")}
    assert main(["predict", "--model", "best", "--models", str(models), str(tmp_path)]) == 1
    assert "--data DIR" in capsys.readouterr().err


def test_evaluate_is_staged_by_the_run_writer_and_an_interrupt_leaves_the_scores_as_they_were(
        head_run: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate scores a finished run in a staging folder inside it and moves the files in when
    complete: stopped half-way (after the reports, before the metrics), the run's metrics.json
    and reports are the earlier ones, byte for byte, and nothing is left behind; a killed
    evaluate's staging folder is removed by the next."""
    from pipeline import report
    from pipeline.runs import writer
    from pipeline.training.train import evaluate_run

    run = head_run["run"]
    evaluate_run(run)
    split_reports = report.write_split_reports
    before = {path.relative_to(run): path.read_bytes() for path in run.rglob("*") if path.is_file()}
    abandoned = run / f".{writer.RESCORING}.tmp-{dead_pid()}-0badcafe"
    abandoned.mkdir()
    (abandoned / "metrics.json").write_text("{}")

    scored, split_metrics = [], report.split_metrics

    def second_split_interrupted(*args, **kwargs):
        if scored:
            raise KeyboardInterrupt
        scored.append(args)
        return split_metrics(*args, **kwargs)

    monkeypatch.setattr(report, "split_metrics", second_split_interrupted)
    reports = []
    monkeypatch.setattr(report, "write_split_reports",
                        lambda *args, **kwargs: reports.append(args[0]) or split_reports(*args, **kwargs))
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, "train")  # the train split first: its reports written, then stopped
    assert reports and writer.RESCORING in str(reports[0]), "the reports were written, into the staging folder"
    after = {path.relative_to(run): path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert after == before, "an interrupted evaluate changed nothing in the run"
    assert not abandoned.exists(), "a dead evaluate's staging folder is removed by the next"
    monkeypatch.undo()
    evaluate_run(run, "validation")
    assert (run / "validation" / "classification_report.txt").is_file()
    assert not [path for path in run.iterdir() if path.name.startswith(".")]
