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
    filesystems: write a temp object then move it, which object stores make atomic.
    """
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return
    with fs.open(tmp, "wb") as f:
        f.write(data)
    try:
        fs.mv(tmp, path)
    except BaseException:
        fs.rm(tmp)
        raise
