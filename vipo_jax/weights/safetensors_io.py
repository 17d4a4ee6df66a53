"""Torch-free safetensors reading and writing.

The reader memory-maps the file and returns numpy views, so a 24 GB checkpoint costs no RAM until
a tensor is actually used; bfloat16 comes back as ``ml_dtypes.bfloat16``. Sharded checkpoints
(``*.safetensors.index.json``) are opened as one mapping. The writer streams tensor by tensor (the
exporters hand it lazy mappings whose tensors are built when read).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from vipo_jax.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _check_entry(path: Path, name: str, e: object) -> None:
    """One header entry: a known dtype, a shape of sizes >= 0 and a byte range that holds exactly that
    many elements, so a corrupt header fails here, naming the tensor, not as a numpy error on first use."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: the header entry is not an object; the file is corrupt, re-download it")
    if "dtype" not in e or e["dtype"] not in _DTYPES:
        got = f"dtype {e['dtype']!r} is not supported" if "dtype" in e else "has no dtype"
        raise CheckpointError(f"{where} {got} (known: {', '.join(_DTYPES)}); the file is corrupt or not safetensors")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes >= 0; the file is corrupt")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a [start, end] byte range; the file is "
                              "corrupt")
    want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
    if offsets[1] - offsets[0] != want:
        raise CheckpointError(f"{where}: shape {shape} of {e['dtype']} needs {want} bytes but its byte range "
                              f"{offsets} holds {offsets[1] - offsets[0]}; the file is corrupt, re-download it")


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping from tensor name to a memory-mapped numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file not found: {self.path}")
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{self.path} is truncated ({size} bytes): not a safetensors file")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(
                    f"{self.path} is truncated or corrupt: header claims {header_len} bytes, "
                    f"file has {size}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object; re-download the file")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, e in header.items():
            _check_entry(self.path, name, e)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path} is truncated: tensors need {self._data_start + end} bytes, "
                f"the file has {size}. Re-download it."
            )
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if end else None

    def __getitem__(self, name: str) -> np.ndarray:
        e = self._entries[name]
        dtype = _DTYPES[e["dtype"]]
        start, stop = e["data_offsets"]
        if stop == start:
            return np.zeros(e["shape"], dtype)
        raw = self._mmap[self._data_start + start : self._data_start + stop]
        return raw.view(dtype).reshape(e["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """Several safetensors files behind one mapping (an ``*.index.json`` or an explicit list)."""

    def __init__(self, files: list[SafetensorsFile]):
        self.files = files
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f:
                self._where[k] = f

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_index(index_path: str | os.PathLike) -> ShardedSafetensors:
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"unreadable shard index {index_path}: {e}") from e
    names = sorted(set(weight_map.values()))
    files = [SafetensorsFile(index_path.parent / n) for n in names]
    sharded = ShardedSafetensors(files)
    missing = sorted(set(weight_map) - set(sharded))
    if missing:
        raise CheckpointError(f"{index_path} lists tensors absent from its shards: {missing[:5]}")
    return sharded


def open_checkpoint(path: str | os.PathLike, stem: str | None = None) -> Mapping[str, np.ndarray]:
    """Open a ``.safetensors`` file, an ``.index.json``, or a folder holding one of them.

    In a folder, ``stem`` (e.g. ``"diffusion_pytorch_model"``, ``"model"``) picks the file; without
    it the folder must hold exactly one checkpoint.
    """
    path = Path(path)
    if path.is_file():
        return open_index(path) if path.name.endswith(".index.json") else SafetensorsFile(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    stems = [stem] if stem else None
    candidates = []
    for p in sorted(path.iterdir()):
        name = p.name
        if name.endswith(".safetensors.index.json"):
            s = name[: -len(".safetensors.index.json")]
        elif name.endswith(".safetensors") and "-of-" not in name:
            s = name[: -len(".safetensors")]
        else:
            continue
        if stems is None or s in stems:
            candidates.append(p)
    if not candidates:
        want = f"{stem}.safetensors" if stem else "*.safetensors"
        raise CheckpointError(f"no {want} (or its .index.json) in {path}")
    index = [p for p in candidates if p.name.endswith(".index.json")]
    if index:
        return open_index(index[0])
    if len(candidates) > 1:
        raise CheckpointError(f"several checkpoints in {path}: {[p.name for p in candidates]}")
    return SafetensorsFile(candidates[0])


def tensor_dtype(tensors: Mapping[str, np.ndarray], key: str) -> np.dtype:
    """A tensor's dtype without building or moving it where the mapping can say (``.dtype(key)``)."""
    if hasattr(tensors, "dtype"):
        return np.dtype(tensors.dtype(key))
    a = tensors[key]
    return np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype


def tensor_shape(tensors: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    """A tensor's shape, from ``.shape(key)`` where the mapping has it (without building it)."""
    return tuple(tensors.shape(key)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[key]))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                      keys: list[str] | None = None, dtypes: Mapping[str, np.dtype] | None = None,
                      metadata: Mapping[str, str] | None = None, write: bool | None = None) -> int:
    """Stream ``tensors`` (``keys`` of them, in that order; default all) into one safetensors file,
    each cast to ``dtypes[key]`` (default: its own dtype), so that only one tensor at a time is on
    the host. The header comes from the shapes (a mapping with ``.shape(key)`` / ``.dtype(key)``,
    such as the exporters' lazy ones, is not read for it); then each tensor is read, cast, written
    and dropped. Written to ``path.tmp`` and renamed: a crash leaves no half file. ``write``: whether
    this process writes; default only process 0 (every process must still call it, since reading a
    tensor may gather it collectively). Returns the number of data bytes."""
    path = Path(path)
    keys = list(tensors) if keys is None else list(keys)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    plan = []
    for key in keys:
        shape = tensor_shape(tensors, key)
        dtype = np.dtype(dtypes[key]) if dtypes is not None else tensor_dtype(tensors, key)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot save tensor {key!r} as {dtype}")
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        plan.append((key, shape, dtype))
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    if write is None:
        import jax

        write = jax.process_index() == 0
    tmp = path.with_name(path.name + ".tmp")
    f = open(tmp, "wb") if write else None
    try:
        if f is not None:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
        for key, shape, dtype in plan:
            a = np.asarray(tensors[key])
            if a.shape != shape:
                raise CheckpointError(f"tensor {key!r} has shape {a.shape}, announced {shape}")
            a = np.asarray(a, dtype=dtype, order="C")  # one copy at most (layout and cast together)
            if f is not None:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
            del a
        if f is not None:
            f.close()
            f = None
            os.replace(tmp, path)
    finally:
        if f is not None:
            f.close()
            tmp.unlink(missing_ok=True)
    return offset


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors (numpy or ml_dtypes arrays), keys sorted, atomically; written by the calling
    process whatever its index (:func:`write_safetensors` with ``write=True``)."""
    write_safetensors(path, tensors, keys=sorted(tensors), metadata=metadata, write=True)
