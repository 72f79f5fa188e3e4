"""bench/gpu.py as the GPU machine will run it, on this CPU with a handful of images: from a virtual
environment that holds only what the GPU machines hold (numpy, jax, h5py, pillow, tqdm,
scikit-learn, joblib and what they need), Keras and its dependencies unpacked from the carried
wheels (the list bench/gpu-wheels.txt that `make gpu-wheels` downloads) into a private folder,
TensorFlow unimportable; so that device minutes measure, not debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

GPU_MACHINE_HAS = ("numpy", "jax", "h5py", "pillow", "tqdm", "scikit-learn", "joblib")  # and what they need


def _with_dependencies(names: tuple[str, ...]) -> set[str]:
    """The distributions named and everything they require (extras left out), as installed here."""
    import importlib.metadata as metadata
    import re

    from packaging.requirements import Requirement

    found, queue = set(), list(names)
    while queue:
        name = re.sub(r"[-_.]+", "-", queue.pop()).lower()
        if name in found:
            continue
        found.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    return found


def _gpu_machine_python(folder: Path) -> Path:
    """A venv (no pip) whose site-packages links only the GPU machine's distributions from this
    Python's: their packages, compiled libraries and metadata."""
    import importlib.metadata as metadata

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next((folder / "lib").glob("python3*/site-packages"))
    for name in _with_dependencies(GPU_MACHINE_HAS):
        distribution = metadata.distribution(name)
        for top in {Path(str(file)).parts[0] for file in distribution.files or []}:
            source = Path(distribution.locate_file(top))
            if top != ".." and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-machine")
    wheels = root / "wheels"
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
                               "-d", str(wheels), "-r", str(ROOT / "bench" / "gpu-wheels.txt")],
                              capture_output=True, text=True, timeout=300)
    if download.returncode != 0:
        pytest.skip(f"the wheels of bench/gpu-wheels.txt could not be downloaded: {download.stderr[-300:]}")
    python = _gpu_machine_python(root / "venv")
    alone = subprocess.run([str(python), "-c", "import keras"], capture_output=True, text=True)
    assert alone.returncode != 0, "the GPU machine's Python has no Keras"
    return {"root": root, "wheels": wheels, "python": python}


def _bench(gpu_machine: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    # JAX's persistent compilation cache, shared by the module's runs: the benchmark and the crash
    # runs compile the same networks at the same sizes (what they measure is asserted positive only)
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(gpu_machine["root"]), "JAX_PLATFORMS": "cpu",
                   "JAX_COMPILATION_CACHE_DIR": str(gpu_machine["root"] / "jax-cache"),
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.run([str(gpu_machine["python"]), str(ROOT / "tests" / "without_tensorflow.py"),
                           str(ROOT / "bench" / "gpu.py"), "--backend", "jax", "--wheels", str(gpu_machine["wheels"]),
                           "--work", str(gpu_machine["root"] / "work"), *args],
                          cwd=gpu_machine["root"], capture_output=True, text=True, env=environment, timeout=600)


def test_check_says_in_seconds_that_everything_is_there(gpu_machine: dict[str, Path]) -> None:
    result = _bench(gpu_machine, "--check", "--backbones", "vgg16,efficientnet_lite0", "--precision", "fp32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "keras: from" in out and str(gpu_machine["root"] / "work" / "site") in out, out
    assert "jax devices: cpu" in out and "vgg16 (fp32) builds and runs" in out, out
    assert "efficientnet_lite0 (fp32) builds and runs" in out and "check passed" in out, out
    site_packages = next((gpu_machine["root"] / "venv" / "lib").glob("python3*/site-packages"))
    assert not (site_packages / "keras").exists(), "nothing is installed into the machine's interpreter"


def test_check_says_what_is_missing(gpu_machine: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([str(gpu_machine["python"]), str(ROOT / "tests" / "without_tensorflow.py"),
                             str(ROOT / "bench" / "gpu.py"), "--check", "--wheels", str(empty), "--work",
                             str(tmp_path / "work")], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 1
    assert "MISSING" in result.stdout and "make gpu-wheels" in result.stdout and "check failed" in result.stdout


def test_the_benchmark_runs_and_writes_its_json_after_every_row(gpu_machine: dict[str, Path]) -> None:
    out = gpu_machine["root"] / "gpu.json"
    result = _bench(gpu_machine, "--images", "8", "--image-size", "32", "--batch-size", "4", "--seeds-images", "4",
                    "--backbone-seconds", "0.2", "--backbones", "vgg16", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "extract / min(backbone, decode)" in result.stdout
    report = json.loads(out.read_text())
    assert "backend jax" in report["machine"] and report["complete"] is True
    assert [row["images"] for row in report["rows"]] == ["elpv-like 300x300 gray png", "photo-like 500x375 colour jpeg"]
    for row in report["rows"]:
        for key in ("backbone_alone", "decode", "seeds", "extract_loop", "extract_over_bound"):
            assert row[key] > 0, (key, row)
    images = sorted((gpu_machine["root"] / "work" / "images").rglob("*.*"))
    assert len(images) == 16 and {p.suffix for p in images} == {".png", ".jpg"}


def test_a_crash_keeps_the_rows_measured_before_it(gpu_machine: dict[str, Path]) -> None:
    """The second backbone does not exist: the run fails after the first one's rows, which the
    JSON already holds."""
    out = gpu_machine["root"] / "partial.json"
    result = _bench(gpu_machine, "--images", "8", "--image-size", "32", "--batch-size", "4", "--seeds-images", "4",
                    "--backbone-seconds", "0.2", "--backbones", "vgg16,no_such_backbone", "--json", str(out))
    assert result.returncode != 0
    report = json.loads(out.read_text())
    assert report["complete"] is False and len(report["rows"]) == 2 and report["rows"][0]["backbone"] == "vgg16"


def test_make_gpu_wheels_and_the_benchmark_share_one_list() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-r bench/gpu-wheels.txt" in makefile
    source = (ROOT / "bench" / "gpu.py").read_text()
    assert 'gpu-wheels.txt' in source and "keras==3.15.1" not in source
    assert os.path.getsize(ROOT / "bench" / "gpu-wheels.txt") > 0
