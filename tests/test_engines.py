"""The Ray engine (`extract --engine ray`) against the local engine, on local Ray instances with
two CPUs: the same rows and features, recovery from a killed actor and a killed driver,
incremental updates without a backbone pass, and two nodes writing one cache."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, assert_features_close, make_image_folder, tiny_options, write_image
from pipeline.cache import store
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.extraction.extract import extract_features
from pipeline.extraction.ray_engine import check_cache_reachable

ray = pytest.importorskip("ray")


def rows_by_path(cache_dir: Path) -> dict[str, tuple[str, int, str, np.ndarray]]:
    """path -> (sha256, label, split, features) over every shard; fails on a row cached twice."""
    found: dict[str, tuple[str, int, str, np.ndarray]] = {}
    fingerprint = store.Fingerprint.from_dict(store.read_manifest(cache_dir)["fingerprint"])
    for shard in store.shard_paths(cache_dir):
        rows = store.read_shard_rows(shard, fingerprint.layers)
        for i, path in enumerate(rows.paths):
            assert path not in found, f"{path} is cached twice"
            found[path] = (rows.sha256[i], int(rows.labels[i]), rows.splits[i],
                           np.concatenate([rows.features[n][i].ravel() for n in fingerprint.layers]))
    return found


def assert_same_cache(ray_dir: Path, local_dir: Path) -> None:
    ray_rows, local_rows = rows_by_path(ray_dir), rows_by_path(local_dir)
    assert sorted(ray_rows) == sorted(local_rows)
    for path, (digest, label, split, features) in local_rows.items():
        other = ray_rows[path]
        assert (other[0], other[1], other[2]) == (digest, label, split), path
        assert_features_close(other[3], features, f"features of {path}")  # other batches: see conftest


def processes(matching: Callable[[str], bool]) -> list[int]:
    """PIDs of this machine's processes whose command line matches."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if matching(command):
                pids.append(int(entry.name))
    return pids


def ray_processes() -> list[int]:
    """Ray's processes that hold resources (GCS, raylet, workers); its dashboard and runtime-env
    agents leave on their own within about a minute of their raylet."""
    return processes(lambda command: "Agent" not in command and (
        "raylet" in command or "gcs_server" in command or command.startswith("ray::")))


def backbone_actor_pids() -> list[int]:
    return processes(lambda command: command.startswith("ray::") and "BackboneActor" in command)


@pytest.fixture(autouse=True)
def _no_ray_left() -> None:
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_ray_engine_gives_the_local_engines_rows_and_leaves_no_ray_behind(tmp_path: Path, monkeypatch) -> None:
    real_init = ray.init
    data = make_image_folder(tmp_path / "data", per_class=9)
    write_image(data / "cats" / "gray.png", seed=5, channels=1)
    (data / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    before = set(ray_processes())
    local = extract_features(tiny_options(data, tmp_path / "local"))
    summary = extract_features(tiny_options(data, tmp_path / "ray", engine="ray"))
    assert (summary.engine, summary.new, summary.images) == ("ray", 19, 19)
    assert (summary.retried_units, summary.restarted_actors) == (0, 0)
    assert [s["path"] for s in summary.skipped] == [s["path"] for s in local.skipped] == ["dogs/broken.png"]
    assert summary.skipped[0]["reason"] == local.skipped[0]["reason"]
    assert_same_cache(summary.cache_dir, local.cache_dir)
    # shards are named by their unit, and every unit is a whole shard of the plan
    names = [p.name for p in store.shard_paths(summary.cache_dir)]
    assert len(names) == 3 and all(n.startswith("shard-u") for n in names)
    # the local instance started for the command is gone with it (waited for: a loaded machine
    # takes its time to end processes)
    deadline = time.time() + 120
    while set(ray_processes()) - before and time.time() < deadline:
        time.sleep(0.5)
    assert not set(ray_processes()) - before
    # the driver read no image bytes on the first run, yet the hash index learned every hash; and
    # with nothing new to compute (and the precision named) no Ray instance is started at all
    started = []
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: started.append(kwargs) or real_init(*args, **kwargs))
    again = extract_features(tiny_options(data, tmp_path / "ray", engine="ray"))
    assert (again.new, again.backbone_batches, again.reused) == (0, 0, 19)
    assert not started and not ray.is_initialized()


