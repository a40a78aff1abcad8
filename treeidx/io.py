"""The index file: named arrays plus JSON metadata in one versioned file, written
atomically and verified on load. TreeIndex.save / TreeIndex.load decide what goes in.

Format (little-endian):
    8 bytes   magic b"TREEIDX\\0"
    4 bytes   format version (uint32)
    8 bytes   header length H (uint64)
    4 bytes   CRC32 of the header
    H bytes   UTF-8 JSON header: the caller's metadata (TreeIndex: shape options,
              counters), and for each array its name, dtype, shape, offset, byte
              length and CRC32
    ...       the raw arrays, each at its 64-byte aligned offset

Reading checks the magic, the version, every length against the file size and
every checksum before returning anything (TreeIndex.load then checks the tree's
invariants); any failure raises `IndexFileError` (a ValueError) naming what was wrong.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MAGIC = b"TREEIDX\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQI")
_ALIGN = 64


class IndexFileError(ValueError):
    """A saved index file is truncated, corrupted, or of an unknown format."""


def _bytes_of(a) -> memoryview:
    """The raw bytes of a bytes-like object or a C-contiguous array (empty ones too:
    memoryview refuses to cast a view with a zero in its shape)."""
    if isinstance(a, np.ndarray):
        return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return memoryview(a).cast("B")


def crc32(data) -> int:
    """CRC32 of the raw bytes of a bytes-like object or of an array in C order."""
    return zlib.crc32(_bytes_of(data)) & 0xFFFFFFFF


def write_index_file(path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write named arrays and JSON-serialisable metadata to `path` via a temporary file
    in the same folder + os.replace."""
    path = Path(path)
    arrays = dict(arrays)
    entries, offset = [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        arrays[name] = a
        entries.append(
            dict(name=name, dtype=a.dtype.str, shape=list(a.shape), offset=offset, nbytes=int(a.nbytes), crc32=crc32(a))
        )
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps(dict(**meta, arrays=entries)).encode()
    with atomic_write(path) as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), crc32(header)))
        f.write(header)
        base = _data_start(len(header))
        f.write(b"\0" * (base - _PREFIX.size - len(header)))
        for e in entries:
            a = arrays[e["name"]]
            f.seek(base + e["offset"])
            f.write(_bytes_of(a))
        f.truncate(base + offset)


@contextmanager
def atomic_write(path):
    """A binary file object whose content replaces `path` only if the block completes:
    written to a temporary file in the same folder, fsynced, then renamed over it.

    The file gets the permissions any new file of the user gets (0666 minus the umask).
    On an exception the temporary file is removed; only a process killed outright
    (SIGKILL, power loss) can leave one behind: `.<name>.<random>.tmp` next to `path`,
    safe to delete.
    """
    path = Path(path)
    folder = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask, as for open()
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _data_start(header_len: int) -> int:
    return -(-(_PREFIX.size + header_len) // _ALIGN) * _ALIGN


def read_index_file(path, names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict]:
    """(the arrays `names`, the metadata) of an index file; IndexFileError if it is not
    a complete, intact one or lacks one of the names."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise IndexFileError(f"{path}: file is {size} bytes, too short to be a treeidx index")
        magic, version, hlen, hcrc = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise IndexFileError(f"{path}: not a treeidx index (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise IndexFileError(f"{path}: format version {version}, this treeidx reads version {FORMAT_VERSION}")
        if hlen > size - _PREFIX.size:
            raise IndexFileError(f"{path}: truncated (header of {hlen} bytes does not fit in {size})")
        header = f.read(hlen)
        if crc32(header) != hcrc:
            raise IndexFileError(f"{path}: header checksum mismatch (file corrupted)")
        try:
            meta = json.loads(header)
            entries = {e["name"]: e for e in meta["arrays"]}
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"{path}: unreadable header ({e})") from None
        base = _data_start(hlen)
        arrays = {}
        for name in names:
            e = entries.get(name)
            if e is None:
                raise IndexFileError(f"{path}: array '{name}' missing from the header")
            end = base + e["offset"] + e["nbytes"]
            if end > size:
                raise IndexFileError(f"{path}: truncated: array '{name}' ends at byte {end}, file has {size}")
            dtype = np.dtype(e["dtype"])
            if int(np.prod(e["shape"], dtype=np.int64)) * dtype.itemsize != e["nbytes"]:
                raise IndexFileError(f"{path}: array '{name}' shape {e['shape']} does not match its length")
            f.seek(base + e["offset"])
            buf = bytearray(e["nbytes"])
            if f.readinto(buf) != e["nbytes"]:
                raise IndexFileError(f"{path}: truncated while reading array '{name}'")
            if crc32(buf) != e["crc32"]:
                raise IndexFileError(f"{path}: checksum mismatch in array '{name}' (file corrupted)")
            arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(e["shape"])
    meta = {k: v for k, v in meta.items() if k != "arrays"}
    return arrays, meta
