"""Atomic, fsspec-addressed file writes shared by the layer store and the data-set store."""
from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a local folder or any fsspec URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or the whole file.

    Local files: temp name in the same folder, fsync, rename, fsync the folder. Other
    filesystems: write a temp object then move it, which object stores make atomic. A
    failed write (a full disk, a broken store) removes its temp file before raising, so
    no partial file is left behind.
    """
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    fs.makedirs(parent, exist_ok=True)
    # Only the plain local filesystem takes the os-level path: a subclass (instrumented,
    # fault-injecting) gets its own open/write honoured.
    if type(fs) is LocalFileSystem:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            _discard(fs, tmp)
            raise
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        _discard(fs, tmp)
        raise


def _discard(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
    """Best-effort removal of a failed write's temp file (gc removes it later otherwise)."""
    try:
        if fs.exists(tmp):
            fs.rm(tmp)
    except Exception:  # noqa: BLE001 - the original error is the one worth raising
        pass
