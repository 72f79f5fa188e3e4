"""Shared helpers: small image folders made by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from pipeline.dataset import SplitConfig
from pipeline.extract import ExtractOptions

ROOT = Path(__file__).resolve().parent.parent


def write_image(path: Path, seed: int, size: int = 40, channels: int = 3, fmt: str = "png") -> Path:
    """A small random image with a class-like pattern, encoded by TensorFlow."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = tf.io.encode_png(pixels) if fmt == "png" else tf.io.encode_jpeg(pixels)
    path.write_bytes(encoded.numpy())
    return path


def make_image_folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cats", "dogs"),
                      seed: int = 0) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img{i:03d}.png", seed=seed * 100_000 + c * 1000 + i)
    return root


def tiny_options(data: Path, cache: Path, **overrides) -> ExtractOptions:
    """VGG16 with random weights at 32x32 in float32: fast and deterministic."""
    values = dict(
        data=data, backbone="vgg16", image_size=32, weights="none", precision="fp32",
        batch_size=4, shard_size=8, cache_root=cache, progress=False,
        splits=SplitConfig(0.2, 0.2, 0),
    )
    values.update(overrides)
    return ExtractOptions(**values)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_weights_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted weights go to a per-session folder, not the user's cache."""
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path_factory.getbasetemp() / "weights"))
