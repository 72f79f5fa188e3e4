"""The fingerprint of a feature cache: everything that decides an image's features, and the
cache directory's name that follows from it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides the features of an image. Equal fingerprints share a cache;
    different ones never do."""

    backbone: str
    weights_source: str
    weights_identity: str
    image_size: int
    resize_method: str
    preprocessing: str
    layers: tuple[str, ...]
    pooling: str
    precision: str
    tensorflow: str  # TensorFlow's major.minor where it computed the features, else "none"
    backend: str = "tensorflow"  # the Keras backend that computed them: "tensorflow" or "jax-<major.minor>"
    decoder: str = "tensorflow"  # what decoded the images: TensorFlow, or Pillow with its libjpeg
    calibration: str = "none"  # int8: the rule that chose the images calibrating the quantised backbone

    def as_dict(self) -> dict[str, Any]:
        """Every field, except `backend` and `decoder` where both are TensorFlow, and `calibration`
        where there is none: caches made before those fields existed keep their digest (and so
        their directory)."""
        values = asdict(self)
        values["layers"] = list(self.layers)
        if self.backend == "tensorflow" and self.decoder == "tensorflow":
            del values["backend"], values["decoder"]
        if self.calibration == "none":
            del values["calibration"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Fingerprint:
        return cls(**{**values, "layers": tuple(values["layers"])})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def cache_directory_name(fingerprint: Fingerprint, data_root: Path) -> str:
    """Readable and unique per (fingerprint, dataset folder): `elpv-vgg16-150-none-bf16-1a2b3c4d`."""
    key = hashlib.sha256(f"{fingerprint.digest()}:{Path(data_root).resolve()}".encode()).hexdigest()[:8]
    dataset = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(data_root).resolve().name) or "data"
    dataset = dataset[:80]  # the directory name stays far below the file system's 255 bytes
    f = fingerprint
    return f"{dataset}-{f.backbone}-{f.image_size}-{f.pooling}-{f.precision}-{key}"
