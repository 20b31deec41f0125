"""SHA-256 of the bytes a source is read from: a file's, and one digest for many files."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20
# Within one process a file is hashed once while it stays as it was (same size, change time and
# inode): the pre-flight checks, training and the judge classifier each load the same data.
_seen: dict[str, tuple[tuple[int, int, int], str]] = {}


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def file_sha256(path: Path) -> str:
    key, signature = str(path), _signature(path)
    known = _seen.get(key)
    if known and known[0] == signature:
        return known[1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    _seen[key] = (signature, digest.hexdigest())
    return digest.hexdigest()


def bytes_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def combined_sha256(named: Iterable[tuple[str, str]]) -> str:
    """One digest of (name, SHA-256) pairs, e.g. every image of a folder by its relative path."""
    digest = hashlib.sha256()
    for name, sha in sorted(named):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()

