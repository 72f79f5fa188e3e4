"""The Ray engine: the local engine's job (images in, shards out) on Ray Data, across processes,
nodes and GPUs.

The driver cuts the images to extract into units of one shard, in plan order. Each unit goes
through two Ray Data stages: a CPU task reads its files once each, hashes the bytes and decodes
those same bytes (pipeline/images/reading.py, `read_and_decode`); then an actor of a fixed pool (one per
GPU, `num_gpus=1`, or one per node on CPUs) that built the backbone once, from weights the driver
shipped with their checksum, runs it and writes the unit's shard with the cache's ShardWriter.

A unit's shard is named by its key (plan.unit_key: its files' paths, sizes, mtimes, hashes where
known, labels, splits, the class names and the fingerprint), so a unit that Ray retries or runs
twice writes the same file and the atomic rename makes it appear once. Ray restarts dead actors
and retries their tasks; a killed driver leaves every finished shard, and the next run plans
only what is missing. The cache must be on storage every node sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import atomic
from pipeline.data.dataset import ImageRecord
from pipeline.errors import PipelineError, install_hint
from pipeline.extraction.engine import EngineResult, strict_error
from pipeline.extraction.plan import ShardWriter, cut_units, unit_description, unit_key

# The folder that holds the package (a clone's root, or site-packages where it is installed): what a
# worker needs on its path to import `pipeline` as the driver does. Never a folder inside the
# package: there, its modules (data, images, cache, errors, ...) would import as top-level ones.
PACKAGE_HOME = Path(__file__).resolve().parents[2]


def _worker_env() -> dict[str, str]:
    """Workers import this project (installed at the same path on every node) and keep quiet."""
    path = os.pathsep.join(p for p in (str(PACKAGE_HOME), os.environ.get("PYTHONPATH", "")) if p)
    return {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}


# --- the cluster ----------------------------------------------------------------------------------


@dataclass
class RayCluster:
    """A Ray instance for one command: a local one started and shut down with it (address None),
    or a running cluster joined (`auto` or HOST:PORT) and left as it was. Started on entering, or,
    `deferred`, on first use: an extract with nothing new to compute, whose precision needs no
    look at the cluster's GPUs, then starts none (a local instance costs seconds of CPU)."""

    address: str | None = None
    num_cpus: int | None = None  # a local instance's CPUs (default: all)
    deferred: bool = False
    started: bool = field(default=False, init=False)  # by this object: shut down on leaving

    def __enter__(self) -> RayCluster:
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError as error:  # ray is an optional dependency (the "ray" extra)
            raise PipelineError(f"--engine ray needs ray[data] ({error}): {install_hint('ray')}") from None
        if self.address is not None:
            check_address(self.address)
        return self if self.deferred else self.start()

    def start(self) -> RayCluster:
        """Start or join the instance, unless this process is already connected to one."""
        import ray

        if self.started or ray.is_initialized():
            return self
        options: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                                       configure_logging=True)
        try:
            if self.address is None:
                # A local instance's workers inherit this environment: no runtime environment to set
                # up, so Ray's prestarted workers serve the first tasks.
                with _environment(_worker_env()):
                    ray.init(num_cpus=self.num_cpus, **options)
            else:
                ray.init(address=self.address, runtime_env={"env_vars": _worker_env()}, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise PipelineError(f"could not start or join {where}: {atomic.one_line(error)[:200]} (check "
                                "--ray-address, or `ray status` on the head node)") from None
        self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()  # a local instance stops with its processes; a joined cluster keeps running
            self.started = False

    @property
    def resources(self) -> dict[str, float]:
        import ray

        self.start()
        return ray.cluster_resources()

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def nodes(self) -> int:
        import ray

        self.start()
        return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_address(address: str, timeout: float = 5.0) -> None:
    """`auto`, or HOST:PORT of a head node that answers: Ray itself retries an address that
    does not answer for minutes, so it is tried here first."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"--ray-address {address!r}: use auto or HOST:PORT of the head node (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as connection:
            speaks_grpc = _answers_http2(connection)
    except OSError as error:
        raise PipelineError(f"no Ray cluster answers at {address} ({error.strerror or error}): start one with "
                            "`ray start --head` on the head node, or fix --ray-address") from None
    if not speaks_grpc:
        raise PipelineError(f"something listens at {address}, but it is not a Ray head node (it does not speak "
                            "gRPC): fix --ray-address (the head's GCS port, 6379 by default)")


# HTTP/2's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with a
# SETTINGS frame of its own at once; anything else answers otherwise, or not at all.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4


def _answers_http2(connection: socket.socket) -> bool:
    connection.sendall(_HTTP2_PREFACE)
    header = b""
    try:
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except TimeoutError:
        return False
    return header[3] == _SETTINGS_FRAME


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- what an actor needs to build the backbone ----------------------------------------------------


def weights_checksum(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over the shapes, types and bytes of a backbone's weights, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.name}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())  # bfloat16 has no buffer protocol
    return digest.hexdigest()


@dataclass(frozen=True)
class BackboneRecipe:
    """Everything an actor builds its feature extractor from; the weights travel beside it."""

    backbone: str
    image_size: int
    precision: str
    layers: tuple[str, ...]
    pooling: str
    preprocessing: str
    batch_size: int
    weights_checksum: str


def check_cache_reachable(directory: Path) -> None:
    """On a worker: the cache directory must be there and writable (a shared file system)."""
    try:
        if not directory.is_dir():
            raise FileNotFoundError(2, "no such folder on this node", str(directory))
        atomic.probe_writable(directory)
    except OSError as error:
        reason = error.strerror or atomic.one_line(error)
        raise PipelineError(
            f"a Ray worker on {socket.gethostname()} cannot write to the cache {directory} ({reason}): the cache "
            "must be on storage every node sees (a shared file system): use --cache on such storage"
        ) from None


# --- the two stages, run on workers ---------------------------------------------------------------


class AttemptCounter:
    """A small Ray actor owned by the driver: how many times each unit was started per stage and
    how many backbone actors were started, so that the summary can say how many units Ray
    retried and how many actors it replaced."""

    def __init__(self) -> None:
        self.started: Counter[tuple[str, str]] = Counter()
        self.actors = 0

    def start(self, stage: str, key: str) -> None:
        self.started[(stage, key)] += 1

    def actor_started(self) -> None:
        self.actors += 1

    def retried(self) -> tuple[int, int]:
        """(units started more than once, backbone actors started)."""
        return len({key for (_, key), count in self.started.items() if count > 1}), self.actors


def unit_rows(units: Sequence[Sequence[ImageRecord]], writer: ShardWriter) -> list[dict[str, str]]:
    """The driver's description of each unit: its key and its records, as Ray Data rows."""
    rows = []
    for unit in units:
        description = unit_description(unit)
        rows.append({"key": unit_key(description, writer.fingerprint, writer.class_names), "records": description})
    return rows


def _records_of(unit: dict[str, Any]) -> list[ImageRecord]:
    return [ImageRecord(*fields) for fields in json.loads(unit["records"])]


def _one_thread_for_tensorflow() -> None:
    """A decode task holds one CPU (num_cpus=1): its TensorFlow gets one thread, instead of a pool
    the size of the machine competing with the backbone actor's."""
    import tensorflow as tf

    try:
        if tf.config.threading.get_intra_op_parallelism_threads() != 1:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # this worker process already ran TensorFlow: its pools are fixed


def decode_unit(unit: dict[str, Any], root: str, image_size: int, max_pixels: int, attempts: Any) -> dict[str, Any]:
    """Stage one, a CPU task: read, hash and decode every image of a unit from one read each."""
    from pipeline.images.reading import read_and_decode

    _one_thread_for_tensorflow()
    attempts.start.remote("decode", unit["key"])
    reads = [read_and_decode(Path(root) / record.path, image_size, max_pixels) for record in _records_of(unit)]
    decoded = [i for i, read in enumerate(reads) if read.pixels is not None]
    pixels = [reads[i].pixels for i in decoded]
    images = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.float32)
    outcome = [{"sha256": r.sha256 or "", "size": r.size, "mtime_ns": r.mtime_ns, "skipped": r.skipped,
                "held_back": r.held_back} for r in reads]
    return {"key": unit["key"], "records": unit["records"], "decoded": json.dumps(decoded),
            "outcome": json.dumps(outcome), "images": images}