def test_incremental_update_on_the_ray_engine(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8)
    # the first pass on the local engine (a Ray pass of its own is the test above): the Ray engine
    # continues a cache the local engine wrote, and further down the other way round
    extract_features(tiny_options(data, tmp_path / "ray"))
    write_image(data / "cats" / "new1.png", seed=901)
    write_image(data / "dogs" / "new2.png", seed=902)
    write_image(data / "dogs" / "img001.png", seed=903)  # changed bytes
    os.utime(data / "dogs" / "img001.png", ns=(1, 1))  # and an old mtime: size and mtime decide, not age
    (data / "cats" / "img002.png").unlink()
    summary = extract_features(tiny_options(data, tmp_path / "ray", engine="ray"))
    assert (summary.new, summary.images) == (3, 17)
    local = extract_features(tiny_options(data, tmp_path / "local"))
    assert_same_cache(summary.cache_dir, local.cache_dir)
    # the local engine continues a cache the Ray engine wrote
    write_image(data / "cats" / "new3.png", seed=904)
    local_after_ray = extract_features(tiny_options(data, tmp_path / "ray"))
    assert (local_after_ray.new, local_after_ray.reused) == (1, 17)
    # nothing new, and a lost hash index, cost the Ray engine a read of the cached files, no backbone pass
    (summary.cache_dir / store.HASH_INDEX_NAME).unlink()
    third = extract_features(tiny_options(data, tmp_path / "ray", engine="ray"))
    assert (third.new, third.backbone_batches) == (0, 0)
    assert_same_cache(third.cache_dir, extract_features(tiny_options(data, tmp_path / "local")).cache_dir)


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_every_image_is_cached_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_RAY_UNIT_PAUSE_S", "0.5")  # 12 units: the run outlasts the kill on any machine
    data = make_image_folder(tmp_path / "data", per_class=24)
    options = dict(image_size=96, batch_size=4, shard_size=4)
    killed: list[int] = []
    cache_root = tmp_path / "ray"

    def kill_an_actor_once_a_shard_is_written() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            written = list(cache_root.glob("*/shard-u*.h5"))
            actors = backbone_actor_pids()
            if written and actors:
                os.kill(actors[0], signal.SIGKILL)
                killed.append(actors[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor_once_a_shard_is_written)
    killer.start()
    summary = extract_features(tiny_options(data, cache_root, engine="ray", **options))
    killer.join()
    assert killed, "the run ended before an actor could be killed"
    assert (summary.new, summary.images) == (48, 48)
    # the actor is replaced; a unit it had begun is started again (one only queued on it is not)
    assert summary.restarted_actors >= 1
    local = extract_features(tiny_options(data, tmp_path / "local", **options))
    assert_same_cache(summary.cache_dir, local.cache_dir)


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_with_only_the_rest(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=24)
    arguments = ["--weights", "none", "--image-size", "96", "--precision", "fp32", "--batch-size", "4",
                 "--shard-size", "4", "--val-fraction", "0.2", "--test-fraction", "0.2", "--cache",
                 str(tmp_path / "ray"), "--data", str(data)]
    before = set(ray_processes())
    driver = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "extract", "--engine", "ray",
                               "--no-progress", *arguments], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env=dict(os.environ, PIPELINE_RAY_UNIT_PAUSE_S="0.5"))  # outlasts the kill
    deadline = time.time() + 120
    while not list((tmp_path / "ray").glob("*/shard-u*.h5")) and time.time() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30  # the driver's Ray instance goes with it (workers may finish a shard first)
    while set(ray_processes()) - before and time.time() < deadline:
        time.sleep(0.5)
    assert not set(ray_processes()) - before, "Ray processes outlived their killed driver"
    cache_dir = next((tmp_path / "ray").iterdir())
    kept = 0
    for shard in store.shard_paths(cache_dir):
        with h5py.File(shard, "r") as handle:
            kept += len(handle["paths"])
    assert 0 < kept < 48
    options = tiny_options(data, tmp_path / "ray", engine="ray", image_size=96, batch_size=4, shard_size=4)
    summary = extract_features(options)
    assert (summary.new, summary.reused, summary.images) == (48 - kept, kept, 48)
    local = extract_features(tiny_options(data, tmp_path / "local", image_size=96, batch_size=4, shard_size=4))
    assert_same_cache(summary.cache_dir, local.cache_dir)


@pytest.mark.slow
def test_two_nodes_write_one_cache(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    # enough work (16 units at 64 px) that the second actor, however late it starts, takes some of it
    data = make_image_folder(tmp_path / "data", per_class=32)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        summary = extract_features(tiny_options(data, tmp_path / "ray", engine="ray", ray_address=cluster.address,
                                                workers=2, shard_size=4, image_size=64))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert (summary.new, summary.nodes) == (64, 2)
    local = extract_features(tiny_options(data, tmp_path / "local", shard_size=4, image_size=64))
    assert_same_cache(summary.cache_dir, local.cache_dir)


def test_a_worker_that_cannot_reach_the_cache_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"cannot write to the cache .*shared file system"):
        check_cache_reachable(tmp_path / "not-on-this-node")


def test_ray_options_without_the_ray_engine_are_refused(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(PipelineError, match="--engine ray"):
        extract_features(tiny_options(image_folder, tmp_path / "cache", workers=2))


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
    ("not-an-address", "use auto or HOST:PORT"),
])
def test_a_ray_address_without_a_cluster_is_one_line_and_quick(tmp_path: Path, image_folder: Path,
                                                                capsys: pytest.CaptureFixture[str], address: str,
                                                                message: str) -> None:

    started = time.perf_counter()
    assert main(["extract", "--data", str(image_folder), "--cache", str(tmp_path / "c"), "--weights", "none",
                 "--engine", "ray", "--ray-address", address, "--no-progress"]) == 1
    assert time.perf_counter() - started < 30
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "c").exists()


class _Cluster:
    def __init__(self, cpus: int, gpus: int = 0, nodes: int = 1) -> None:
        self.resources = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
        self.gpus, self.nodes = gpus, nodes


