"""What an engine is: it turns "these images" into "these shards" of one cache, and reports what it
did. Two engines keep this contract: pipeline/extraction/local_engine.py (this process, tf.data) and
pipeline/extraction/ray_engine.py (Ray Data across processes, nodes and GPUs). The plan before them and the
manifest after them (pipeline/extraction/extract.py) do not depend on which one ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.data.dataset import ImageRecord
from pipeline.errors import PipelineError
from pipeline.extraction.plan import ShardWriter

ENGINES = ("local", "ray")  # local_engine.py and ray_engine.py


@dataclass
class EngineResult:
    """What an engine did with the images it was given."""

    failures: list[dict[str, str]] = field(default_factory=list)  # undecodable: path, sha256, reason
    held_back: list[str] = field(default_factory=list)  # neither extracted nor skipped: the error, per image
    changed: list[ImageRecord] = field(default_factory=list)  # bytes changed between the scan and the read
    loop_seconds: float = 0.0  # the extraction loop: decoding waits, backbone, shard writes
    input_wait_seconds: float = 0.0  # part of loop_seconds spent waiting for decoded images
    batches: int = 0  # backbone forward passes
    images: int = 0  # images in those passes
    hashed: list[tuple[str, int, int, str]] = field(default_factory=list)  # read by a worker: path, size, mtime, sha256
    retried_units: int = 0  # units of work that were started more than once (the Ray engine)
    restarted_actors: int = 0  # backbone actors Ray started again after one died (the Ray engine)
    nodes: dict[str, int] = field(default_factory=dict)  # units per node that wrote them (the Ray engine)
    # until the backbone was warm: Ray, until an actor began the first unit (start-up, imports, build,
    # decode); local, the first batch (waiting for it, tracing or compiling the backbone, running it)
    warmup_seconds: float = 0.0
    warmup_images: int = 0  # images done within warmup_seconds
    actor_build_seconds: float = 0.0  # Ray engine: the slowest actor's imports, weights and model build


def strict_error(path: Path, reason: str, kept: int | None = None) -> PipelineError:
    """--strict: the first image that cannot be decoded stops the run, naming it."""
    done = f"; the {kept} images extracted so far are kept" if kept is not None else ""
    return PipelineError(f"{path}: {reason} (--strict): fix or remove it and rerun{done}")



class Engine(Protocol):
    def run(self, records: Sequence[ImageRecord], root: Path, writer: ShardWriter) -> EngineResult:
        """Pass `records` (images under `root`) through the backbone into new shards written by `writer`."""
