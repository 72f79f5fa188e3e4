"""The Keras side of training, shared by the dense head and fine-tuning:

- `StreamedExamples`: the one definition of "(x, y) batches of a fixed size, read a chunk at a
  time (a shard, a block of rows), in a new order every epoch", as a keras.utils.PyDataset, so
  that it runs on any Keras backend and Keras knows an epoch's length (the dense head on streamed
  features, `finetune --cached` on cached activations);
- `KeepBest`: end a fit with the weights of its best epoch by validation accuracy;
- `training_callbacks`: the one set of callbacks both trainings use (KeepBest, early stopping on
  validation accuracy, the rate halved on a validation-loss plateau);
- `fit_verbosity`: Keras' progress output (a bar on a terminal, a line per epoch elsewhere);
- `history_rows`: a fit's History as one row per epoch, for the run's history.csv and config;
- `EpochTimer` and `epoch_estimate`: what an epoch took, and what one will take, said before it runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np

from pipeline.errors import PipelineError

Chunks = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]


class StreamedExamples(keras.utils.PyDataset):
    """`chunks(pass_number)` yields (x, y) arrays in the order of one pass over the data; they are
    cut and joined into batches of `batch_size` (the last one shorter), `transform` applied to
    each batch's x (augmentation). Keras reads batches in order, one worker: every pass starts at
    batch 0, which starts the next pass of `chunks` (a new order where the chunks shuffle)."""

    def __init__(self, chunks: Chunks, rows: int, batch_size: int,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.chunks, self.rows, self.batch_size, self.transform = chunks, rows, batch_size, transform
        self.passes = 0
        self.failure: Exception | None = None  # a PipelineError met while reading (Keras buries it in its own)
        self._batches: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self._next = 0

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __getitem__(self, index: int) -> tuple[Any, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        try:
            return self._batch(index)
        except PipelineError as error:
            self.failure = error
            raise

    def _batch(self, index: int) -> tuple[Any, np.ndarray]:
        if index == 0 or self._batches is None or index != self._next:
            self._batches = self._pass(self.passes)
            self.passes += 1
            for _ in range(index):  # only where a caller jumps: Keras reads in order
                next(self._batches)
        x, y = next(self._batches)
        self._next = index + 1
        return (x if self.transform is None else np.asarray(self.transform(x), np.float32)), y

    def __iter__(self) -> Iterator[tuple[Any, np.ndarray]]:
        for index in range(len(self)):
            yield self[index]

    def _pass(self, number: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        held = 0
        for x, y in self.chunks(number):
            pending_x.append(np.asarray(x, np.float32))
            pending_y.append(np.asarray(y, np.int32))
            held += len(y)
            while held >= self.batch_size:
                xs, ys = np.concatenate(pending_x), np.concatenate(pending_y)
                yield xs[:self.batch_size], ys[:self.batch_size]
                pending_x, pending_y = [xs[self.batch_size:]], [ys[self.batch_size:]]
                held -= self.batch_size
        if held:
            yield np.concatenate(pending_x), np.concatenate(pending_y)


class KeepBest(keras.callbacks.Callback):
    """Ends training with the weights of the epoch with the highest validation accuracy (ties:
    lower validation loss). Accuracy is what runs are reported and ranked by (`runs`, `best`);
    EarlyStopping's restore_best_weights keeps the lowest validation loss instead. Given the
    starting model's validation accuracy and loss (fine-tuning), that model counts as epoch 0:
    training can leave a model unchanged, never worse on validation."""

    def __init__(self, initial_accuracy: float | None = None, initial_loss: float | None = None) -> None:
        super().__init__()
        start = initial_accuracy is not None and initial_loss is not None
        self.best = (initial_accuracy, -initial_loss) if start else (-float("inf"), -float("inf"))
        self.best_epoch, self.best_weights = 0, None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.best_weights = self.model.get_weights()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if "val_accuracy" in logs and (logs["val_accuracy"], -logs["val_loss"]) > self.best:
            self.best = (float(logs["val_accuracy"]), -float(logs["val_loss"]))
            self.best_epoch, self.best_weights = epoch + 1, self.model.get_weights()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.model.set_weights(self.best_weights)


def training_callbacks(keep_best: KeepBest, patience: int, plateau: tuple[int, float] | None = None,
                       before_plateau: Sequence[Any] = ()) -> list[Any]:
    """The callbacks every Keras training here shares (the dense head's and fine-tuning's): the
    epoch of the best validation accuracy kept (`keep_best`, what the run reports), early stopping
    on validation accuracy after `patience` epochs without a gain, and with `plateau` (its patience
    and lowest rate) the rate halved when validation loss stalls, after `before_plateau` (callbacks
    that log the rate of the epoch that ended)."""
    found = [keep_best, keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience),
             *before_plateau]
    if plateau is not None:
        found.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=plateau[0],
                                                       min_lr=plateau[1]))
    return found


def fit(model: Any, train: Any, **options: Any) -> Any:
    """model.fit(train, **options), where a PipelineError met while reading the streamed examples
    (a cache rewritten meanwhile, a damaged shard) comes out as itself, one line, instead of
    buried in Keras' and TensorFlow's forty-line error."""
    sources = [train, options.get("validation_data")]
    try:
        return model.fit(train, **options)
    except Exception:
        for source in sources:
            failure = getattr(source, "failure", None)
            if failure is not None:
                raise failure from None
        raise


def fit_verbosity(progress: bool) -> int:
    """Keras' verbose: a progress bar on a terminal, one line per epoch in a log, nothing when off."""
    return (1 if sys.stdout.isatty() else 2) if progress else 0


def history_rows(history: Any) -> list[dict[str, float]]:
    """A fit's History as rows: {"epoch": 1, "loss": ..., "val_loss": ..., ...} per epoch."""
    epochs = len(history.history.get("loss", []))
    return [{"epoch": i + 1} | {key: float(values[i]) for key, values in history.history.items()}
            for i in range(epochs)]


class RateLogger(keras.callbacks.Callback):
    """Puts the optimizer's current learning rate into every epoch's logs (a schedule's, too)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and "learning_rate" not in logs:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class EpochTimer(keras.callbacks.Callback):
    """Seconds of every epoch (training and validation), the first one holding the tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._started)

    @property
    def steady(self) -> float | None:
        """Seconds per epoch once traced: the mean after the first epoch (the first alone if one ran)."""
        later = self.seconds[1:] or self.seconds
        return sum(later) / len(later) if later else None


# A training image costs about 1.5 scoring passes: the backward pass runs through the unfrozen top
# block only. Measured on ELPV (VGG16 150 px, block5, 2-core Xeon): with 3 the estimate said 13 min
# for an epoch that took 406 s (the scoring pass it is timed on also holds the first call's tracing).
TRAINING_COST = 1.5


def epoch_estimate(seconds_per_image: float, train: int, validation: int, epochs: int) -> str:
    """What one epoch will take, from the forward pass just timed on the test split."""
    seconds = seconds_per_image * (TRAINING_COST * train + validation)
    return (f"fine-tuning for up to {epochs} epoch(s) on {train} images: about {_duration(seconds)} an epoch on this "
            f"machine (estimated from scoring the test split), about {_duration(seconds * epochs)} in all")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