class BackboneActor:
    """Stage two, one per GPU (or node): the backbone, built once from shipped weights; every unit
    it receives is run in batches and written as the unit's shard."""

    def __init__(self, recipe: BackboneRecipe, weights: list[Any], writer: ShardWriter, attempts: Any) -> None:
        started = time.perf_counter()
        import ray

        from pipeline.backbone.network import FeatureExtractor, build_backbone
        from pipeline.backbone.registry import get_backbone

        check_cache_reachable(writer.directory)
        arrays = ray.get(weights[0])
        if weights_checksum(arrays) != recipe.weights_checksum:
            raise PipelineError("the backbone weights a Ray worker received do not match their checksum: rerun")
        spec = get_backbone(recipe.backbone)
        backbone = build_backbone(spec, recipe.image_size, recipe.precision, arrays=arrays)
        self.extractor = FeatureExtractor(backbone, recipe.layers, recipe.pooling)
        self.recipe = recipe
        self.writer = writer
        self.attempts = attempts
        self.node = ray.get_runtime_context().get_node_id()
        attempts.actor_started.remote()
        self.build_seconds = time.perf_counter() - started  # reported with the first unit only

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from pipeline.backbone.network import preprocess

        keys, nodes, counts, outcomes, seconds, began = [], [], [], [], [], []
        # fault-injection for the tests that kill actors and drivers mid-run: a pause before each
        # unit, so that on a loaded machine the run cannot end before the kill (unset: none)
        pause = float(os.environ.get("PIPELINE_RAY_UNIT_PAUSE_S", "0") or 0)
        for i, key in enumerate(batch["key"]):
            if pause > 0:
                time.sleep(pause)
            started = time.perf_counter()
            began.append(time.time())
            self.attempts.start.remote("backbone", key)
            records = _records_of({"records": batch["records"][i]})
            decoded = json.loads(batch["decoded"][i])
            outcome = json.loads(batch["outcome"][i])
            images = np.asarray(batch["images"][i], dtype=np.float32).reshape(
                (len(decoded), self.recipe.image_size, self.recipe.image_size, 3))
            parts: dict[str, list[np.ndarray]] = {name: [] for name in self.recipe.layers}
            for start in range(0, len(decoded), self.recipe.batch_size):
                chunk = preprocess(images[start:start + self.recipe.batch_size], self.recipe.preprocessing)
                for name, values in self.extractor(chunk).items():
                    parts[name].append(values)
            if decoded:
                rows = [_as_read(records[j], outcome[j]["sha256"]) for j in decoded]
                self.writer.write(rows, {name: np.concatenate(values) for name, values in parts.items()}, unit=key)
            keys.append(key)
            nodes.append(self.node)
            counts.append(len(decoded))
            outcomes.append(batch["outcome"][i])
            seconds.append(time.perf_counter() - started)
        build = [self.build_seconds] + [0.0] * (len(keys) - 1)
        self.build_seconds = 0.0
        return {"key": keys, "node": nodes, "images": counts, "outcome": outcomes, "seconds": seconds,
                "batches": [-(-n // self.recipe.batch_size) for n in counts], "build_seconds": build, "began": began}


def _as_read(record: ImageRecord, digest: str) -> ImageRecord:
    """The record with the hash of the bytes its features came from."""
    return ImageRecord(record.path, record.label, record.split, digest, record.size, record.mtime_ns)


# --- the driver -----------------------------------------------------------------------------------


def _root_cause(error: BaseException) -> BaseException:
    """The PipelineError inside Ray's wrappers (task, actor and Ray Data errors), if any."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PipelineError):
            return current
        stack += [e for e in (current.__cause__, current.__context__, getattr(current, "cause", None))
                  if isinstance(e, BaseException)]
    return error


def _pipeline_message(error: BaseException) -> str | None:
    """The message of a PipelineError raised on a worker, found in Ray's wrapping of it."""
    cause = _root_cause(error)
    if isinstance(cause, PipelineError):
        return atomic.one_line(cause.args[0] if cause.args else cause)
    text = str(error)
    if "PipelineError: " in text:  # actor creation errors reach the driver as text
        return atomic.one_line(text.split("PipelineError: ", 1)[1].split("\n")[0])
    return None


@dataclass
class RayEngine:
    """Turns "these images" into "these shards" on a Ray cluster (see the module's docstring)."""

    weights: Callable[[], list[np.ndarray]]  # the backbone's weights, built on the driver on first use
    recipe: Callable[[str], BackboneRecipe]  # given the weights' checksum
    image_size: int
    shard_size: int  # images per unit (one shard)
    max_pixels: int
    workers: int | None = None  # backbone actors (default: one per GPU, else one per node)
    strict: bool = False
    progress: bool = True
    cluster: RayCluster | None = None  # the command's instance: started here, when there is work for it

    def actor_options(self, cluster: RayCluster) -> tuple[int, dict[str, Any]]:
        """How many backbone actors, and what each holds. Each holds a CPU, and the decode tasks need
        at least one CPU besides: asking for as many actors as the cluster has CPUs (or GPUs) would
        leave the decode tasks waiting for ever, so it is refused."""
        gpus = cluster.gpus
        cpus = int(cluster.resources.get("CPU", 0))
        workers = self.workers or gpus or cluster.nodes
        most = min(gpus, cpus - 1) if gpus else cpus - 1
        if workers > most:
            held = f"{gpus} GPU(s) and {cpus} CPU(s)" if gpus else f"{cpus} CPU(s)"
            each = "a GPU and a CPU" if gpus else "a CPU"
            advice = f"use at most {most}" if most >= 1 else "too small a cluster for --engine ray: use --engine local"
            raise PipelineError(f"--workers {workers}: the Ray cluster has {held}; each backbone worker holds {each} "
                                f"and decoding needs at least one CPU more: {advice}")
        if gpus:
            return workers, {"num_gpus": 1, "num_cpus": 1}
        return workers, {"num_cpus": 1, "scheduling_strategy": "SPREAD"}

    def run(self, records: Sequence[ImageRecord], root: Path, writer: ShardWriter) -> EngineResult:
        """Pass `records` (images under `root`) through the backbone into new shards, one per unit."""
        result = EngineResult()
        if not records:
            return result
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows one bar of its own
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        arrays = self.weights()
        recipe = self.recipe(weights_checksum(arrays))
        units = cut_units(records, self.shard_size)
        rows = unit_rows(units, writer)
        cluster = (self.cluster or RayCluster()).start()
        workers, actor_options = self.actor_options(cluster)
        attempts = ray.remote(AttemptCounter).options(num_cpus=0).remote()
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # these remote options have no named parameter
            # Decoding runs in CPU tasks of its own, retried when their worker dies. Their remote
            # options differ from the actors', which also keeps Ray Data from fusing the two stages
            # (a GPU actor's process would then decode too).
            dataset = dataset.map(decode_unit, num_cpus=1, max_retries=-1, fn_kwargs=dict(
                root=str(Path(root).resolve()), image_size=self.image_size, max_pixels=self.max_pixels,
                attempts=attempts))
            dataset = dataset.map_batches(
                BackboneActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), zero_copy_batch=True,
                fn_constructor_args=(recipe, [ray.put(arrays)], writer, attempts), **actor_options)
        unit_of = {row["key"]: unit for row, unit in zip(rows, units)}
        started, started_wall = time.perf_counter(), time.time()
        first_unit = float("inf")
        busy = 0.0
        nodes: Counter[str] = Counter()
        try:
            with tqdm(total=len(records), unit="img", desc=f"extract (ray, {workers} workers)",
                      disable=not self.progress, dynamic_ncols=True) as bar:
                for row in dataset.iter_rows():
                    first_unit = min(first_unit, float(row["began"]))
                    unit = unit_of[row["key"]]
                    busy += float(row["seconds"])
                    result.actor_build_seconds = max(result.actor_build_seconds, float(row["build_seconds"]))
                    nodes[str(row["node"])] += 1
                    result.batches += int(row["batches"])
                    result.images += int(row["images"])
                    for record, item in zip(unit, json.loads(row["outcome"])):
                        if item["sha256"]:
                            result.hashed.append((record.path, item["size"], item["mtime_ns"], item["sha256"]))
                        if item["held_back"]:
                            result.held_back.append(item["held_back"])
                        elif item["skipped"]:
                            result.failures.append({"path": record.path, "sha256": item["sha256"],
                                                    "reason": item["skipped"]})
                    if self.strict and result.failures:
                        first = result.failures[0]
                        raise strict_error(root / first["path"], first["reason"], result.images)
                    bar.update(len(unit))
        except PipelineError:
            raise
        except Exception as error:  # Ray's wrappers around a worker's failure
            message = _pipeline_message(error)
            if message is None:
                raise PipelineError(f"the Ray engine failed: {atomic.one_line(error)[:300]}; finished shards are "
                                    "kept: rerun the same command to resume") from error
            raise PipelineError(message) from None
        result.loop_seconds = time.perf_counter() - started
        result.warmup_seconds = max(0.0, min(first_unit - started_wall, result.loop_seconds))
        result.input_wait_seconds = max(0.0, result.loop_seconds - busy / max(workers, 1))
        result.retried_units, actors = ray.get(attempts.retried.remote())
        result.restarted_actors = max(0, actors - workers)  # a dead actor's queued units went to its replacement
        result.nodes = dict(nodes)
        return result
