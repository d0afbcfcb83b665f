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


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so the umask is never changed, even briefly)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(directory: Path) -> None:
    """Give every file under ``directory`` the mode a plain ``open()`` would (0666 minus the umask).

    transformers writes weights through ``tempfile`` and renames them, which leaves them 0600: other
    users of a shared machine could not read a checkpoint or export that the umask allows them to.
    """
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
