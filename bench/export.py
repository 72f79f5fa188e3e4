"""Exported models side by side on the test split: size, load time, predictions/s, and the largest
difference to `predict` (the run at its own precision) and to the float32 model.

    .venv/bin/python -m bench.export [--model best] [--models models] [--images 0 (all)]

For each format (keras, savedmodel, tflite float, tflite quantised, onnx float32, onnx int8) the
run is exported into a temporary folder, loaded in this process (load time), and run on the run's
test images: keras on decoded images of their own size in batches of 32, the SavedModel on
encoded bytes in batches of 32 (decoding inside), TFLite one image at a time and ONNX Runtime
one at a time and in batches of 32, both on images resized as extract does (int8 ONNX is
dynamically quantised: its activation scales are computed per call, so a batch shares them).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402
from pipeline.cache.reader import split_images  # noqa: E402
from pipeline.images.decode_tf import decode_and_resize  # noqa: E402
from pipeline.runs import Run  # noqa: E402
from pipeline.serving.export import export_run  # noqa: E402
from pipeline.serving.formats.tflite import interpreter as tflite_interpreter  # noqa: E402
from pipeline.serving.predict import predict_files  # noqa: E402

BATCH = 32


def batches(items: list, size: int = BATCH):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="best")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--images", type=int, default=0, help="test images to use (0: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/export.json"))
    args = parser.parse_args()
    print(machine_line())
    opened = Run.open(args.model, args.models)
    run, config, class_names = opened.directory, opened.config, opened.class_names
    store = opened.features()
    files = split_images(store)["test"].files
    files = files[:args.images] if args.images else files
    size = store.fingerprint.image_size
    print(f"run {run.name} ({config['kind']}, computed in {store.fingerprint.precision}); {len(files)} test images")

    rows = predict_files(run, [Path(f) for f in files], top_k=len(class_names))
    at_run_precision = np.array([[r.probabilities[r.labels.index(c)] for c in class_names] for r in rows])
    resized = [decode_and_resize(tf.constant(f), size).numpy() for f in files]
    reference = opened.classifier("fp32")
    float32 = np.concatenate([np.asarray(reference(np.stack(b), training=False)) for b in batches(resized)])
    raw = [tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False).numpy() for f in files]
    encoded = [open(f, "rb").read() for f in files]

    results = []
    with tempfile.TemporaryDirectory() as work:
        for fmt, quantize, batch in (("keras", False, BATCH), ("savedmodel", False, BATCH), ("tflite", False, 1),
                                     ("tflite", True, 1), ("onnx", False, BATCH), ("onnx", False, 1),
                                     ("onnx", True, 1), ("onnx", True, BATCH)):
            summary = export_run(run, fmt, Path(work), quantize)
            started = time.perf_counter()
            if fmt == "keras":
                model = keras.models.load_model(summary.path)
                loaded = time.perf_counter() - started
                started = time.perf_counter()
                got = np.concatenate([model.predict(np.stack(b), verbose=0) for b in batches(raw)])
            elif fmt == "savedmodel":
                serve = tf.saved_model.load(str(summary.path)).signatures["serving_default"]
                loaded = time.perf_counter() - started
                started = time.perf_counter()
                got = np.concatenate([serve(images=tf.constant(b))["probabilities"].numpy() for b in batches(encoded)])
            elif fmt == "onnx":
                from pipeline.serving.formats.onnx import run_session, session

                runtime = session(summary.path)
                loaded = time.perf_counter() - started
                started = time.perf_counter()
                got = np.concatenate([run_session(runtime, np.stack(b)) for b in batches(resized, batch)])
            else:
                interpreter = tflite_interpreter(summary.path.read_bytes())
                loaded = time.perf_counter() - started
                given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
                started = time.perf_counter()
                got = []
                for image in resized:
                    interpreter.set_tensor(given["index"], image[None])
                    interpreter.invoke()
                    got.append(interpreter.get_tensor(taken["index"])[0])
                got = np.array(got)
            seconds = time.perf_counter() - started
            name = fmt + ((" int8" if fmt == "onnx" else " quantised") if quantize else "")
            name += f" (batches of {batch})" if fmt == "onnx" else ""
            results.append({
                "format": name, "file": summary.path.name, "megabytes": round(summary.bytes / 2**20, 1),
                "export_seconds": round(summary.seconds, 2), "load_seconds": round(loaded, 2),
                "predictions_per_second": round(len(files) / seconds, 1),
                "max_difference_to_float32": float(np.abs(got - float32).max()),
                "max_difference_to_predict": float(np.abs(got - at_run_precision).max()),
                "top1_agreement_with_predict": float(np.mean(got.argmax(1) == at_run_precision.argmax(1))),
            })
    header = ["format", "size MB", "export s", "load s", "predictions/s", "max diff to float32",
              f"max diff to predict ({store.fingerprint.precision})", "top-1 same as predict"]
    table = [[r["format"], r["megabytes"], r["export_seconds"], r["load_seconds"], r["predictions_per_second"],
              f"{r['max_difference_to_float32']:.1e}", f"{r['max_difference_to_predict']:.1e}",
              f"{r['top1_agreement_with_predict']:.2%}"] for r in results]
    print(markdown_table(header, table))
    print(f"float32 model against predict ({store.fingerprint.precision}): largest difference "
          f"{np.abs(float32 - at_run_precision).max():.4f}, top-1 the same on "
          f"{np.mean(float32.argmax(1) == at_run_precision.argmax(1)):.2%} of {len(files)} images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "run": str(run), "images": len(files),
                                    "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
