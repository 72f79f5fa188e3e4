"""Trust, round three (issue 22): what an outside attack found, each with a test that failed on
the code before its fix."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, clustered_features, make_image_folder, tiny_options, write_feature_cache, write_image
from pipeline import atomic, runs
from pipeline.cli import main
from pipeline.data.dataset import SplitConfig, scan_dataset, split_position
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.heads import make_head
from pipeline.heads.logreg import MAX_GRID, log_grid
from pipeline.training.train import TrainOptions, train_head

CLASSES = ["ant", "bee", "cat"]
FAST_LOGREG = {"c_grid": "1e-3:1e1:5", "n_jobs": 1}


# --- D1: a staging directory belongs to whoever holds its lock, not to a PID ----------------------

_HOLDER = """
import sys, time
from pathlib import Path
from pipeline import atomic
with atomic.replacing_directory(Path(sys.argv[1])) as staging:
    (staging / "head.json").write_text("{}")
    print(staging, flush=True)
    time.sleep(120)
"""


def test_a_live_staging_directory_survives_a_cleaner_that_cannot_see_its_pid(tmp_path: Path,
                                                                                monkeypatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(models / "run")], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        staging = Path(holder.stdout.readline().strip())
        assert staging.name == f".run.tmp-{holder.pid}"
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

    with pytest.raises(PipelineError, match="deleted by another process.*nothing was saved"):
        with atomic.replacing_directory(tmp_path / "run") as staging:
            shutil.rmtree(staging)
    assert not (tmp_path / "run").exists()


# --- S1: adding one image never moves an existing one ---------------------------------------------


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


# --- S5, S6: class folders ------------------------------------------------------------------------


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


# --- S7, S8, H5 and parameter edges ---------------------------------------------------------------


def _head_run(tmp_path: Path, name: str) -> Path:
    features, labels, splits = clustered_features(120, 3, seed=2)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    return train_head(TrainOptions(features=cache, models=tmp_path / "models", name=name, head_params=FAST_LOGREG,
                                   progress=False)).directory


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


@pytest.mark.parametrize("grid", ["inf", "1e-3,inf", "nan,1", "1:0:5", "0:1:3", "1e-6:1e5:0", "-1:1:3",
                                  "1e-6:1e5:100000000", "1:2"])
def test_c_grids_that_cannot_be_searched_are_refused(grid: str) -> None:
    with pytest.raises(PipelineError, match="--c-grid"):
        log_grid(grid)


def test_the_largest_c_grid_is_bounded() -> None:
    assert len(log_grid(f"1e-3:1e3:{MAX_GRID}")) == MAX_GRID
    with pytest.raises(PipelineError, match=f"COUNT must be 1 to {MAX_GRID}"):
        log_grid(f"1e-3:1e3:{MAX_GRID + 1}")


@pytest.mark.parametrize("kind, params, flag", [
    ("logreg", {"n_jobs": 0}, "--n-jobs 0"),
    ("dense", {"dropout": 1.5}, "--dropout 1.5"),
    ("dense", {"dropout": -0.1}, "--dropout -0.1"),
    ("dense", {"lr": -1e-3}, "--lr -0.001"),
    ("dense", {"lr": 0.0}, "--lr 0.0"),
])
def test_head_parameters_out_of_range_are_refused(kind: str, params: dict, flag: str) -> None:
    with pytest.raises(PipelineError, match=flag):
        make_head(kind, CLASSES, params)


def test_a_bad_c_grid_fails_in_one_line_before_the_features_are_read(tmp_path: Path, capsys, monkeypatch) -> None:
    import pipeline.training.train as train_module

    features, labels, splits = clustered_features(60, 3, seed=2)
    cache = write_feature_cache(tmp_path / "cache", features, labels, splits, CLASSES)
    monkeypatch.setattr(train_module, "load_splits", lambda *a, **k: pytest.fail("features read"))
    assert main(["train-head", "--features", str(cache), "--models", str(tmp_path / "m"),
                 "--c-grid", "1e-6:1e5:100000000"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "COUNT must be 1 to" in err


# --- H1, H2: Ray ----------------------------------------------------------------------------------


class _Cluster:
    def __init__(self, cpus: int, gpus: int = 0, nodes: int = 1) -> None:
        self.resources = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
        self.gpus, self.nodes = gpus, nodes


@pytest.mark.parametrize("workers, cpus, gpus", [(2, 2, 0), (1000, 16, 0), (1, 1, 0), (3, 16, 2)])
def test_more_ray_workers_than_the_cluster_can_feed_are_refused(workers: int, cpus: int, gpus: int) -> None:
    from pipeline.extraction.ray_engine import RayEngine

    engine = RayEngine(None, None, 32, 8, 1 << 20, workers=workers)
    with pytest.raises(PipelineError, match=f"--workers {workers}: the Ray cluster has"):
        engine.actor_options(_Cluster(cpus, gpus))


def test_ray_workers_the_cluster_can_feed_are_taken() -> None:
    from pipeline.extraction.ray_engine import RayEngine

    assert RayEngine(None, None, 32, 8, 1 << 20, workers=3).actor_options(_Cluster(4))[0] == 3
    assert RayEngine(None, None, 32, 8, 1 << 20).actor_options(_Cluster(2, nodes=1))[0] == 1
    assert RayEngine(None, None, 32, 8, 1 << 20).actor_options(_Cluster(16, gpus=2))[0] == 2


def test_a_ray_address_where_something_else_listens_is_refused_quickly() -> None:
    from pipeline.extraction.ray_engine import check_address

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        connection, _ = server.accept()
        connection.recv(100)
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        connection.close()

    threading.Thread(target=answer, daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(PipelineError, match="not a Ray head node"):
        check_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=2.0)
    assert time.perf_counter() - started < 10
    server.close()


def test_a_ray_address_that_accepts_and_says_nothing_is_refused_after_the_timeout() -> None:
    from pipeline.extraction.ray_engine import check_address

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with pytest.raises(PipelineError, match="not a Ray head node"):
        check_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=1.0)
    server.close()


# --- H4: a FIFO named like a shard -----------------------------------------------------------------


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    first = extract_features(tiny_options(data, tmp_path / "c"))
    from pipeline.cache import store

    fifo = first.cache_dir / store.shard_name(99)
    os.mkfifo(fifo)
    code = ("import sys; from pipeline.extraction.extract import extract_features; sys.path.insert(0, 'tests'); "
            "from conftest import tiny_options; from pathlib import Path; "
            f"extract_features(tiny_options(Path({str(data)!r}), Path({str(tmp_path / 'c')!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode != 0
    assert "is named like a shard but is not a regular file" in result.stderr
    assert math.isfinite(first.seconds)


# --- JSON that parses but has the wrong shape ------------------------------------------------------

_SHAPES = {"a list": [1, 2], "missing keys": {"unexpected": 1}, "wrong types": None,
           "deep nesting": "[" * 100_000 + "]" * 100_000}  # written as it is: deeper than any parser recurses


@pytest.fixture(scope="module")
def cache_and_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    data = make_image_folder(root / "data", per_class=5)
    cache = extract_features(tiny_options(data, root / "features")).cache_dir
    run = train_head(TrainOptions(features=cache, models=root / "models", name="run", head_params=FAST_LOGREG,
                                  progress=False)).directory
    return {"root": root, "data": data, "cache": cache, "run": run}


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


@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("relative", ["manifest.json", "file_hashes.json", "config.json", "head.json",
                                      "metrics.json"])
def test_json_of_the_wrong_shape_is_one_line_in_every_command(cache_and_run: dict[str, Path], tmp_path: Path,
                                                              capsys, relative: str, shape: str) -> None:
    copy = _damaged_copy(cache_and_run, tmp_path, relative, shape)
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


# --- S2: a training image renamed into the test split ---------------------------------------------


def test_a_training_image_renamed_into_the_test_split_is_never_scored_as_a_test_image(tmp_path: Path,
                                                                                      capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8)
    config = SplitConfig(0.2, 0.2, 0)
    cache = extract_features(tiny_options(data, tmp_path / "c", splits=config)).cache_dir
    run = train_head(TrainOptions(features=cache, models=tmp_path / "m", head_params=FAST_LOGREG,
                                  progress=False)).directory
    from pipeline.cache.store import FeatureStore

    trained = FeatureStore(cache).split_indexes()["train"].paths[0]
    name = next(f"renamed{i}.png" for i in range(1000) if split_position(f"renamed{i}.png", 0) < 0.2)
    (data / trained).rename(data / trained.split("/")[0] / name)
    extract_features(tiny_options(data, tmp_path / "c", splits=config))
    assert main(["evaluate", "--model", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert "in the test split, with the same content as" in err and trained in err and len(err.splitlines()) == 1


# --- S3, S4 and export's smaller items -------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export3")
    data = make_image_folder(root / "data", per_class=5, classes=tuple(CLASSES))
    cache = extract_features(tiny_options(data, root / "features")).cache_dir
    return train_head(TrainOptions(features=cache, models=root / "models", name="small", head_params=FAST_LOGREG,
                                   progress=False)).directory


def test_export_into_another_runs_export_folder_lists_only_its_own_formats(small_run: Path, tmp_path: Path) -> None:
    from pipeline.serving.export import export_run

    out = tmp_path / "shipped"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"run": "/elsewhere/other-run", "classes": ["x", "y"],
                                                 "formats": {"model.tflite": {"file": "model.tflite"}}}))
    export_run(small_run, "keras", out)
    details = json.loads((out / "export.json").read_text())
    assert list(details["formats"]) == ["model.keras"] and details["classes"] == CLASSES
    export_run(small_run, "keras", out)  # the same run again: its own formats stay listed
    assert list(json.loads((out / "export.json").read_text())["formats"]) == ["model.keras"]


def test_export_into_the_runs_own_folder_is_refused(small_run: Path) -> None:
    from pipeline.serving.export import export_run

    before = sorted(p.name for p in small_run.iterdir())
    with pytest.raises(PipelineError, match="is the run's own folder"):
        export_run(small_run, "keras", small_run)
    assert sorted(p.name for p in small_run.iterdir()) == before


def test_export_refuses_a_model_whose_outputs_disagree_with_its_labels(small_run: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    from pipeline.runs import Run
    from pipeline.serving import export

    opened = Run.open(small_run)
    monkeypatch.setattr(Run, "open", classmethod(lambda cls, *a, **k: opened))
    opened.class_names = CLASSES + ["extra"]  # labels.txt replaced while export read the run
    with pytest.raises(PipelineError, match="labels.txt lists 4 classes, the model has 3 outputs"):
        export.export_run(small_run, "keras", tmp_path / "out")


# --- smaller items ----------------------------------------------------------------------------------


def test_a_valid_output_name_near_the_file_system_limit_gets_a_temporary_name_that_fits(tmp_path: Path) -> None:
    target = tmp_path / ("p" * 245 + ".json")
    assert len(target.name.encode()) == 250
    temporary = atomic.temporary_name(target)
    assert len(temporary.name.encode()) <= atomic.NAME_MAX and temporary.name.startswith(".")
    atomic.write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert atomic.temporary_name(tmp_path / ("q" * 245 + ".json")) != temporary


def test_h5pys_disk_full_error_from_close_is_one_line(tmp_path: Path) -> None:
    message = ("Can't decrement id ref count (file write failed: time = Tue Dec  1 00:00:00 2026, filename = "
               "'x.h5', file descriptor = 5, errno = 28, error message = 'No space left on device', buf = 0x1, "
               "total write size = 8, bytes this sub-write = 8, bytes actually written = 18446744073709551615, "
               "offset = 0)")
    with pytest.raises(PipelineError) as caught:
        with atomic.replacing(tmp_path / "shard.h5") as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError(message)
    text = str(caught.value)
    assert "the disk is full" in text and "\n" not in text
    assert list(tmp_path.iterdir()) == []


def test_a_cache_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    with pytest.raises(PipelineError, match="inside the data folder"):
        extract_features(tiny_options(data, data / "features"))
    assert not (data / "features").exists()


def test_a_read_only_models_folder_is_named_not_the_probe(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o500)
    try:
        if os.access(models, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(PipelineError) as caught:
            runs.check_writable(models)
        message = str(caught.value)
        assert message.startswith(f"cannot save runs in {models}: ") and ".write-test" not in message
    finally:
        models.chmod(0o700)


def test_a_file_name_that_is_not_utf8_is_listed_and_the_rest_extracted(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data", per_class=3)
    odd = os.fsdecode(b"caf\xe9.png")
    write_image(data / "cats" / odd, seed=77)
    summary = extract_features(tiny_options(data, tmp_path / "c"))
    assert summary.images == 6
    manifest = json.loads((summary.cache_dir / "manifest.json").read_text())
    assert {"path": "cats/caf\\xe9.png", "reason": manifest["ignored"][0]["reason"]} in manifest["ignored"]
    assert main(["predict", "--model", "best", "--models", str(tmp_path / "none"), str(data / "cats" / odd)]) == 1


# --- H3: the decompression-bomb guard reads what the decoders accept ------------------------------


def _jpeg_with_a_stray_byte(width: int, height: int) -> bytes:
    """A JPEG with one junk byte before its frame header: libjpeg warns and decodes it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, "JPEG")
    data = buffer.getvalue()
    frame = data.index(b"\xff\xc0")
    return data[:frame] + b"\x00" + data[frame:]


