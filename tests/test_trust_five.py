"""Trust, round five (issue 45): an output folder never loses what the command did not write, every
CSV is safe to open in a spreadsheet, the Python API answers wrong types in one line, readers
check what a cache declares before they allocate it, and a killed command leaves nothing behind."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from commandline import dead_pid
from conftest import (
    FAST_LOGREG,
    SHALLOW,
    clustered_features,
    make_image_folder,
    tiny_options,
    write_feature_cache,
)
from pipeline import api
from pipeline.cache import store
from pipeline.errors import PipelineError

HEAD_RUN_LAYERS = SHALLOW  # conftest.head_run: its tests export the run and never fine-tune it
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
NUMBER = "0123456789."


def _cells(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [cell for row in csv.reader(handle) for cell in row]


def _formula_cells(folder: Path) -> list[tuple[str, str]]:
    """Cells of every CSV under `folder` that a spreadsheet would run: a formula start, and not a
    plain number."""
    found = []
    for path in folder.rglob("*.csv"):
        for cell in _cells(path):
            if cell.startswith(FORMULA_STARTS):
                try:
                    float(cell)
                except ValueError:
                    found.append((path.name, cell))
    return found


def _synthetic(tmp_path: Path, class_names: list[str], pretrained: bool = True, n: int = 60) -> Path:
    """A cache of clustered features written without a backbone; marked pretrained so that the
    audit takes it."""
    features, labels, splits = clustered_features(n, len(class_names), shape=(8,))
    cache = write_feature_cache(tmp_path / "features" / "synthetic", features, labels, splits, class_names,
                                shard_size=32, pooling="avg")
    manifest = json.loads((cache / store.MANIFEST_NAME).read_text())
    manifest["weights"]["pretrained"] = pretrained
    (cache / store.MANIFEST_NAME).write_text(json.dumps(manifest))
    return cache


# --- D1, T4: an output folder never replaces what the command did not write -------------------------


def test_audit_refuses_an_out_that_holds_other_files_or_an_input(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    cache = _synthetic(tmp_path, ["a", "b"])
    data = tmp_path / "features" / "synthetic"  # stands in for the image folder too: it holds the shards
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    shards = sorted(p.name for p in data.iterdir())
    for out, says in ((mine, "already holds files"), (cache, "is the feature cache"),
                      (tmp_path / "features", "holds the feature cache"), (tmp_path, "holds the feature cache")):
        assert main(["audit", "--features", str(cache), "--out", str(out), "--no-progress"]) == 1
        assert says in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in data.iterdir()) == shards
    monkeypatch.chdir(mine)  # T4: `--out .` was "PosixPath('.') has an empty name"
    assert main(["audit", "--features", str(cache), "--out", ".", "--no-progress"]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_audit_replaces_an_earlier_audit_or_fills_an_empty_folder(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    empty = tmp_path / "empty"
    empty.mkdir()
    first = api.audit(cache, out=empty, folds=2, progress=False)
    assert (first.directory / "audit.json").is_file()
    again = api.audit(cache, out=empty, folds=2, progress=False)  # an earlier audit: replaced whole
    assert again.directory == empty.resolve() and (empty / "suspects.csv").is_file()


def test_a_killed_audits_staging_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    out = tmp_path / "audit"
    leftover = tmp_path / f".audit.tmp-{dead_pid()}-0a1b2c3d"
    leftover.mkdir()
    (leftover / ".staging.lock").write_text("")  # nobody holds it: its writer was killed
    (leftover / "suspects.csv").write_text("half")
    api.audit(cache, out=out, folds=2, progress=False)
    assert not leftover.exists()


def test_export_refuses_an_out_above_its_inputs_and_leaves_no_folder_without_the_onnx_extra(
        head_run: dict[str, Path], monkeypatch) -> None:
    import importlib.util

    with pytest.raises(PipelineError, match="holds the feature cache"):
        api.export(head_run["run"], "keras", head_run["cache"].parent, models=head_run["models"])
    with pytest.raises(PipelineError, match="is the image folder"):
        api.export(head_run["run"], "keras", head_run["data"], models=head_run["models"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    out = head_run["root"] / "onnx-out"
    with pytest.raises(PipelineError, match=r"tf2onnx: pip install 'bottleneck-pipeline\[onnx\]'"):
        api.export(head_run["run"], "onnx", out, models=head_run["models"])
    assert not out.exists()


def test_embeddings_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    theirs = tmp_path / "results.npz"
    np.savez(theirs, weights=np.ones(3))
    with pytest.raises(PipelineError, match="not an earlier embeddings file"):
        api.embeddings(cache, theirs, progress=False)
    assert np.load(theirs)["weights"].tolist() == [1, 1, 1]
    mine = tmp_path / "vectors.npz"
    api.embeddings(cache, mine, progress=False)
    api.embeddings(cache, mine, progress=False)  # its own earlier file: replaced


# --- D2, T7: two threads training one name -------------------------------------------------------


def test_two_threads_training_one_name_leave_one_whole_run(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"], pretrained=False)
    models = tmp_path / "models"
    for _ in range(3):
        outcomes: list[object] = [None, None]

        def train(slot: int, outcomes: list[object] = outcomes) -> None:
            try:
                outcomes[slot] = api.train_head(cache, models=models, name="same", progress=False, **FAST_LOGREG)
            except PipelineError as error:
                outcomes[slot] = error
            except Exception as error:  # noqa: BLE001 - what the test is about: a raw error is a failure
                outcomes[slot] = f"raw {type(error).__name__}: {error}"

        threads = [threading.Thread(target=train, args=(slot,)) for slot in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not any(isinstance(o, str) for o in outcomes), outcomes
        assert any(not isinstance(o, PipelineError) for o in outcomes), outcomes
        run = api.open_run(models / "same")  # one whole run is there
        assert (run.directory / "confusion_matrix.png").is_file() and run.metrics["test"]["images"]


# --- X1: CSV cells a spreadsheet would run ------------------------------------------------------


def test_no_csv_the_pipeline_writes_starts_a_cell_with_a_formula(tmp_path: Path) -> None:
    from pipeline.extraction.extract import extract_features

    names = ("=1+1", "+SUM(A1)", "-2+3", "@cmd")
    data = make_image_folder(tmp_path / "data", per_class=5, classes=names)
    (data / "=1+1" / "=HYPERLINK(x).png").write_bytes((data / "=1+1" / "img000.png").read_bytes()[:-1] + b"\x01")
    cache = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    run = api.train_head(cache, models=tmp_path / "models", name="run", progress=False, **FAST_LOGREG)
    api.predict(run, [str(data / "=1+1")], output=tmp_path / "models" / "run" / "predictions.csv")
    assert not _formula_cells(run.directory)
    # the pipeline reads its own CSVs back as written: splits.csv holds the names as they are
    assert api.evaluate(run).metrics["test"]["images"] == run.metrics["test"]["images"]

    audited = _synthetic(tmp_path / "audited", list(names))
    summary = api.audit(audited, out=tmp_path / "audit", folds=2, progress=False)
    assert not _formula_cells(summary.directory)
    with open(summary.directory / "duplicates.csv", newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle))[0] == "path_a"


def test_the_csv_rule_neutralises_formulas_and_keeps_numbers() -> None:
    from pipeline.tables import neutralised, unquoted

    for cell in ("=1+1", "+cmd", "-1+2", "@SUM(A1)", "\tx", "\rx", "=HYPERLINK(\"http://x\")"):
        assert neutralised(cell) == "'" + cell and unquoted(neutralised(cell)) == cell
    for cell in ("-0.25", "+3", "1e-5", "-inf", "cats", "", 5, -1.5):
        assert neutralised(cell) == cell
    assert unquoted("'quoted") == "'quoted"  # a name that starts with a quote of its own stays


# --- S1, S2: --exclude --------------------------------------------------------------------------


def _split_folders(root: Path) -> Path:
    """DIR/{train,validation,test}/<class>/: every split as its folder says."""
    make_image_folder(root / "train", per_class=8)
    make_image_folder(root / "validation", per_class=2, seed=1)
    make_image_folder(root / "test", per_class=2, seed=2)
    return root


def test_exclude_drops_the_named_path_not_its_byte_identical_copies(tmp_path: Path, capsys) -> None:
    from pipeline.extraction.extract import extract_features

    data = _split_folders(tmp_path / "data")
    shutil.copyfile(data / "train" / "cats" / "img000.png", data / "train" / "dogs" / "copy-of-cat.png")
    cache = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    trained = store.FeatureStore(cache).split_indexes()["train"]
    assert {"train/cats/img000.png", "train/dogs/copy-of-cat.png"} <= set(trained.paths)
    digest = trained.sha256[trained.paths.index("train/cats/img000.png")]
    suspects = tmp_path / "suspects.csv"
    suspects.write_text(f"path,split,given,suggested,score,id\ntrain/cats/img000.png,train,cats,dogs,0.01,{digest}\n")
    run = api.train_head(cache, models=tmp_path / "models", name="x", exclude=suspects, progress=True,
                         **FAST_LOGREG)
    excluded = run.config["excluded"]
    assert excluded["paths"] == ["train/cats/img000.png"] and excluded["from_training"] == 1
    assert excluded["by_content_id"] == [] and excluded["matched_nothing"] == 0
    assert "1 training images left out of 1 entries named" in capsys.readouterr().err


def test_exclude_says_what_matched_nothing_and_takes_absolute_paths(tmp_path: Path, capsys) -> None:
    from pipeline.extraction.extract import extract_features

    data = _split_folders(tmp_path / "data")
    cache = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    trained = store.FeatureStore(cache).split_indexes()["train"]
    listing = tmp_path / "exclude.txt"
    listing.write_text(f"{data.resolve() / trained.paths[0]}\n/elsewhere/x.png\n{'f' * 64}\n")
    run = api.train_head(cache, models=tmp_path / "models", name="x", exclude=listing, progress=True, **FAST_LOGREG)
    assert run.config["excluded"]["paths"] == [trained.paths[0]]
    assert run.config["excluded"]["matched_nothing"] == 2
    assert "2 entries matched no image of the cache" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = api.train_head(cache, models=tmp_path / "models", name="y", exclude=empty, progress=False, **FAST_LOGREG)
    assert run.config["excluded"]["named"] == 0 and run.config["excluded"]["from_training"] == 0


def test_exclude_names_a_folder_or_a_fifo_as_what_it_is(tmp_path: Path) -> None:
    from pipeline.training.train import read_exclusions

    with pytest.raises(PipelineError, match="is a folder"):
        read_exclusions(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(PipelineError, match="not a regular file"):
        read_exclusions(fifo)
    with pytest.raises(PipelineError, match="no such file"):
        read_exclusions(tmp_path / "absent.csv")


# --- H1, T2, identities: what a cache declares is checked before it is read ----------------------


def _first_shard(cache: Path) -> Path:
    return sorted(cache.glob("shard-*.h5"))[0]


def _rewrite(shard: Path, name: str, **create: object) -> None:
    with h5py.File(shard, "r+") as handle:
        del handle[name]
        handle.create_dataset(name, **create)


def test_a_shard_declaring_a_billion_labels_is_refused_before_allocating(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    shard = _first_shard(cache)
    _rewrite(shard, "labels", shape=(10**9,), dtype="int32", chunks=(1024,))  # nothing stored
    assert shard.stat().st_size < 1 << 20
    for call in (lambda: api.embeddings(cache, tmp_path / "e.npz", progress=False),
                 lambda: api.audit(cache, out=tmp_path / "audit", folds=2, progress=False)):
        with pytest.raises(PipelineError, match="declare"):
            call()


def test_a_width_bomb_agreeing_with_its_manifest_is_refused(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    manifest = json.loads((cache / store.MANIFEST_NAME).read_text())
    layer = manifest["fingerprint"]["layers"][0]
    manifest["feature_shapes"][layer] = [2**31]
    (cache / store.MANIFEST_NAME).write_text(json.dumps(manifest))
    for shard in cache.glob("shard-*.h5"):
        with h5py.File(shard, "r") as handle:
            rows = handle["labels"].shape[0]
        _rewrite(shard, f"features/{layer}", shape=(rows, 2**31), dtype="float32", chunks=(1, 1 << 16))
    for out in ("e.parquet", "e.npz"):
        with pytest.raises(PipelineError, match="not a backbone's output"):
            api.embeddings(cache, tmp_path / out, progress=False)


@pytest.mark.parametrize("column,value,says", [
    ("sha256", "../../etc/passwd", "not a sha256 hex digest"),
    ("paths", "../../etc/passwd", "not a path inside the data folder"),
    ("paths", "/etc/passwd", "not a path inside the data folder"),
    ("paths", "x\ny.png", "not a path inside the data folder"),
])
def test_ids_and_paths_of_a_shard_are_checked(tmp_path: Path, column: str, value: str, says: str) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    shard = _first_shard(cache)
    with h5py.File(shard, "r+") as handle:
        values = [v.decode() if isinstance(v, bytes) else v for v in handle[column][()]]
        values[0] = value
        del handle[column]
        handle.create_dataset(column, data=values, dtype=h5py.string_dtype("utf-8"))
    with pytest.raises(PipelineError, match=says):
        api.embeddings(cache, tmp_path / "e.npz", progress=False)


def test_a_torch_checkpoint_whose_key_is_an_exponential_structure_is_refused_at_once(tmp_path: Path) -> None:
    from pipeline.backbone.torch_checkpoint import LEGACY_MAGIC, read_state_dict

    body = bytearray(b")q\x00")  # (), memo 0
    for i in range(1, 90):  # t_i = (t_{i-1}, t_{i-1}): 90 bytes a level, 2^89 nodes to hash
        body += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    state = b"\x80\x02}(" + bytes(body) + b"K\x01u."  # {key: 1}
    path = tmp_path / "bomb.pth"
    path.write_bytes(pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2) + state)
    assert path.stat().st_size < 2048
    started = time.perf_counter()
    with pytest.raises(PipelineError, match="not a name"):
        read_state_dict(path)
    assert time.perf_counter() - started < 5


def test_a_head_whose_scale_is_zero_is_refused(head_run: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.artefacts import file_sha256

    run = tmp_path / "run"
    shutil.copytree(head_run["run"], run)
    with np.load(run / "head.npz") as arrays:
        parameters = dict(arrays)
    parameters["scale"] = np.zeros_like(parameters["scale"])
    np.savez(run / "head.npz", **parameters)
    sidecar = json.loads((run / "head.json").read_text())
    sidecar["files"]["head.npz"] = file_sha256(run / "head.npz")
    (run / "head.json").write_text(json.dumps(sidecar))
    with pytest.raises(PipelineError, match="scale of zero"):
        api.predict(run, [str(head_run["data"])])


# --- predict streams --------------------------------------------------------------------------------


def test_predict_answers_a_generator_as_it_goes(head_run: dict[str, Path]) -> None:
    files = sorted(head_run["data"].rglob("*.png"))
    pulled = []

    def paths():
        for i in range(10_000):
            pulled.append(i)
            yield files[i % len(files)]

    answers = api.predict(head_run["run"], paths())
    assert not isinstance(answers, list)
    first = [next(answers) for _ in range(3)]
    assert len(pulled) <= 300, "a stream is read a chunk at a time, not whole"
    assert [p.path for p in first] == [str(f) for f in files[:3]] and all(p.labels for p in first)
    together = api.predict(head_run["run"], [str(f) for f in files])  # a list: answered with a list
    assert isinstance(together, list) and len(together) == len(files)


# --- T1, T3, T5 -----------------------------------------------------------------------------------


def test_audit_refuses_huge_features_and_seeds_out_of_range_in_one_line(tmp_path: Path) -> None:
    cache = _synthetic(tmp_path, ["a", "b"])
    for seed in (-1, 2**32, math.nan, True):
        with pytest.raises(PipelineError, match="--seed"):
            api.audit(cache, seed=seed, out=tmp_path / "a", progress=False)
    layer = json.loads((cache / store.MANIFEST_NAME).read_text())["fingerprint"]["layers"][0]
    for shard in cache.glob("shard-*.h5"):
        with h5py.File(shard, "r+") as handle:
            handle["features"][layer][...] = 3e38
    with pytest.raises(PipelineError, match="not finite or beyond"):
        api.audit(cache, out=tmp_path / "a", folds=2, progress=False)


def test_a_graph_onnx_runtime_refuses_is_one_line_and_leaves_nothing(head_run: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch) -> None:
    pytest.importorskip("tf2onnx")
    import onnxruntime

    def refuse(*args, **kwargs):
        raise onnxruntime.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed")

    import onnx
    import tf2onnx
    from onnx import TensorProto, helper

    def stand_in(*args, **kwargs) -> None:  # a valid graph where the converter's was to go: not converting
        pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 32, 32, 3])
        same = helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 32, 32, 3])
        graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["out"])], "stand-in", [pixels], [same])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), kwargs["output_path"])

    monkeypatch.setattr(tf2onnx.convert, "from_graph_def", stand_in)
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    out = tmp_path / "onnx"
    with pytest.raises(PipelineError, match="ONNX Runtime refuses the exported graph"):
        api.export(head_run["run"], "onnx", out, models=head_run["models"], check_images=0)
    assert not out.exists() or not any(out.iterdir())


# --- T6: the Python API and wrong types ------------------------------------------------------------


def test_every_public_function_answers_wrong_types_in_one_line(head_run: dict[str, Path]) -> None:
    data, cache, run = head_run["data"], head_run["cache"], head_run["run"]
    calls = [
        lambda: api.extract(None), lambda: api.extract(5), lambda: api.extract([str(data)]),
        lambda: api.extract(data, image_size="32"), lambda: api.extract(data, image_size=32.5),
        lambda: api.extract(data, batch_size=math.nan), lambda: api.extract(data, val_fraction="0.2"),
        lambda: api.extract(data, max_megapixels="1"), lambda: api.extract(data, weights=5),
        lambda: api.extract(data, cache=None), lambda: api.train_head(5), lambda: api.train_head([]),
        lambda: api.train_head(cache, name=5), lambda: api.train_head(cache, exclude=5),
        lambda: api.train_head(cache, models=None), lambda: api.train_head(cache, seed=math.nan),
        lambda: api.predict(None, [str(data)]), lambda: api.predict(run, None), lambda: api.predict(run, 5),
        lambda: api.predict(run, [5]), lambda: api.predict(run, [None]), lambda: api.predict(run, [b"path"]),
        lambda: api.predict(run, [str(data)], top=math.nan), lambda: api.export(run, "keras", 5),
        lambda: api.embeddings(cache, None), lambda: api.embeddings(cache, 5),
        lambda: api.embeddings(cache, "x.npz", layer=5), lambda: api.audit(5), lambda: api.list_runs(5),
        lambda: api.open_run(None), lambda: api.open_run(5), lambda: api.train_head(cache, unknown=1),
        lambda: api.list_caches(None), lambda: api.evaluate(None), lambda: api.finetune(5),
    ]
    for call in calls:
        with pytest.raises(PipelineError) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_a_single_layer_name_is_a_list_of_one_not_its_characters(head_run: dict[str, Path], tmp_path: Path) -> None:
    layer = store.FeatureStore(head_run["cache"]).layers[0]
    written = api.embeddings(head_run["cache"], tmp_path / "e.npz", layer=layer, progress=False)
    assert written.metadata["view"]["layers"] == [layer]


# --- small findings ---------------------------------------------------------------------------------


def test_libjpegs_improper_call_line_is_chatter() -> None:
    from pipeline.chatter import is_chatter

    assert is_chatter("Improper call to JPEG library in state 201")
    assert not is_chatter("error: 1 of 2 files could not be read as images")


def test_int8_quantisation_prints_no_pre_processing_advice(tmp_path: Path, capfd, caplog) -> None:
    """The export's static int8 (calibrated on training images) says nothing of ONNX Runtime's
    pre-processing advice; a convolution over NHWC pixels, as the exported graphs take them."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from conftest import write_image
    from pipeline.serving.formats.onnx import quantize_int8

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, (4, 3, 3, 3), rng.normal(size=108).tolist())
    nodes = [helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ("batch", 8, 8, 3))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("batch", 4, 8, 8))], [weight])
    source = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    files = [str(write_image(tmp_path / "train" / f"{i}.png", seed=i, size=12)) for i in range(32)]
    found = quantize_int8(source, tmp_path / "model-int8.onnx", files, 8)
    captured = capfd.readouterr()
    assert "pre-processing" not in captured.out + captured.err + caplog.text
    assert (tmp_path / "model-int8.onnx").is_file() and found["calibration_images"] == 32


