"""bench/gpu.py runs end to end on this CPU with a handful of images, on the JAX backend with
TensorFlow unimportable (as on the GPU machines), so that device minutes measure, not debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_gpu_benchmark_runs_on_a_cpu_without_tensorflow(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "without_tensorflow.py"), str(ROOT / "bench" / "gpu.py"),
         "--backend", "jax",
         "--images", "8", "--image-size", "32", "--batch-size", "4", "--seeds-images", "4", "--backbone-seconds",
         "0.2", "--backbones", "vgg16", "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "extract / min(backbone, decode)" in result.stdout
    report = json.loads(out.read_text())
    assert "backend jax" in report["machine"]
    assert [row["images"] for row in report["rows"]] == ["elpv-like 300x300 gray png", "photo-like 500x375 colour jpeg"]
    for row in report["rows"]:
        for key in ("backbone_alone", "decode", "seeds", "extract_loop", "extract_over_bound"):
            assert row[key] > 0, (key, row)
    images = sorted((tmp_path / "work" / "images").rglob("*.*"))
    assert len(images) == 16 and {p.suffix for p in images} == {".png", ".jpg"}
