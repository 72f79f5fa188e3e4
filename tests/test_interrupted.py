"""A run killed with SIGKILL mid-extraction resumes to exactly what an uninterrupted run gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, make_image_folder, tiny_options
from pipeline.cache.store import FeatureStore, shard_paths
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features

ARGS = ["--weights", "none", "--precision", "fp32", "--image-size", "64", "--batch-size", "4",
        "--shard-size", "4", "--no-progress", "--val-fraction", "0.2", "--test-fraction", "0.2"]


def _extract_command(data: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_pipeline.py"), "extract", "--data", str(data), "--cache", str(cache), *ARGS]


def _kill_after_shards(command: list[str], cache: Path, shards: int) -> int:
    """Start an extract, SIGKILL it once `shards` shards are on disk; returns how many there were."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            found = list(cache.glob("*/shard-*.h5"))
            if len(found) >= shards:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "extract finished before it could be killed"
    return len(list(cache.glob("*/shard-*.h5")))


def test_sigkill_then_rerun_completes_with_identical_features(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=40)  # 20 shards: time to kill it mid-run
    killed_cache, clean_cache = tmp_path / "killed", tmp_path / "clean"

    shards_at_kill = _kill_after_shards(_extract_command(data, killed_cache), killed_cache, shards=3)
    directory = next(killed_cache.iterdir())
    assert not (directory / "manifest.json").exists()  # it really stopped mid-run
    for shard in shard_paths(directory):  # everything under a shard name is complete
        with h5py.File(shard, "r") as handle:
            assert len(handle["paths"]) == len(handle["features/block5_pool"]) == 4

    options = dict(image_size=64, batch_size=4, shard_size=4)
    resumed = extract_features(tiny_options(data, killed_cache, **options))
    clean = extract_features(tiny_options(data, clean_cache, **options))

    assert resumed.new == 80 - 4 * shards_at_kill and resumed.reused == 4 * shards_at_kill
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    a, b = FeatureStore(resumed.cache_dir).read(), FeatureStore(clean.cache_dir).read()
    order_a, order_b = np.argsort(a.paths), np.argsort(b.paths)
    assert [a.paths[i] for i in order_a] == [b.paths[i] for i in order_b]
    np.testing.assert_array_equal(a.labels[order_a], b.labels[order_b])
    # exact: a resumed run feeds the backbone the same batches (shards hold whole batches)
    np.testing.assert_array_equal(a.features["block5_pool"][order_a], b.features["block5_pool"][order_b])


def test_reader_refuses_a_cache_whose_run_was_interrupted(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6)
    summary = extract_features(tiny_options(data, tmp_path / "cache"))
    extra = summary.cache_dir / "shard-00042.h5"
    extra.write_bytes(shard_paths(summary.cache_dir)[0].read_bytes())  # as if a run died before its manifest
    with pytest.raises(PipelineError, match="interrupted"):
        FeatureStore(summary.cache_dir)


@pytest.mark.parametrize("command, expected", [
    (["train-head"], "no run was saved"),
    (["evaluate", "--model", "m"], "metrics and reports are as they were"),
    (["extract", "--data", "d"], "finished shards are kept"),
])
def test_ctrl_c_says_what_each_command_leaves(monkeypatch, capsys, command: list[str], expected: str) -> None:
    from pipeline.cli.commands import evaluate, extract, train_head

    def interrupted(args):
        raise KeyboardInterrupt

    handlers = {"train-head": train_head, "evaluate": evaluate, "extract": extract}
    monkeypatch.setattr(handlers[command[0]], "run", interrupted)
    assert main(command) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: ") and expected in err and len(err.splitlines()) == 1
    if command[0] != "extract":
        assert "shards" not in err and "resume" not in err
