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


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    """A tensor as a reference into its storage. Offsets, shapes and strides must be whole
    numbers (a shape of 2.5 is damage, not 2), strides positive, as torch.save writes them."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    if not (_whole(offset) and isinstance(shape, tuple | list) and isinstance(stride, tuple | list)
            and len(shape) == len(stride) and all(_whole(n) and n >= 0 for n in shape)
            and all(_whole(s) for s in stride)):
        raise pickle.UnpicklingError("a tensor with a malformed offset, shape or stride")
    if any(s <= 0 for n, s in zip(shape, stride) if n > 1):
        raise pickle.UnpicklingError("a tensor with a zero or negative stride (torch.save writes none)")
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


def _plain_key(key: Any) -> Any:
    """Dictionary keys of a state dict are names (or numbers). Anything else is refused before it
    is hashed: a tuple built of memo references can be tiny in the file and take forever to hash."""
    if not isinstance(key, str | int):
        raise pickle.UnpicklingError(f"a dictionary key that is a {type(key).__name__}, not a name")
    return key


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args:  # torch.save writes OrderedDict() and fills it with SETITEMS
        raise pickle.UnpicklingError("an OrderedDict built from arguments")
    return collections.OrderedDict()


class _StateDictOnly(pickle._Unpickler):  # the Python unpickler: its dictionary opcodes can check keys
    """Allows exactly what a state dict of tensors needs; refuses every other global, dictionary keys
    that are not names, and sets."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = _plain_key(self.stack.pop())
        self.stack[-1][key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[_plain_key(items[i])] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()
        self.append({_plain_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def load_refused(self) -> None:
        raise pickle.UnpicklingError("a set (a state dict holds none)")

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    for _opcode in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_opcode[0]] = load_refused

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # Nothing of the reference is printed or turned into text: a structure built from memo
        # references can be tiny in the file and astronomically large as text.
        if not (isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[0], str) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _whole(pid[4])
                and pid[4] >= 0):
            raise pickle.UnpicklingError(f"an unexpected persistent reference (a {type(pid).__name__})")
        return _StorageRef(pid[2], _STORAGE_DTYPES[pid[1].name], pid[4])


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
        if not all(isinstance(name, str) for name in tree) or not all(isinstance(key, str) for key in keys):
            raise pickle.UnpicklingError("a state dict whose names or storage keys are not text")
        storages = _read_storages(stream, keys, tree)
        return {name: _materialise(ref, storages) for name, ref in tree.items()}
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, struct.error, AttributeError,
            IndexError) as error:
        raise PipelineError(f"{path} is not a readable, safe PyTorch state dict: {str(error)[:200]}") from None
    except RecursionError:
        raise PipelineError(f"{path} is not a readable, safe PyTorch state dict: it is nested too deeply") from None
    except MemoryError:
        raise PipelineError(f"{path} is not a readable, safe PyTorch state dict: reading it ran out of "
                            "memory") from None


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
    elements = int(np.prod(ref.shape, dtype=np.float64))
    end = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
    if ref.offset < 0 or end > len(flat) or elements > len(flat) - ref.offset:
        raise ValueError(f"a tensor of shape {ref.shape} reaches outside its storage of {len(flat)} values")
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape,
                                           tuple(s * flat.itemsize for s in ref.stride), writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="))
