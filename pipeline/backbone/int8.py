"""extract --precision int8: the frozen backbone statically quantised and run by ONNX Runtime.

The float32 feature extractor (preprocessed pixels to each layer's pooled features) is converted to
ONNX (onnx_graph.py) and quantised by ONNX Runtime's static quantisation: QDQ format, unsigned
8-bit activations and signed 8-bit weights per output channel (U8S8), activation ranges
calibrated on CALIBRATION_IMAGES of the dataset's own training images: those of lowest content id
(sha256), a choice that needs no seed and names its images, in batches of CALIBRATION_BATCH in
that order, each range the mean of the batches' minima and maxima (ONNX Runtime's moving-average
min-max: measured, it is what lets VGG16's heads agree on 99%; the global min-max, percentile and
entropy ranges did not). The convolutions that read the pixels stay in float (pixel_convolutions:
measured). ONNX Runtime was measured against TensorFlow fp32 and bf16, and against OpenVINO with
NNCF (bench/int8.py, bench/RESULTS.md): ONNX Runtime is the runtime.

The quantised graph belongs to its cache: it is written into the cache directory
(backbone-int8.onnx) with a record (backbone-int8.json: the calibration images' ids, the
runtime's version, the graph's sha256), the record last, so a calibration killed halfway leaves
nothing and the next run starts it again. A continued extract loads that graph, so every row of
an int8 cache comes from one quantisation; a graph lost since is quantised again from the
recorded images (deterministic), or refused where they are gone. The fingerprint records int8,
the runtime (`backend`: onnxruntime-<major.minor>) and the calibration rule, so int8 features
never mix with float ones or with another runtime's.

Which backbones and sizes are offered: int8_certificate.json (shipped with the package, written by
bench/int8.py) holds, per backbone and size, the heads' certificate on ELPV: a head trained on
int8 features against the same head on fp32 features over five split seeds (accuracy within 0.5
points, test predictions agreeing on at least 99%). A failed one is refused; one not measured is
extracted with a note saying so; a CPU without int8 instructions (VNNI, AMX) is told what to
expect.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.artefacts import file_sha256
from pipeline.errors import PipelineError

MODEL_FILE = "backbone-int8.onnx"
RECORD_FILE = "backbone-int8.json"
CALIBRATION_IMAGES = 256  # ONNX Runtime's and OpenVINO's guidance: a few hundred representative images
MIN_CALIBRATION = 32  # fewer leave the activation ranges to chance
CALIBRATION_BATCH = 8  # images a calibration call: the calibrating graph keeps every activation of its batch
CALIBRATION_RULE = f"train-{CALIBRATION_IMAGES}-lowest-sha256-batches-{CALIBRATION_BATCH}-moving-average"
CERTIFICATE_FILE = "int8_certificate.json"
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # what makes int8 multiply faster than float on a CPU
MAX_ACCURACY_DROP = 0.005  # the heads' certificate: accuracy within half a point ...
MIN_AGREEMENT = 0.99  # ... and test predictions agreeing on 99%


def require_runtime() -> None:
    """One line naming the extra where ONNX Runtime, onnx or tf2onnx is missing."""
    for module in ("onnxruntime", "onnx", "tf2onnx"):
        try:
            __import__(module)
        except ImportError:
            raise PipelineError(f"--precision int8 needs {module}: pip install 'bottleneck-pipeline[int8]'") from None


def runtime_identity() -> str:
    """onnxruntime-<major.minor>: what computes int8 features (a cache of another version is another cache)."""
    require_runtime()
    import onnxruntime

    return "onnxruntime-" + ".".join(onnxruntime.__version__.split(".")[:2])


def cpu_int8_instructions() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in INT8_FLAGS if flag in flags]


def certificate() -> dict[str, Any]:
    """The shipped certificate: "backbone:size" -> the heads' figures, the CPU, the runtime, passed."""
    try:
        text = resources.files("pipeline.backbone").joinpath(CERTIFICATE_FILE).read_text(encoding="utf-8")
        found = json.loads(text)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def check_offered(backbone: str, image_size: int) -> list[str]:
    """Refuse (one line) a backbone and size whose heads failed the certificate; the notes extract
    says otherwise (not certified; no int8 instructions on this CPU)."""
    entry = certificate().get(f"{backbone}:{image_size}")
    notes = []
    if isinstance(entry, dict) and not entry.get("passed", False):
        raise PipelineError(
            f"{backbone} at {image_size} px is not offered in int8: on ELPV over {entry.get('seeds', 5)} split seeds "
            f"its heads on int8 features lost {entry.get('accuracy_drop_points', '?')} points of test accuracy and "
            f"agreed with fp32's on {entry.get('agreement_percent', '?')}% of test images (needed: within "
            f"{MAX_ACCURACY_DROP * 100:g} points, {MIN_AGREEMENT:.0%}); use --precision bf16 or fp32")
    if not isinstance(entry, dict):
        certified = sorted(key for key, value in certificate().items()
                           if isinstance(value, dict) and value.get("passed"))
        notes.append(f"{backbone} at {image_size} px has no int8 certificate (certified: "
                     f"{', '.join(certified) or 'none'}): compare a head on these features with one on fp32 features "
                     "before relying on them (bench/int8.py)")
    found = cpu_int8_instructions()
    if not found:
        measured = [value.get("speedup_vs_fp32") for value in certificate().values()
                    if isinstance(value, dict) and value.get("speedup_vs_fp32")]
        elsewhere = f" (measured {max(measured)}x float32 on a CPU with them)" if measured else ""
        notes.append("this CPU has no int8 instructions (VNNI or AMX): int8 convolutions run at about float32's speed "
                     f"here, or slower{elsewhere}; --precision fp32 gives that speed without quantisation")
    return notes


