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
}


class SafetensorsCheckpoint:
    """name -> memory-mapped numpy array, over every safetensors file of a checkpoint dir."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
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
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            self._entries[name] = (data, info)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        """A zero-copy view into the mapped file."""
        data, info = self._entries[name]
        start, end = info["data_offsets"]
        return data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])


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