def _webp(width: int, height: int, lossless: bool) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "WEBP", lossless=lossless)
    return buffer.getvalue()


@pytest.mark.parametrize("make", [lambda w, h: _jpeg_with_a_stray_byte(w, h),
                                  lambda w, h: _webp(w, h, lossless=False),
                                  lambda w, h: _webp(w, h, lossless=True)], ids=["jpeg-stray-byte", "webp", "webp-ll"])
def test_the_header_parser_reads_what_the_decoder_accepts(make) -> None:
    from pipeline.images.formats import image_dimensions

    assert image_dimensions(make(321, 123)) == (321, 123)


def test_disguised_large_images_are_held_back_by_predict_and_extract(tmp_path: Path, capsys, small_run: Path) -> None:
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
        assert main(["predict", "--model", str(small_run), "--max-megapixels", "0.05", str(data / name)]) == 1
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


def test_a_killed_evaluates_temporary_metrics_file_is_removed_by_the_next_evaluate(small_run: Path) -> None:
    import shutil

    from pipeline.training.train import evaluate_run

    leftover = small_run / f".metrics.json.{_dead_pid()}.tmp"
    leftover.write_text('{"half": ')
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live evaluate elsewhere
    live = small_run / f".metrics.json.{writer.pid}.tmp"
    live.write_text("{}")
    try:
        evaluate_run(small_run)
        assert not leftover.exists(), "a dead process's temporary is removed"
        assert live.exists(), "a live writer's temporary is left alone"
    finally:
        writer.kill()
        writer.wait()
        live.unlink(missing_ok=True)
        shutil.rmtree(small_run / "validation", ignore_errors=True)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_pipeline_error_buried_in_a_keras_error_comes_out_as_one_line(monkeypatch, capsys) -> None:
    import pipeline.cli as cli

    def buried(args):
        raise RuntimeError("Graph execution error:\n\nDetected at node PyFunc defined at (most recent call last):\n"
                           "  File ...\npipeline.errors.PipelineError: features/x/shard-00001.h5 changed while it was "
                           "being read: rerun when the extract has finished\n\t [[{{node PyFunc}}]]")

    monkeypatch.setattr(cli, "_train_head", buried)
    assert main(["train-head"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: features/x/shard-00001.h5 changed while it was being read: rerun when the extract has "
                   "finished")


def test_a_streamed_source_that_fails_surfaces_its_own_error_from_fit() -> None:
    import keras
    import numpy as np

    from pipeline.heads.fitting import StreamedExamples, fit

    def chunks(epoch):
        yield np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
        raise PipelineError("shard-00002.h5 changed while it was being read: rerun")

    data = StreamedExamples(chunks, 8, 4)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(PipelineError, match="^shard-00002.h5 changed while it was being read: rerun$"):
        fit(model, data, epochs=1, verbose=0)


def test_libjpeg_and_library_warnings_stay_off_stderr() -> None:
    import warnings

    from pipeline.chatter import is_chatter, library_warnings_quiet

    assert is_chatter("Corrupt JPEG data: 1 extraneous bytes before marker 0xc0")
    assert is_chatter("Premature end of JPEG file")
    assert not is_chatter("error: data/cats is not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_warnings_quiet():
            warnings.warn_explicit("a notice", UserWarning, "x.py", 1, module="sklearn.linear_model._logistic")
            warnings.warn_explicit("tight_layout not applied", UserWarning, "y.py", 1, module="matplotlib.figure")
            warnings.warn_explicit("ours", UserWarning, "z.py", 1, module="pipeline.heads.base")
    assert [str(w.message) for w in caught] == ["ours"]


def test_a_run_name_with_a_newline_stays_on_its_row_of_the_runs_table() -> None:
    from pipeline.report import runs_table

    table = runs_table([{"name": "evil\nname", "head": "logreg", "validation_accuracy": 0.5},
                        {"name": "plain", "head": "dense", "validation_accuracy": 0.4}])
    rows = table.splitlines()
    assert rows[1].startswith("evil\\nname") and rows[2].startswith("plain")