# --- the quantised graph ---------------------------------------------------------------------------


def float_graph(extractor: Any, image_size: int, path: Path) -> None:
    """The float32 feature extractor (a FeatureExtractor) as ONNX: preprocessed images in, one
    output per layer (pooled as the cache keeps it), in the extractor's layer order."""
    import tensorflow as tf

    from pipeline.backbone.onnx_graph import frozen_to_onnx

    spec = (tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="images"),)

    @tf.function(input_signature=spec)
    def serve(images: Any) -> Any:
        features = extractor._features(images)
        return tuple(tf.identity(features[name], name=f"features_{i}") for i, name in enumerate(extractor.layers))

    frozen_to_onnx(serve, "images", path)


def quantise(float_path: Path, target: Path, batches: Iterable[np.ndarray],
             operators: Sequence[str] | None = None) -> int:
    """`float_path` statically quantised (QDQ, U8S8, per channel, moving-average min-max ranges over
    `batches`, cut into batches of CALIBRATION_BATCH)
    into `target`, written whole; returns how many images calibrated it. `operators`: only these
    operator types quantised (an export's head stays float: its standardisation divides by tiny
    variances, which int8 activations cannot carry)."""
    import contextlib
    import io

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from pipeline.backbone.onnx_graph import quiet_loggers

    name = _input_name(float_path)
    kept_float = pixel_convolutions(float_path)
    counted = [0]

    def small(source: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
        for batch in source:
            for start in range(0, len(batch), CALIBRATION_BATCH):
                yield np.asarray(batch[start:start + CALIBRATION_BATCH], np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.source = iter(small(batches))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.source, None)
            if batch is None:
                return None
            counted[0] += len(batch)
            return {name: batch}

    with atomic.replacing(target, suffix=".onnx") as temporary, contextlib.redirect_stdout(io.StringIO()), \
            quiet_loggers("", "onnxruntime"):
        quantize_static(str(float_path), str(temporary), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=kept_float,
                        extra_options={"CalibMovingAverage": True},
                        op_types_to_quantize=list(operators) if operators else None)
    return counted[0]


def pixel_convolutions(path: Path) -> list[str]:
    """The convolutions that read three channels (the pixels: the first layer, and caffe's RGB-to-BGR
    swap): kept in float. Measured on VGG16 150 px over ELPV images: quantising the first convolution
    doubles the features' error (mean relative error 6.3% against 3.5%; cosine 0.9983 against
    0.9995) for 9% of the int8 speed (65 against 59 images/s); min-max, percentile and entropy
    calibration of every layer measured no better (6.3%, 7.1%, 6.3%)."""
    import onnx

    graph = onnx.load(str(path)).graph
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "Conv" and len(node.input) > 1
            and len(shapes.get(node.input[1], [])) == 4 and shapes[node.input[1]][1] == 3]


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


class Int8Extractor:
    """The quantised backbone, run by ONNX Runtime: the FeatureExtractor's interface (called on a
    batch of preprocessed images, float32 features per layer; `batches` and `images` count)."""

    def __init__(self, path: Path, layers: Sequence[str], pooling: str, shapes: dict[str, tuple[int, ...]]) -> None:
        from pipeline.backbone.onnx_graph import session

        self.path = Path(path)
        self.layers = tuple(layers)
        self.pooling = pooling
        self.shapes = dict(shapes)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.session = session(self.path, threads=cores, what="the int8 backbone",
                               after="delete it (the next extract quantises it again)")
        self.input = self.session.get_inputs()[0].name
        self.batches = 0
        self.images = 0
        self.batch_size: int | None = None

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        pixels = np.asarray(images, np.float32)
        self.batches += 1
        self.images += len(pixels)
        outputs = self.session.run(None, {self.input: pixels})
        return {name: np.asarray(value, np.float32) for name, value in zip(self.layers, outputs)}

    def on_device(self, images: Any) -> dict[str, np.ndarray]:
        return self(images)

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.shapes


