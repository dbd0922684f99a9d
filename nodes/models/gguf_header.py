"""What a GGUF file's header says, read quickly: its metadata values and each tensor's element count.

A node reads a GGUF's header at every start (the model's cache shape and its size in fp32 decide the memory budget).
The `gguf` package's reader builds a numpy view for every part of every field (SmolLM2's tokenizer alone has ~100,000
strings): about 1.3 s per read here, read three times per start. This reader walks the header once with
`struct.unpack_from` over the bytes it needs, skips arrays it is not asked for, and keeps its answer per file (by
path, size and modification time) for the life of the process: ~50 ms.

Format (GGUF v2 and v3, little-endian): magic, version, tensor count, metadata count; each metadata entry a key, a
value type and a value (arrays: element type, count, elements); then each tensor's name, dimensions, type, offset.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"GGUF"
# value type -> struct format of one scalar (8: string, 9: array are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_READ = 1 << 20  # the header is read in pieces of this many bytes, as far as it goes


class GGUFHeaderError(ValueError):
    """Not a GGUF file this reader understands (a truncated one, another format, a header that claims more than the
    file holds, or value types it does not know)."""


MAX_STRING = 16 * 1024 * 1024  # bytes of one string in a header (a chat template is ~10 KiB)
MAX_ENTRIES = 1 << 20  # metadata entries, and tensors, a header may claim
MAX_DIMS = 4  # dimensions of a tensor (llama.cpp's GGML_MAX_DIMS)
KEEP_ARRAY = 4096  # numeric arrays up to this many values are kept (per-layer head counts); longer ones skipped


@dataclass(frozen=True)
class GGUFHeader:
    values: dict[str, Any]  # scalars, strings, and numeric arrays of up to KEEP_ARRAY values (as lists)
    array_lengths: dict[str, int]  # every array's length
    tensor_elements: dict[str, int]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at `path` (kept per file identity, size and modification time). GGUFHeaderError if it
    is not one; OSError if it cannot be read."""
    stat = path.stat()
    return _read(str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> GGUFHeader:
    del dev, ino, mtime_ns  # part of the key only: a file changed or replaced on disk is read again
    with open(path, "rb") as f:
        return _Walker(f, size).header()


class _Walker:
    """Reads forward through the header; every length is checked against what the file holds before it is used."""

    def __init__(self, f: Any, size: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.pos = 0  # in buf
        self.offset = 0  # of buf[0] in the file

    def _need(self, n: int) -> None:
        if self.offset + self.pos + n > self.size:
            raise GGUFHeaderError("the file ends inside its header")
        if self.pos + n <= len(self.buf):
            return
        rest = self.buf[self.pos :]
        self.offset += self.pos
        self.buf = rest + self.f.read(max(n - len(rest), _READ))
        self.pos = 0
        if len(self.buf) < n:
            raise GGUFHeaderError("the file ends inside its header")

    def _skip(self, n: int) -> None:
        if self.offset + self.pos + n > self.size:
            raise GGUFHeaderError("the file ends inside its header")
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        self.f.seek(self.offset + self.pos + n)
        self.offset, self.buf, self.pos = self.offset + self.pos + n, b"", 0

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if n > MAX_STRING:
            raise GGUFHeaderError(f"a string of {n} bytes in the header")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _count(self, what: str) -> int:
        n = self._unpack("<Q")
        if n > MAX_ENTRIES:
            raise GGUFHeaderError(f"the header claims {n} {what}")
        return int(n)

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFHeaderError(f"unknown metadata value type {kind}")
        return self._unpack(fmt)

    def header(self) -> GGUFHeader:
        self._need(4)
        if self.buf[:4] != _MAGIC:
            raise GGUFHeaderError("not a GGUF file (no GGUF magic)")
        self.pos = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise GGUFHeaderError(f"GGUF version {version} (this reader knows 2 and 3)")
        tensors, entries = self._count("tensors"), self._count("metadata entries")
        values: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(entries):
            key = self._string()
            kind = self._unpack("<I")
            if kind != _ARRAY:
                values[key] = self._value(kind)
                continue
            item, count = self._unpack("<I"), self._unpack("<Q")
            lengths[key] = count
            if item == _STRING:
                if count > MAX_ENTRIES:
                    raise GGUFHeaderError(f"an array of {count} strings in {key}")
                for _ in range(count):
                    n = self._unpack("<Q")
                    if n > MAX_STRING:
                        raise GGUFHeaderError(f"a string of {n} bytes in {key}")
                    self._skip(n)
            elif item in _SCALARS:
                width = struct.calcsize(_SCALARS[item])
                if count <= KEEP_ARRAY:
                    values[key] = [self._unpack(_SCALARS[item]) for _ in range(count)]
                else:
                    self._skip(width * count)  # checked against the file's size first
            else:
                raise GGUFHeaderError(f"an array of value type {item} in {key}")
        elements: dict[str, int] = {}
        for _ in range(tensors):
            name = self._string()
            dims = self._unpack("<I")
            if dims > MAX_DIMS:
                raise GGUFHeaderError(f"tensor {name} has {dims} dimensions")
            count = 1
            for _ in range(dims):
                count *= self._unpack("<Q")
            self._unpack("<I")  # the tensor's type
            self._unpack("<Q")  # its offset in the data section
            elements[name] = count
        return GGUFHeader(values, lengths, elements)
