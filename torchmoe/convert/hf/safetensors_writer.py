"""Writes a safetensors file tensor by tensor, as each is made, with no copy of the shard.

safetensors' own ``save_file`` wants every tensor of the file at once, each with storage of
its own: an export would hold a second copy of the shard (an expert stack's experts are views
of one tensor). The format is small and fixed (an 8-byte little-endian header length, a JSON
header of dtype, shape and byte offsets, then the raw bytes in header order), so each tensor
is written straight from its memory, and ``safetensors.safe_open`` reads the file back (tested).
"""

import json
import struct
from pathlib import Path

import torch

# safetensors' dtype names; the reader (io.py) takes them all, the writer the ones it meets
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # MX scales
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class SafetensorsWriter:
    """A safetensors file whose tensors are known up front by shape and dtype (``layout``, meta
    tensors will do) and written one by one, in that order, as they are made: a shard never
    has to be in memory at once."""

    def __init__(self, path: Path, layout: dict[str, torch.Tensor], metadata: dict) -> None:
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, t in layout.items():
            nbytes = t.numel() * t.element_size()
            header[name] = {
                "dtype": _NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data 8-byte aligned, as safetensors writes it
        self._pending = [(name, t.shape, t.dtype) for name, t in layout.items()]
        self._file = open(path, "wb")  # closed by close() or __exit__
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the layout (a copy only if it is strided)."""
        expected = self._pending.pop(0) if self._pending else None
        if expected != (name, tensor.shape, tensor.dtype):
            raise ValueError(f"wrote {name} {tensor.shape} {tensor.dtype}; expected {expected}")
        flat = tensor.detach().contiguous().reshape(-1)
        self._file.write(memoryview(flat.view(torch.uint8).numpy()))

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise ValueError(
                f"{len(self._pending)} tensors not written, {self._pending[0][0]} first"
            )

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()