def calibration_ids(records: Sequence[Any]) -> list[str]:
    """The content ids of the images that calibrate a new int8 cache: the training images (every
    image where none is marked train: a table of paths) of lowest sha256, CALIBRATION_IMAGES of them."""
    train = sorted({r.sha256 for r in records if r.split == "train" and r.sha256})
    pool = train or sorted({r.sha256 for r in records if r.sha256})
    if len(pool) < MIN_CALIBRATION:
        raise PipelineError(f"--precision int8 calibrates on the dataset's training images and it has {len(pool)}: "
                            f"it needs at least {MIN_CALIBRATION} (ideally {CALIBRATION_IMAGES}); extract in fp32 "
                            "or bf16")
    return pool[:CALIBRATION_IMAGES]


def prepare(directory: Path, float_extractor: Any, image_size: int, records: Sequence[Any], root: Path,
            pixels: Any, progress: bool = False) -> Int8Extractor:
    """The int8 extractor of the cache `directory`: its recorded graph, or one quantised now from
    the float extractor (`float_extractor()` builds it) and calibrated on the recorded images (a
    new cache: calibration_ids of `records`). `pixels(files)` yields preprocessed batches."""
    directory.mkdir(parents=True, exist_ok=True)
    model, record_path = directory / MODEL_FILE, directory / RECORD_FILE
    runtime = runtime_identity()
    record = _read_record(record_path)
    if record is not None and model.is_file() and file_sha256(model) == record.get("sha256"):
        return Int8Extractor(model, record["layers"], record["pooling"],
                             {k: tuple(v) for k, v in record["shapes"].items()})
    ids = record["calibration"]["ids"] if record is not None else calibration_ids(records)
    by_id = {r.sha256: root / r.path for r in records if r.sha256}
    missing = [digest for digest in ids if digest not in by_id]
    if missing:
        raise PipelineError(f"{model} is gone or damaged and {len(missing)} of the images that calibrated it are no "
                            "longer in the dataset: its features cannot be continued; extract into a new cache "
                            "(delete this one, or use another --cache)")
    if progress:
        import sys

        print(f"int8: calibrating the quantised backbone on {len(ids)} training images", file=sys.stderr, flush=True)
    extractor = float_extractor()
    float_path = directory / ".backbone-fp32.onnx"
    try:
        float_graph(extractor, image_size, float_path)
        used = quantise(float_path, model, pixels([by_id[digest] for digest in ids]))
    finally:
        float_path.unlink(missing_ok=True)
    if used < len(ids):
        model.unlink(missing_ok=True)
        raise PipelineError(f"only {used} of the {len(ids)} calibration images could be read: fix or remove the "
                            "damaged ones, or extract in fp32 or bf16")
    shapes = extractor.output_shapes()
    atomic.write_json(record_path, {
        "format": "onnx, QDQ, uint8 activations and int8 weights per channel (U8S8), moving-average min-max "
                  f"calibration over batches of {CALIBRATION_BATCH}; the "
                  "convolutions reading the pixels in float",
        "runtime": runtime, "sha256": file_sha256(model), "layers": list(extractor.layers),
        "pooling": extractor.pooling, "shapes": {k: list(v) for k, v in shapes.items()},
        "calibration": {"rule": CALIBRATION_RULE, "images": len(ids),
                        "digest": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "ids": ids},
    })
    return Int8Extractor(model, extractor.layers, extractor.pooling, shapes)


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = atomic.read_json(path)
        ids = record["calibration"]["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TypeError
        return record
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"{path} is damaged: delete the cache (its int8 features cannot be continued without "
                            "it) and extract again") from None


def describe(directory: Path) -> dict[str, Any] | None:
    """What the manifest records of an int8 cache's quantisation (the ids themselves stay in RECORD_FILE)."""
    record = _read_record(Path(directory) / RECORD_FILE)
    if record is None:
        return None
    calibration = {k: v for k, v in record["calibration"].items() if k != "ids"}
    return {"runtime": record.get("runtime"), "format": record.get("format"), "graph_sha256": record.get("sha256"),
            "calibration": calibration | {"file": RECORD_FILE}}
