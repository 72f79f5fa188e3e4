"""Deployable models: every run exported as keras, savedmodel and tflite, each loaded in a Python
that never imports this package; heads that train on any feature scale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from commandline import WITHOUT_THE_PROJECT
from conftest import SHALLOW, THREE_CLASSES, clustered_features, make_image_folder, tiny_options, write_feature_cache
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.finetuning.finetune import Augmentation, FinetuneOptions, run_finetuning
from pipeline.serving.export import export_run
from pipeline.serving.predict import predict_files
from pipeline.training.train import TrainOptions, run_training

CLASSES = ["cats", "dogs", "owls"]
HEAD_RUN_LAYERS = SHALLOW  # conftest.head_run: its tests export the run and never fine-tune it

# Runs with `python -I` (no current folder, no PYTHONPATH) from a folder outside the project, with
# `import pipeline` made to fail (the dev venv has the project installed editable): it cannot import
# the project, and checks that it did not.
LOADER = WITHOUT_THE_PROJECT + r'''
import json, sys
import numpy as np
import tensorflow as tf
answers = []
for kind, path, files in json.load(open(sys.argv[1])):  # every job in one Python: TensorFlow imported once
    encoded = [open(f, "rb").read() for f in files]
    if kind == "keras":
        import keras
        model = keras.models.load_model(path)
        out = [model.predict(tf.io.decode_png(e, channels=3)[None], verbose=0)[0] for e in encoded]
    elif kind == "savedmodel":
        loaded = tf.saved_model.load(path)
        result = loaded.signatures["serving_default"](images=tf.constant(encoded))
        out = result["probabilities"].numpy()
        names = [n.decode() for n in result["class"].numpy()]
        pixels = np.stack([loaded.signatures["pixels"](pixels=tf.io.decode_png(e, channels=3)[None])["probabilities"]
                           .numpy()[0] for e in encoded])  # one at a time: the images differ in size
        assert np.abs(pixels - out).max() < 1e-5
        assert names == [n.decode() for n in result["class_names"].numpy()[0][out.argmax(axis=1)]]
    else:
        interpreter = tf.lite.Interpreter(model_path=path)
        interpreter.allocate_tensors()
        given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        size = int(given["shape"][1])
        out = []
        for e in encoded:
            image = tf.io.decode_png(e, channels=3)
            method = "area" if min(image.shape[:2]) >= size else "bilinear"  # extract's rule (the README's recipe)
            image = tf.image.resize(image, (size, size), method=method)
            interpreter.set_tensor(given["index"], image.numpy()[None])
            interpreter.invoke()
            out.append(interpreter.get_tensor(taken["index"])[0])
    answers.append(np.asarray(out, np.float64).tolist())
assert not any(name == "pipeline" or name.startswith("pipeline.") for name in sys.modules)
print(json.dumps(answers))
'''


def _load_elsewhere(folder: Path, jobs: list[tuple[str, Path, list[str]]]) -> list[np.ndarray]:
    """Each job's (format, model path, image files) probabilities, computed by one Python that
    cannot import the project (one TensorFlow import for every job)."""
    folder.mkdir(parents=True, exist_ok=True)
    script, listed = folder / "loader.py", folder / "jobs.json"
    script.write_text(LOADER)
    listed.write_text(json.dumps([[kind, str(path), list(files)] for kind, path, files in jobs]))
    outside = folder / "outside"
    outside.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-I", str(script), str(listed)], cwd=outside,
                            capture_output=True, text=True, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [np.array(answer) for answer in json.loads(result.stdout.splitlines()[-1])]


def _predicted(run: Path, files: list[str], class_names: list[str], tta: str = "none") -> np.ndarray:
    rows = predict_files(run, [Path(f) for f in files], top_k=len(class_names), tta=tta)
    proba = np.zeros((len(rows), len(class_names)))
    for i, row in enumerate(rows):
        for label, p in zip(row.labels, row.probabilities):
            proba[i, class_names.index(label)] = p
    return proba


@pytest.fixture(scope="module")
def exported_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "data", per_class=8, classes=tuple(CLASSES))
    cache = extract_features(tiny_options(data, root / "features", layers=SHALLOW)).cache_dir
    models = root / "models"
    found = {"root": root, "data": data, "models": models}
    for kind, params in (("logreg", {"c_grid": "0.01,0.1,1", "n_jobs": 1}), ("dense", {"epochs": 3})):
        found[kind] = run_training(TrainOptions(head=kind, features=cache, models=models, head_params=params,
                                                progress=False)).directory
    found["finetune"] = run_finetuning(FinetuneOptions(source=str(found["dense"]), models=models, epochs=1,
                                                       batch_size=4, unfreeze="block3",
                                                       augmentation=Augmentation.off(), progress=False)).directory
    return found


# Every format with a head run and with the fine-tuned run, and every run kind
EVERY_FORMAT = [("keras", "logreg"), ("keras", "finetune"), ("savedmodel", "dense"), ("savedmodel", "finetune"),
                ("tflite", "logreg"), ("tflite", "dense")]
# ... and the formats each run kind is fed the large, thin and edge-sized images in
LARGE = {"logreg": ("keras", "savedmodel", "tflite"), "fused": ("keras",), "finetune": ("keras",)}


@pytest.fixture(scope="module")
def loaded_elsewhere(exported_runs: dict[str, Path], fused_run: Path, large_files: list[str]) -> dict[str, Any]:
    """The exports the tests below load where the project cannot be imported, each written once
    (default options unless a test says otherwise) into its own folder, and every load done by one
    Python (its TensorFlow import, seconds of CPU, paid once instead of once a test): `exports`
    (format, run, options) -> (ExportSummary, folder); `jobs` and `answers` name -> (format, model,
    files) and the probabilities that Python computed."""
    root = exported_runs["root"] / "elsewhere"
    runs = {"logreg": exported_runs["logreg"], "dense": exported_runs["dense"],
            "finetune": exported_runs["finetune"], "fused": fused_run}
    small = _small_images(root)
    images = sorted(str(p) for p in exported_runs["data"].rglob("*.png"))
    exports: dict[tuple, tuple[Any, Path]] = {}

    def exported(fmt: str, run: str, **options: Any) -> Path:
        key = (fmt, run, tuple(sorted(options.items())))
        if key not in exports:
            out = root / "-".join([fmt, run, *(f"{name}={value}" for name, value in key[2])])
            exports[key] = (export_run(runs[run], fmt, out, **options), out)
        return exports[key][0].path

    jobs = {("every", fmt, run): (fmt, exported(fmt, run), images[::3] + small) for fmt, run in EVERY_FORMAT}
    jobs["tta"] = ("keras", exported("keras", "finetune", tta="dihedral", check_images=8), images[::4] + small)
    jobs["finetune's own"] = ("keras", runs["finetune"] / "model.keras", images[:4] + small)
    jobs.update({("large", fmt, run): (fmt, exported(fmt, run), large_files)
                 for run, formats in LARGE.items() for fmt in formats})
    answers = _load_elsewhere(root / "loader", list(jobs.values()))
    return {"runs": runs, "exports": exports, "jobs": jobs, "answers": dict(zip(jobs, answers))}


@pytest.mark.parametrize("fmt, run", EVERY_FORMAT)
def test_every_format_reproduces_predict_without_the_pipeline(loaded_elsewhere: dict[str, Any], run: str,
                                                               fmt: str) -> None:
    summary, out = loaded_elsewhere["exports"][(fmt, run, ())]
    assert (out / "labels.txt").read_text().split() == CLASSES
    details = json.loads((out / "export.json").read_text())
    assert details["classes"] == CLASSES and details["image_size"] == 32
    assert details["formats"][summary.path.name]["precision"] == "float32"
    measured = details["formats"][summary.path.name]["agreement_with_predict"]  # a float32 run: float32 rounding
    assert measured["measured"] and measured["largest_probability_difference"] < (1e-3 if fmt == "tflite" else 1e-5)
    _, _, files = loaded_elsewhere["jobs"][("every", fmt, run)]
    expected = _predicted(loaded_elsewhere["runs"][run], files, CLASSES)
    got = loaded_elsewhere["answers"][("every", fmt, run)]
    if fmt == "tflite":
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    else:
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_keras_export_with_test_time_views_is_predict_tta_in_plain_keras(loaded_elsewhere: dict[str, Any]) -> None:
    """The eight dihedral views averaged inside the .keras file (Keras' own layers): loaded by a
    Python without the pipeline, it gives what predict --tta dihedral gives, on images of any size."""
    directory = loaded_elsewhere["runs"]["finetune"]
    _, out = loaded_elsewhere["exports"][("keras", "finetune", (("check_images", 8), ("tta", "dihedral")))]
    recorded = json.loads((out / "export.json").read_text())["formats"]["model.keras"]
    assert recorded["test_time_views"]["views"] == "dihedral" and recorded["test_time_views"]["count"] == 8
    measured = recorded["agreement_with_predict"]
    assert measured["against"].endswith("--tta dihedral") and measured["largest_probability_difference"] < 1e-5
    _, _, files = loaded_elsewhere["jobs"]["tta"]
    expected = _predicted(directory, files, CLASSES, tta="dihedral")
    np.testing.assert_allclose(loaded_elsewhere["answers"]["tta"], expected, atol=1e-5)
    # the views matter: this model is not invariant, so one pass differs
    assert np.abs(_predicted(directory, files, CLASSES) - expected).max() > 1e-4


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "savedmodel"])
def test_every_format_carries_the_views(exported_runs: dict[str, Path], fmt: str, tmp_path: Path) -> None:
    export_run(exported_runs["dense"], fmt, tmp_path / "out", tta="flip", check_images=8)
    details = json.loads((tmp_path / "out" / "export.json").read_text())
    (recorded,) = details["formats"].values()
    assert recorded["test_time_views"]["count"] == 2
    measured = recorded["agreement_with_predict"]
    assert measured["against"].endswith("--tta flip")
    assert measured["largest_probability_difference"] < (1e-3 if fmt == "tflite" else 1e-5)


def test_views_with_quantisation_or_unknown_views_are_refused_in_one_line(exported_runs: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="--tta with --quantize"):
        export_run(exported_runs["dense"], "tflite", tmp_path / "out", quantize=True, tta="flip")
    with pytest.raises(PipelineError, match="--tta 'spin': choose from none, flip, dihedral"):
        export_run(exported_runs["dense"], "keras", tmp_path / "out", tta="spin")
    assert not (tmp_path / "out").exists()


def _small_images(folder: Path) -> list[str]:
    """Images smaller than the model's 32 px on one side or both: extract grows them with bilinear."""
    rng = np.random.default_rng(5)
    files = []
    for height, width in ((20, 20), (12, 12), (20, 50), (50, 31)):
        path = folder / "small" / f"{height}x{width}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tf.io.encode_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).numpy())
        files.append(str(path))
    return files


def test_finetunes_own_model_loads_with_keras_alone(loaded_elsewhere: dict[str, Any]) -> None:
    _, model, files = loaded_elsewhere["jobs"]["finetune's own"]
    assert model == loaded_elsewhere["runs"]["finetune"] / "model.keras"
    np.testing.assert_allclose(loaded_elsewhere["answers"]["finetune's own"],
                               _predicted(loaded_elsewhere["runs"]["finetune"], files, CLASSES), atol=1e-4)


def test_export_command_defaults_to_the_run_folder_and_quantizes(exported_runs: dict[str, Path], capsys) -> None:
    run = exported_runs["logreg"]
    assert main(["export", "--model", str(run), "--format", "tflite", "--quantize"]) == 0
    out = capsys.readouterr().out
    assert "model-quantized.tflite" in out and "checked with the TFLite interpreter" in out
    details = json.loads((run / "export" / "export.json").read_text())
    quantized = details["formats"]["model-quantized.tflite"]
    assert "quantised" in quantized["precision"] and quantized["largest_difference_to_keras_float32"] < 0.05
    assert main(["export", "--model", str(run), "--format", "keras", "--quantize"]) == 1
    assert "--quantize applies to --format tflite and onnx only" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head run on features extracted in bf16 (as extract chooses by itself on CPUs with bf16)."""
    root = tmp_path_factory.mktemp("bf16")
    data = make_image_folder(root / "data", per_class=8)
    cache = extract_features(tiny_options(data, root / "features", precision="bf16", layers=SHALLOW)).cache_dir
    return run_training(TrainOptions(head="logreg", features=cache, models=root / "models", progress=False,
                                     head_params={"c_grid": "0.1,1", "n_jobs": 1})).directory


def test_a_bf16_run_is_exported_in_float32_and_says_how_far_it_is_from_predict(bf16_run: Path, capsys) -> None:
    assert main(["export", "--model", str(bf16_run), "--format", "keras"]) == 0
    out = capsys.readouterr().out
    assert "against predict (bf16) on" in out and "largest probability difference" in out
    details = json.loads((bf16_run / "export" / "export.json").read_text())
    fmt = details["formats"]["model.keras"]
    assert fmt["precision"] == "float32" and fmt["run_precision"] == "bf16" and "bf16" in fmt["note"]
    import keras

    model = keras.models.load_model(bf16_run / "export" / "model.keras")
    assert _policies(model) == {"float32"}
    # measured against predict on the run's validation images, as the file was written
    measured = fmt["agreement_with_predict"]
    validation = [row for row in (bf16_run / "splits.csv").read_text().splitlines()[1:] if ",validation," in row]
    assert measured["measured"] and measured["images"] == len(validation) > 0
    files = [str(bf16_run.parent.parent / "data" / row.split(",")[0]) for row in validation]
    expected = _predicted(bf16_run, files, ["cats", "dogs"])
    got = np.asarray(model.predict(np.stack([_pixels(f) for f in files]), verbose=0), np.float64)
    assert measured["largest_probability_difference"] == pytest.approx(np.abs(got - expected).max(), abs=1e-6)
    assert measured["top_class_differs"] == int(np.sum(got.argmax(1) != expected.argmax(1)))
    assert measured["accuracy_recorded"] == json.loads((bf16_run / "metrics.json").read_text())["validation"][
        "accuracy"]


def _pixels(file: str) -> np.ndarray:
    return tf.io.decode_png(Path(file).read_bytes(), channels=3).numpy().astype(np.float32)


@pytest.mark.parametrize("fmt", ["keras", "savedmodel"])
def test_precision_run_exports_what_predict_computes(bf16_run: Path, fmt: str, tmp_path: Path) -> None:
    summary = export_run(bf16_run, fmt, tmp_path / "out", precision="run")
    details = summary.details["format"]
    assert details["precision"].startswith("bf16") and "as the run did" in details["note"]
    measured = details["agreement_with_predict"]
    assert measured["measured"] and measured["top_class_differs"] == 0
    assert measured["largest_probability_difference"] < 1e-6
    assert measured["accuracy_export"] == measured["accuracy_predict"]
    if fmt == "keras":
        import keras

        assert "bfloat16" in _policies(keras.models.load_model(summary.path))


def _policies(model) -> set[str]:
    """The dtype policies of every layer, nested models' layers included."""
    found = set()
    for layer in model.layers:
        found.add(layer.dtype_policy.name)
        if hasattr(layer, "layers"):
            found |= _policies(layer)
    return found


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_precision_run_is_refused_where_the_format_has_no_bf16(bf16_run: Path, fmt: str, capsys) -> None:
    assert main(["export", "--model", str(bf16_run), "--format", fmt, "--precision", "run", "--out",
                 str(bf16_run.parent / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precision run" in err and "bfloat16" in err
    assert not (bf16_run.parent / "nowhere").exists()


def test_an_export_whose_images_are_gone_is_written_and_says_it_was_not_measured(head_run: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "models" / "run"
    shutil.copytree(head_run["run"], copy)
    data = head_run["data"]
    moved = tmp_path / "moved-data"
    shutil.move(data, moved)
    try:
        summary = export_run(copy, "keras", tmp_path / "out")
    finally:
        shutil.move(moved, data)
    measured = summary.details["format"]["agreement_with_predict"]
    assert summary.path.is_file() and not measured["measured"] and "no longer under" in measured["why"]
    assert export_run(copy, "keras", tmp_path / "out2", check_images=0).details["format"][
        "agreement_with_predict"] == {"measured": False, "why": "--check-images 0"}


@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("head", ["dense", "logreg"])
def test_heads_train_on_any_feature_scale(tmp_path: Path, scale: float, head: str) -> None:
    features, labels, splits = clustered_features(300, 3, seed=11, separation=1.5)
    cache = write_feature_cache(tmp_path / "cache", features * scale, labels, splits, CLASSES)
    params = {"epochs": 30} if head == "dense" else {"c_grid": "1e-3:1e2:6", "n_jobs": 1}
    summary = run_training(TrainOptions(head=head, features=cache, models=tmp_path / "models", head_params=params,
                                        progress=False))
    assert summary.metrics["train"]["accuracy"] > 0.95
    assert summary.metrics["test"]["accuracy"] > 0.9


def test_the_keras_model_resizes_small_images_as_extract_does_and_says_so(exported_runs: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """extract grows images smaller than N with bilinear and shrinks larger ones by area; the
    .keras model does the same inside (exactly), as its export.json says."""
    import keras

    run = exported_runs["dense"]
    keras_export = export_run(run, "keras", tmp_path / "keras")
    rule = json.loads((tmp_path / "keras" / "export.json").read_text())["formats"]["model.keras"]["input"]
    assert "area interpolation when both sides shrink, bilinear otherwise" in rule
    files = _small_images(tmp_path)
    expected = _predicted(run, [Path(f) for f in files], CLASSES)
    model = keras.models.load_model(keras_export.path)
    for file, wanted in zip(files, expected):
        pixels = tf.io.decode_png(tf.io.read_file(file), channels=3).numpy()[None]
        np.testing.assert_allclose(np.asarray(model.predict(pixels, verbose=0))[0], wanted, atol=1e-5)


def test_export_into_another_runs_export_folder_lists_only_its_own_formats(head_run: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    from pipeline.serving.export import export_run

    out = tmp_path / "shipped"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"run": "/elsewhere/other-run", "classes": ["x", "y"],
                                                 "formats": {"model.tflite": {"file": "model.tflite"}}}))
    export_run(head_run["run"], "keras", out)
    details = json.loads((out / "export.json").read_text())
    assert list(details["formats"]) == ["model.keras"] and details["classes"] == THREE_CLASSES
    export_run(head_run["run"], "keras", out)  # the same run again: its own formats stay listed
    assert list(json.loads((out / "export.json").read_text())["formats"]) == ["model.keras"]


def test_export_into_the_runs_own_folder_is_refused(head_run: dict[str, Path]) -> None:
    from pipeline.serving.export import export_run

    before = sorted(p.name for p in head_run["run"].iterdir())
    with pytest.raises(PipelineError, match="is the run's own folder"):
        export_run(head_run["run"], "keras", head_run["run"])
    assert sorted(p.name for p in head_run["run"].iterdir()) == before


def test_export_refuses_a_model_whose_outputs_disagree_with_its_labels(head_run: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch) -> None:
    from pipeline.runs import Run
    from pipeline.serving import export

    opened = Run.open(head_run["run"])
    monkeypatch.setattr(Run, "open", classmethod(lambda cls, *a, **k: opened))
    opened.class_names = THREE_CLASSES + ["extra"]  # labels.txt replaced while export read the run
    with pytest.raises(PipelineError, match="labels.txt lists 4 classes, the model has 3 outputs"):
        export.export_run(head_run["run"], "keras", tmp_path / "out")


# --- every size the pixel limit admits resizes as extract does (the .keras model's switch) ----------

RESIZE_SHAPES = [(6000, 8000), (8000, 6000), (3, 20000), (20000, 3)]  # 48 megapixels both ways, very thin


def _sides_around(n: int) -> list[tuple[int, int]]:
    """Each side exactly N, N - 1 and N + 1."""
    return [(h, w) for h in (n - 1, n, n + 1) for w in (n - 1, n, n + 1)]


@pytest.mark.parametrize("n", [32, 150, 224, 2048])
def test_the_keras_resize_switch_is_exact_at_every_size(n: int) -> None:
    """The resize inside .keras models (Keras layers only) against extract's own rule, on inputs
    of 48 megapixels in both orientations at 150 and 224 (the switch of an average of ones, before,
    sent 6000 x 8000 to bilinear at 224 and blended at 150), very thin ones at every size, and
    sides of N, N - 1 and N + 1."""
    import keras

    from pipeline.images.decode_tf import resize_like_extract
    from pipeline.images.keras_resize import resize_like_extract_layers

    pixels = keras.Input((None, None, 3))
    model = keras.Model(pixels, resize_like_extract_layers(pixels, n))
    large = RESIZE_SHAPES if n in (150, 224) else RESIZE_SHAPES[2:]
    extra = {224: [(7000, 10000)], 2048: [(2048, 8500), (2056, 9000)]}.get(n, [])
    for height, width in large + _sides_around(n) + extra:
        image = np.random.default_rng(height * 7 + width).integers(0, 256, (height, width, 3), np.uint8).astype(
            np.float32)
        ours = np.asarray(model.predict_on_batch(image[None]))[0]
        np.testing.assert_allclose(ours, resize_like_extract(tf.constant(image), n).numpy(), atol=1e-5,
                                   err_msg=f"{height} x {width} at {n}")


def _smooth_png(path: Path, height: int, width: int, seed: int) -> str:
    """A large image that compresses (a gradient with a little noise): megapixels without a
    hundred megabytes of PNG. Summed in uint8 (at most 200 + 50 + 3): a float image of 48
    megapixels took 4 s to build."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 200, height).astype(np.uint8)[:, None, None]
    columns = np.linspace(0, 50, width).astype(np.uint8)[None, :, None] + rng.integers(0, 4, (1, width, 3),
                                                                                       dtype=np.uint8)
    pixels = rows + columns
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
    return str(path)


@pytest.fixture(scope="module")
def large_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The large, thin and edge-sized images, written once for the module (two 48-megapixel
    PNGs cost seconds each)."""
    folder = tmp_path_factory.mktemp("large-images")
    return [_smooth_png(folder / f"{h}x{w}.png", h, w, seed=h + w)
            for h, w in RESIZE_SHAPES + [(31, 33), (32, 32), (33, 31), (33, 33)]]


@pytest.fixture(scope="module")
def fused_run(exported_runs: dict[str, Path]) -> Path:
    """The export fixture's images through EfficientNet-Lite0 too, fused with its VGG16 cache."""
    root = exported_runs["root"]
    lite = extract_features(tiny_options(exported_runs["data"], root / "features", backbone="efficientnet_lite0",
                                         pooling="avg")).cache_dir
    vgg = extract_features(tiny_options(exported_runs["data"], root / "features", pooling="avg",
                                        layers=SHALLOW)).cache_dir
    return run_training(TrainOptions(head="logreg", features=[lite, vgg], models=exported_runs["models"],
                                     head_params={"c_grid": "0.1,1", "n_jobs": 1}, progress=False)).directory


@pytest.mark.parametrize("run", list(LARGE))
def test_large_thin_and_edge_sized_images_agree_in_every_format(loaded_elsewhere: dict[str, Any],
                                                                 large_files: list[str], run: str) -> None:
    """predict, the .keras export, the SavedModel and TFLite with the README's recipe, each loaded
    where the project cannot be imported, give the same probabilities for 48-megapixel images in
    both orientations, 3 x 20000 and 20000 x 3, and sides of N - 1, N and N + 1."""
    expected = _predicted(loaded_elsewhere["runs"][run], large_files, CLASSES)
    for fmt in LARGE[run]:
        assert loaded_elsewhere["jobs"][("large", fmt, run)][2] == large_files
        np.testing.assert_allclose(loaded_elsewhere["answers"][("large", fmt, run)], expected,
                                   atol=1e-3 if fmt == "tflite" else 1e-5, err_msg=fmt)


# --- ONNX: every run kind, loaded with ONNX Runtime alone, fed by the documented resize -----------

ONNX_LOADER = WITHOUT_THE_PROJECT + r'''
import json, sys
import numpy as np, onnxruntime
from PIL import Image
recipe, path, files = sys.argv[1], sys.argv[2], sys.argv[3:]
exec(open(recipe).read())  # docs/commands.md's resize_like_extract, as written there
session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
given = session.get_inputs()[0]
n = given.shape[1]
out = [session.run(None, {given.name: resize_like_extract(np.asarray(Image.open(f).convert("RGB")), n)[None]})[0][0]
       for f in files]
assert not any(name == "pipeline" or name.startswith("pipeline.") for name in sys.modules)
print(json.dumps(np.asarray(out, np.float64).tolist()))
'''


def _documented_resize() -> str:
    from conftest import ROOT

    manual = (ROOT / "docs" / "commands.md").read_text()
    return next(block.split("```", 1)[0] for block in manual.split("```python\n")[1:]
                if "def resize_like_extract" in block)


def _onnx_elsewhere(tmp_path: Path, path: Path, files: list[str]) -> np.ndarray:
    (tmp_path / "recipe.py").write_text(_documented_resize())
    (tmp_path / "onnx_loader.py").write_text(ONNX_LOADER)
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "onnx_loader.py"), str(tmp_path / "recipe.py"),
                             str(path), *files], cwd=outside, capture_output=True, text=True,
                            env={"PATH": "/usr/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.array(json.loads(result.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def onnx_exports(exported_runs: dict[str, Path], fused_run: Path) -> dict[str, tuple[Any, Path]]:
    """Every run kind exported to ONNX once for the module: run -> (ExportSummary, its folder)."""
    runs = {"logreg": exported_runs["logreg"], "dense": exported_runs["dense"], "fused": fused_run,
            "finetune": exported_runs["finetune"]}
    root = exported_runs["root"] / "onnx"
    return {run: (export_run(directory, "onnx", root / run), root / run) for run, directory in runs.items()}


def _converter_writing(content: bytes):  # noqa: ANN202 - tf2onnx.convert.from_graph_def's stand-in
    """A stand-in for tf2onnx's conversion that writes `content` where the graph was to go: the
    checks after the converter see a graph of their choosing without a conversion's seconds."""
    def convert(*args: Any, **kwargs: Any) -> None:
        Path(kwargs["output_path"]).write_bytes(content)
    return convert


@pytest.mark.parametrize("run", ["logreg", "dense", "fused", "finetune"])
def test_onnx_exports_reproduce_predict_with_onnx_runtime_alone(exported_runs: dict[str, Path], fused_run: Path,
                                                               onnx_exports: dict[str, tuple[Any, Path]], run: str,
                                                               tmp_path: Path) -> None:
    directory = fused_run if run == "fused" else exported_runs[run]
    summary, out = onnx_exports[run]
    details = json.loads((out / "export.json").read_text())
    recorded = details["formats"]["model.onnx"]
    assert recorded["onnx"]["opset"]["ai.onnx"] >= 13 and recorded["largest_difference_to_predict"] <= 1e-4
    assert "already squashed to N x N" in recorded["input"] and len(details["parts"]) == (2 if run == "fused" else 1)
    files = (sorted(str(p) for p in exported_runs["data"].rglob("*.png"))[::5] + _small_images(tmp_path)
             + [_smooth_png(tmp_path / "large.png", 300, 200, seed=3)])
    got = _onnx_elsewhere(tmp_path, summary.path, files)
    np.testing.assert_allclose(got, _predicted(directory, files, CLASSES), atol=1e-4)


def test_an_onnx_export_that_disagrees_with_the_run_is_refused_and_removed(exported_runs: dict[str, Path],
                                                                          onnx_exports: dict[str, tuple[Any, Path]],
                                                                          tmp_path: Path, monkeypatch) -> None:
    """The check at export time: the graph of another run's model (a mismatched export: the
    converter writes the dense run's graph for the logistic-regression run) is caught."""
    import tf2onnx

    other = onnx_exports["dense"][0].path.read_bytes()
    monkeypatch.setattr(tf2onnx.convert, "from_graph_def", _converter_writing(other))
    with pytest.raises(PipelineError, match="disagrees with the run's model"):
        export_run(exported_runs["logreg"], "onnx", tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_int8_onnx_is_measured_on_validation_and_refused_past_its_threshold(exported_runs: dict[str, Path],
                                                                          tmp_path: Path, monkeypatch) -> None:
    from pipeline.serving.formats import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "INT8_MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(onnx_export, "INT8_MAX_ACCURACY_DROP", 1.0)
    monkeypatch.setattr(onnx_export, "INT8_MIN_SPEEDUP", 0.0)  # 32 px random weights: speed is not the point here
    monkeypatch.setattr("pipeline.backbone.int8.MIN_CALIBRATION", 4)  # the fixture's run has a few training images
    summary = export_run(exported_runs["logreg"], "onnx", tmp_path / "int8", quantize=True)
    assert summary.path.name == "model-int8.onnx" and (tmp_path / "int8" / "model.onnx").is_file()
    import tf2onnx  # the exports below refuse int8 after its measurement: their float graph is this one, not
    # converted again (the conversion is not what they are about)

    monkeypatch.setattr(tf2onnx.convert, "from_graph_def",
                        _converter_writing((tmp_path / "int8" / "model.onnx").read_bytes()))
    measured = json.loads((tmp_path / "int8" / "export.json").read_text())["formats"]["model-int8.onnx"]["int8"]
    assert measured["images"] > 0 and 0 <= measured["top_class_agreement"] <= 1
    assert {"accuracy_float32", "accuracy_int8", "largest_probability_difference"} <= set(measured)
    assert measured["images_per_second"]["float32"] > 0 and measured["images_per_second"]["int8"] > 0
    assert measured["calibration"]["calibration_images"] > 0 and "static" in measured["calibration"]["method"]
    import onnx

    graph = onnx.load(str(tmp_path / "int8" / "model-int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node)  # static: activations quantised too
    assert not any(node.op_type == "ConvInteger" for node in graph.graph.node)  # not the dynamic path
    monkeypatch.setattr(onnx_export, "INT8_MIN_AGREEMENT", 1.01)  # nothing can pass
    with pytest.raises(PipelineError, match="int8 loses too much"):
        export_run(exported_runs["logreg"], "onnx", tmp_path / "strict", quantize=True)
    assert not (tmp_path / "strict" / "model-int8.onnx").exists()
    monkeypatch.setattr(onnx_export, "INT8_MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(onnx_export, "INT8_MIN_SPEEDUP", 1000.0)  # int8 not faster: refused with both figures
    with pytest.raises(PipelineError, match=r"int8 is not faster than float32 on this machine \([\d.]+ against [\d.]+"):
        export_run(exported_runs["logreg"], "onnx", tmp_path / "slow", quantize=True)
    assert not (tmp_path / "slow" / "model-int8.onnx").exists()


def test_a_damaged_onnx_graph_is_refused_in_one_line(exported_runs: dict[str, Path],
                                                     onnx_exports: dict[str, tuple[Any, Path]], tmp_path: Path,
                                                     monkeypatch) -> None:
    import tf2onnx

    whole = onnx_exports["logreg"][0].path.read_bytes()
    monkeypatch.setattr(tf2onnx.convert, "from_graph_def", _converter_writing(whole[:1000]))  # cut short
    with pytest.raises(PipelineError, match="damaged graph"):
        export_run(exported_runs["logreg"], "onnx", tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("edit", ["reversed", "three parts"])
def test_a_fused_config_whose_parts_are_not_the_heads_is_refused_in_one_line(exported_runs: dict[str, Path],
                                                                             fused_run: Path, tmp_path: Path,
                                                                             edit: str, capsys) -> None:
    """The head records the caches it reads in its input order (head.json's input_parts): a
    config.json that lists them otherwise (reversed, even with its features made to match, or with
    a part more) would feed each part's features to another part's weights."""
    import shutil

    copy = tmp_path / "models" / "fused-copy"
    shutil.copytree(fused_run, copy)
    config = json.loads((copy / "config.json").read_text())
    if edit == "reversed":
        config["fusion"] = config["fusion"][::-1]
        config["features"], config["view"] = config["fusion"][0]["features"], config["fusion"][0]["view"]
    else:
        config["fusion"].append(config["fusion"][1])
    (copy / "config.json").write_text(json.dumps(config))
    image = str(sorted(exported_runs["data"].rglob("*.png"))[0])
    for command in (["predict", "--model", str(copy), image],
                    ["export", "--model", str(copy), "--format", "keras", "--out", str(tmp_path / "out")],
                    ["evaluate", "--model", str(copy)]):
        assert main(command) == 1, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "otherwise than the head was trained on" in err[0], (command, err)
    assert not (tmp_path / "out" / "model.keras").exists()


def test_the_demos_plain_tensorflow_load_prints_its_answer_and_no_native_chatter(exported_runs: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    from conftest import ROOT

    summary = export_run(exported_runs["logreg"], "savedmodel", tmp_path / "out", check_images=0)
    image = sorted(exported_runs["data"].rglob("*.png"))[0]
    result = subprocess.run([sys.executable, "-I", str(ROOT / "docs" / "examples" / "load_savedmodel.py"),
                             str(summary.path), str(image)], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(image)) and result.stdout.split()[1] in CLASSES
    assert result.stderr == "", result.stderr
