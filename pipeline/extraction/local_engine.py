"""The local engine: turns "these images" into "these shards" in this process, with a
prefetched tf.data pipeline decoding ahead of the backbone (on a GPU when TensorFlow sees one).

Each image's bytes are read once, hashed and decoded from that one read (pipeline/images/reading.py), so
a row records the hash of the bytes its features came from. Shards hold whole batches; rows are
written through the cache's ShardWriter as soon as a shard is full, so a killed run keeps every
finished shard. The first Ctrl-C stops after the batch in progress with its rows written.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.backbone.network import FeatureExtractor, preprocess
from pipeline.data.dataset import ImageRecord
from pipeline.errors import PipelineError
from pipeline.extraction.engine import EngineResult, strict_error
from pipeline.extraction.plan import ShardWriter
from pipeline.images.reading import EncodedImages


class _RowBuffer:
    """Backbone outputs waiting to fill a shard, with the record index of every row."""

    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.features: dict[str, list[np.ndarray]] = defaultdict(list)

    def __len__(self) -> int:
        return sum(len(part) for part in self.index)

    def add(self, index: np.ndarray, features: dict[str, np.ndarray]) -> None:
        self.index.append(index)
        for name, values in features.items():
            self.features[name].append(values)

    def take(self, count: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The first `count` rows, leaving the rest buffered."""
        index = np.concatenate(self.index)
        features = {name: np.concatenate(parts) for name, parts in self.features.items()}
        self.index = [index[count:]]
        self.features = defaultdict(list, {name: [values[count:]] for name, values in features.items()})
        return index[:count], {name: values[:count] for name, values in features.items()}


class _StopRequest:
    """The first Ctrl-C (SIGINT) asks the extraction to stop after the batch in progress, once its
    rows are safely in a shard; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        # on stderr, where progress goes: stdout may be a --json document being written
        print("\nstopping after the current batch (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class LocalEngine:
    extractor: Callable[[], FeatureExtractor]  # built on first use: a run with nothing new builds no backbone
    image_size: int
    preprocessing: str
    batch_size: int
    shard_size: int  # a multiple of batch_size
    max_pixels: int
    strict: bool = False
    progress: bool = True

    def run(self, records: Sequence[ImageRecord], root: Path, writer: ShardWriter) -> EngineResult:
        """Pass `records` (images under `root`) through the backbone into new shards."""
        result = EngineResult()
        if not records:
            return result
        extractor = self.extractor()
        source = EncodedImages([root / record.path for record in records], self.max_pixels)
        preprocessing = self.preprocessing
        batches = source.batches(self.image_size, self.batch_size, lambda x: preprocess(x, preprocessing))

        def as_read(index: int) -> ImageRecord:
            """The record with the hash of the bytes that were decoded."""
            digest = source.sha256.get(index, records[index].sha256)
            return records[index] if digest == records[index].sha256 else dataclasses.replace(records[index],
                                                                                              sha256=digest)

        buffer = _RowBuffer()
        decoded: set[int] = set()

        def write(count: int) -> None:
            index, features = buffer.take(count)
            writer.write([as_read(i) for i in index], features)

        def failed(index: int) -> PipelineError:
            reason = source.failure_reason(index, self.image_size)  # raises for what is not a damaged image
            return strict_error(root / records[index].path, reason, len(decoded))

        started = time.perf_counter()
        batches_before, images_before = extractor.batches, extractor.images
        expected = 0  # the next record index; batches arrive in record order, failures leave gaps
        # smoothing=0: the bar's rate is the loop's average (decode, backbone, shards), the figure
        # the summary prints as the extraction loop's, not a moving average of the last batches
        with tqdm(total=len(records), unit="img", desc="extract", disable=not self.progress,
                  dynamic_ncols=True, smoothing=0) as bar, _StopRequest() as stop:
            iterator = iter(batches)
            while True:
                waiting = time.perf_counter()
                try:
                    index, images = next(iterator)
                except StopIteration:
                    break
                result.input_wait_seconds += time.perf_counter() - waiting
                index = np.asarray(index)
                buffer.add(index, extractor(images))
                if not result.warmup_images:  # the first batch traces or compiles the backbone
                    result.warmup_seconds, result.warmup_images = time.perf_counter() - started, len(index)
                decoded.update(index.tolist())
                bar.update(len(index))
                first_gap = next((i for i in range(expected, int(index[-1]) + 1) if i not in decoded), None)
                expected = int(index[-1]) + 1
                if self.strict and first_gap is not None:
                    write(len(buffer))
                    raise failed(first_gap)
                while len(buffer) >= self.shard_size:
                    write(self.shard_size)
                if stop.requested:
                    if len(buffer):
                        write(len(buffer))
                    raise KeyboardInterrupt
            if len(buffer):
                write(len(buffer))
            if self.strict and expected < len(records):
                raise failed(expected)
            if len(decoded) < len(records):
                bar.set_postfix(skipped=len(records) - len(decoded))
                bar.update(len(records) - len(decoded))  # undecodable files end the bar too
        result.loop_seconds = time.perf_counter() - started
        result.batches, result.images = extractor.batches - batches_before, extractor.images - images_before
        result.changed = [records[i] for i, digest in source.sha256.items() if digest != records[i].sha256]
        for index in sorted(set(range(len(records))) - decoded):
            try:
                reason = source.failure_reason(index, self.image_size)
            except PipelineError as error:  # not a damaged image: not recorded, tried again next run
                result.held_back.append(str(error))
                continue
            result.failures.append({"path": records[index].path, "sha256": as_read(index).sha256, "reason": reason})
        return result
