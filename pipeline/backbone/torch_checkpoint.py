"""PyTorch's legacy `torch.save` checkpoints (a state dict of tensors), read without torch and
without running anything from the file.

The legacy format is five things one after another: a magic-number pickle, a protocol-version
pickle, a system-info pickle, the state dict's pickle (tensors as references to storages), the
list of storage keys, then each storage's raw little-endian data, prefixed by its element count.
The unpickler here allows an OrderedDict, the tensor-rebuild function (replaced by our own, which
only records offsets and strides) and the storage type names (markers); any other global, a
pickle crafted to run code included, is refused before it can be called."""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "ByteStorage": np.uint8,
    "CharStorage": np.int8, "BoolStorage": np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: Any
    count: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    try:
        return _TensorRef(storage, int(offset), tuple(int(s) for s in shape), tuple(int(s) for s in stride))
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("a tensor with a malformed shape or stride") from None


class _StateDictOnly(pickle.Unpickler):
    """Allows exactly what a state dict of tensors needs; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent reference {str(pid)[:80]}")
        return _StorageRef(str(pid[2]), _STORAGE_DTYPES[pid[1].name], pid[4])


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """{name: array} of a legacy torch.save state dict; one line for a damaged, foreign or unsafe file."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    try:
        magic = _StateDictOnly(stream).load()
        if magic != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a legacy torch.save file (no magic number)")
        _StateDictOnly(stream).load()  # protocol version
        _StateDictOnly(stream).load()  # system info (endianness, type sizes)
        tree = _StateDictOnly(stream).load()
        keys = _StateDictOnly(stream).load()
        if not isinstance(tree, dict) or not isinstance(keys, list):
            raise pickle.UnpicklingError("no state dict")
        storages = _read_storages(stream, keys, tree)
        return {str(name): _materialise(ref, storages) for name, ref in tree.items()}
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, struct.error, AttributeError,
            IndexError) as error:
        raise PipelineError(f"{path} is not a readable, safe PyTorch state dict: {error}") from None


def _read_storages(stream: io.BytesIO, keys: list[Any], tree: dict[Any, Any]) -> dict[str, np.ndarray]:
    refs = {ref.storage.key: ref.storage for ref in tree.values() if isinstance(ref, _TensorRef)}
    storages = {}
    for key in keys:
        ref = refs.get(str(key))
        if ref is None:
            raise ValueError(f"storage {key} belongs to no tensor")
        (count,) = struct.unpack("<q", stream.read(8))
        itemsize = np.dtype(ref.dtype).itemsize
        if count != ref.count or count < 0:
            raise ValueError(f"storage {key} holds {count} values where {ref.count} were announced")
        raw = stream.read(count * itemsize)
        if len(raw) != count * itemsize:
            raise ValueError(f"storage {key} is cut short (file truncated?)")
        storages[ref.key] = np.frombuffer(raw, dtype=np.dtype(ref.dtype).newbyteorder("<"))
    if stream.read(1):
        raise ValueError("bytes after the last storage")
    return storages


def _materialise(ref: Any, storages: dict[str, np.ndarray]) -> np.ndarray:
    if not isinstance(ref, _TensorRef):
        raise ValueError("a state dict entry that is not a tensor")
    flat = storages[ref.storage.key]
    if not ref.shape:
        return flat[ref.offset:ref.offset + 1].reshape(()).copy()
    end = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
    if ref.offset < 0 or end > len(flat) or any(s < 0 for s in ref.stride):
        raise ValueError("a tensor reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape,
                                           tuple(s * flat.itemsize for s in ref.stride), writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="))
