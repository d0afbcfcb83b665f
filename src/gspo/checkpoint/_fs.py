"""Durable-file helpers: fsync, atomic small-file replace, streamed sha256.

Durability on POSIX needs three things: the file's bytes fsynced, the directory entry fsynced
(otherwise a rename may be lost on power failure), and a rename as the single commit point.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

# 8 MiB: big enough that per-call overhead is negligible (~100 MB hashes in well under a second),
# small enough that hashing never holds a large file in memory.
CHUNK_BYTES = 8 * 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_and_fsync(path: Path) -> tuple[int, str]:
    """Stream ``path`` once: fsync its data and return ``(size_in_bytes, sha256_hex)``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (the caller fsyncs the directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")  # swept by the next save if we die
    try:
        write_bytes_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