def test_a_dead_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    from pipeline.atomic import remove_dead_temporaries

    dead = tmp_path / f".model-int8.onnx.{dead_pid()}.tmp.onnx"
    live = tmp_path / f".model.onnx.{os.getpid()}.tmp.onnx"
    mine = tmp_path / "model.onnx"
    for path in (dead, live, mine):
        path.write_text("x")
    assert remove_dead_temporaries(tmp_path) == [dead]
    assert live.exists() and mine.exists()


WORKERS = r'''
import os, sys, time
from joblib import delayed
from pipeline.parallel import parallel
def work(i):
    time.sleep(0.2)
    return os.getpid()
print(" ".join(map(str, sorted(set(parallel(2)(delayed(work)(i) for i in range(4)))))), flush=True)
time.sleep(120)
'''


def test_joblib_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", WORKERS], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert workers and all(_alive(pid) for pid in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def test_hints_name_the_console_command_and_the_extra_for_a_pip_user(monkeypatch) -> None:
    from pipeline import errors

    monkeypatch.setattr(sys, "argv", ["/usr/bin/bottleneck-pipeline", "runs"])
    assert errors.command() == "bottleneck-pipeline"
    assert errors.install_hint("onnx") == "pip install 'bottleneck-pipeline[onnx]'"
    with pytest.raises(PipelineError) as caught:
        api.open_run("absent-run", models="/nonexistent-models")
    assert "run_pipeline.py" not in str(caught.value)
    monkeypatch.setattr(sys, "argv", [str(Path(errors.__file__).parent.parent / "run_pipeline.py")])
    assert errors.command() == "run_pipeline.py" and "make setup" in errors.install_hint("onnx")


def test_the_audit_summary_ends_no_clause_empty(monkeypatch, capsys) -> None:
    from pipeline import cli
    from pipeline.auditing.audit import AuditSummary

    details = {"backbones": ["vgg16"], "label_issues": {"folds": 5, "by_split": {}},
               "duplicates": {"exact_under_two_classes": 0, "similarity_threshold": 0.98, "neighbour_search": "exact"},
               "per_class": {}}
    monkeypatch.setattr(cli.api, "audit", lambda *a, **k: AuditSummary(Path("a"), 10, 0, 0, 0, {}, 1.0, details))
    assert cli.main(["audit", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "label suspects: 0 (cleanlab on 5-fold out-of-fold probabilities)" in out and "; )" not in out
