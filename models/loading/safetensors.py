"""Memory-mapped reading of safetensors files (single file or sharded index).

We parse the header ourselves and view the payload through `numpy.memmap` (bf16 through
ml_dtypes), so a tensor is paged in from disk only when it is copied to its device — the host
never holds a second full copy of the weights — and a device can later read just its slice.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,  # FP8 checkpoints (models.quantization.checkpoint_formats)
}


# The format's own bound on the header (safetensors rejects larger ones): a length beyond it
# means the first 8 bytes are not a safetensors length at all.
_MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A weight file (or its index) that is not what it claims to be: truncated, corrupt, or
    not safetensors. The message names the file."""


class SafetensorsCheckpoint:
    """name -> memory-mapped numpy array, over every safetensors file of a checkpoint dir."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(_weight_map(index).values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no weight files in {model_dir}: expected model.safetensors or "
                "model.safetensors.index.json with its shards"
            )
        self._entries: dict[str, tuple[np.memmap, dict]] = {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"weight file {path} named in the index is missing")
            self._read_header(path)

    def _read_header(self, path: Path) -> None:
        """Check the header against the file before mapping it: a truncated download would
        otherwise surface as a reshape error deep inside loading, or as a crash on first read."""
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for its header "
                                      "(truncated? download it again)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a safetensors file: its first 8 bytes give a header of {n} bytes")
            if 8 + n > size:
                raise CheckpointError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size} "
                                      "(download it again)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt or not a safetensors file: its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            _check_entry(path, name, info, 8 + n, size)
        if not header:
            return
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for name, info in header.items():
            self._entries[name] = (data, info)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[self._entries[name][1]["dtype"]])

    def __getitem__(self, name: str) -> np.ndarray:
        """A zero-copy view into the mapped file."""
        data, info = self._entries[name]
        start, end = info["data_offsets"]
        return data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index} has no weight_map (tensor name -> file)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


def _check_entry(path: Path, name: str, info, data_start: int, size: int) -> None:
    """One header entry: a known dtype, and data_offsets that match its shape and lie inside the file."""
    try:
        dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if not all(isinstance(v, int) for v in (*shape, start, end)) or not isinstance(dtype, str):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is corrupt: header entry {name!r} is not "
                              "{dtype, shape, data_offsets}") from None
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}; "
                              f"supported: {', '.join(_DTYPES)}")
    want = count * np.dtype(_DTYPES[dtype]).itemsize
    if not 0 <= start <= end or end - start != want:
        raise CheckpointError(f"{path} is corrupt: tensor {name} ({dtype}, shape {shape}) needs {want} bytes, "
                              f"its data_offsets [{start}, {end}] give {end - start}")
    if data_start + end > size:
        raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {data_start + end}, "
                              f"the file has {size} bytes (download it again)")


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (bf16 supported through ml_dtypes)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the payload 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