@pytest.mark.parametrize("workers, cpus, gpus", [(2, 2, 0), (1000, 16, 0), (1, 1, 0), (3, 16, 2)])
def test_more_ray_workers_than_the_cluster_can_feed_are_refused(workers: int, cpus: int, gpus: int) -> None:
    from pipeline.extraction.ray_engine import RayEngine

    engine = RayEngine(None, None, 32, 8, 1 << 20, workers=workers)
    with pytest.raises(PipelineError, match=f"--workers {workers}: the Ray cluster has"):
        engine.actor_options(_Cluster(cpus, gpus))


class _WatchedCluster:
    """A cluster that counts the looks at its GPUs (a look starts a deferred instance)."""

    def __init__(self, gpus: int) -> None:
        self.looks, self._gpus = 0, gpus

    @property
    def gpus(self) -> int:
        self.looks += 1
        return self._gpus


@pytest.mark.parametrize("precision, gpus, looks, resolved", [
    ("fp32", 1, False, "fp32"), ("bf16", 1, False, "bf16"), ("mixed", 1, True, "mixed-fp16"),
    ("mixed", 0, True, "mixed-bf16"), (None, 1, True, "mixed-fp16")])
def test_only_a_precision_the_clusters_gpus_decide_looks_at_them(tmp_path: Path, precision: str | None, gpus: int,
                                                                   looks: bool, resolved: str) -> None:
    """The Ray engine's cluster is started on first use: a named float precision needs no look at
    its GPUs, so an extract with nothing new starts no instance."""
    from pipeline.extraction.extract import _Extraction

    cluster = _WatchedCluster(gpus)
    extraction = _Extraction(tiny_options(tmp_path, tmp_path / "cache", engine="ray", precision=precision), cluster)
    assert (bool(cluster.looks), extraction.precision) == (looks, resolved)


def test_a_deferred_cluster_starts_nothing_until_it_is_used() -> None:
    from pipeline.extraction.ray_engine import RayCluster

    with RayCluster(deferred=True) as cluster:
        assert not ray.is_initialized() and not cluster.started
    assert not ray.is_initialized()


def test_ray_workers_the_cluster_can_feed_are_taken() -> None:
    from pipeline.extraction.ray_engine import RayEngine

    assert RayEngine(None, None, 32, 8, 1 << 20, workers=3).actor_options(_Cluster(4))[0] == 3
    assert RayEngine(None, None, 32, 8, 1 << 20).actor_options(_Cluster(2, nodes=1))[0] == 1
    assert RayEngine(None, None, 32, 8, 1 << 20).actor_options(_Cluster(16, gpus=2))[0] == 2


def test_a_ray_address_where_something_else_listens_is_refused_quickly() -> None:
    from pipeline.extraction.ray_engine import check_address

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        connection, _ = server.accept()
        connection.recv(100)
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        connection.close()

    threading.Thread(target=answer, daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(PipelineError, match="not a Ray head node"):
        check_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=2.0)
    assert time.perf_counter() - started < 10
    server.close()


def test_a_ray_address_that_accepts_and_says_nothing_is_refused_after_the_timeout() -> None:
    from pipeline.extraction.ray_engine import check_address

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with pytest.raises(PipelineError, match="not a Ray head node"):
        check_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=1.0)
    server.close()


def test_ray_workers_import_the_package_the_driver_runs_and_nothing_inside_it(tmp_path: Path) -> None:
    """Issue 40: the driver runs a copy of the package that is not installed (importable only from
    the folder that holds it, through PYTHONPATH) and starts from another folder; a worker must
    import `pipeline` from that copy, and no folder inside the package may be on its path (its
    modules data, images, errors, ... would shadow installed packages of those names)."""
    import shutil
    import subprocess
    import sys

    home = tmp_path / "copy"
    shutil.copytree(Path(__file__).resolve().parent.parent / "pipeline", home / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, sys\n"
        "import ray\n"
        "from pipeline.extraction.ray_engine import RayCluster\n"
        "@ray.remote\n"
        "def where():\n"
        "    import importlib.util, sys\n"
        "    import pipeline\n"
        "    return {'file': pipeline.__file__, 'path': sys.path,\n"
        "            'errors': getattr(importlib.util.find_spec('errors'), 'origin', None)}\n"
        "with RayCluster(num_cpus=1):  # started on entering\n"
        "    print('WORKER ' + json.dumps(ray.get(where.remote())))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {
        "PYTHONPATH": str(home)}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=environment, capture_output=True,
                            text=True, timeout=300)
    found = [line[7:] for line in result.stdout.splitlines() if line.startswith("WORKER ")]
    assert result.returncode == 0 and found, result.stderr[-2000:]
    worker = json.loads(found[0])
    package = (home / "pipeline").resolve()
    assert Path(worker["file"]).resolve() == package / "__init__.py"
    inside = [entry for entry in worker["path"] if entry and Path(entry).resolve().is_relative_to(package)]
    assert not inside, inside
    assert worker["errors"] is None or not Path(worker["errors"]).resolve().is_relative_to(package)
