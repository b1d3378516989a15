"""The layer store: immutable component tensors as safetensors files named by content hash.

`put` is idempotent and atomic; `get` verifies the hash before parsing, and parsing is
safetensors only, so no byte from the store is ever unpickled.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .fsio import atomic_write, filesystem

if TYPE_CHECKING:  # torch is imported by put/get only: a gateway that never reads tensors stays light
    import torch


class BlobError(RuntimeError):
    pass


class LayerStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = filesystem(url)

    def path(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest}.safetensors"

    def put(self, tensors: dict[str, torch.Tensor]) -> str:
        """Store tensors; returns their sha256 (the blob's name)."""
        from safetensors.torch import save as st_save

        data = st_save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())})
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not self.fs.exists(target):
            atomic_write(self.fs, target, data)
        return digest

    def read_bytes(self, digest: str) -> bytes:
        try:
            with self.fs.open(self.path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise BlobError(f"blob {digest} is missing from the layer store {self.url}") from e
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobError(f"blob {digest} does not match its hash (corrupt store?)")
        return data

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        return st_load(self.read_bytes(digest))

    def exists(self, digest: str) -> bool:
        return self.fs.exists(self.path(digest))

    def digests(self) -> dict[str, float]:
        """Every stored blob with its modification time (seconds since the epoch)."""
        out = {}
        for info in self.fs.find(self.root, detail=True).values():
            name = info["name"].rsplit("/", 1)[-1]
            if name.endswith(".safetensors") and not name.startswith(".tmp-"):
                mtime = info.get("mtime") or info.get("created") or 0
                out[name.removesuffix(".safetensors")] = float(getattr(mtime, "timestamp", lambda: mtime)())
        return out

    def stale_temps(self, older_than: float) -> list[str]:
        """Temp files of writers that died mid-write (never visible as blobs)."""
        import time

        now, out = time.time(), []
        for info in self.fs.find(self.root, detail=True).values():
            name = info["name"].rsplit("/", 1)[-1]
            mtime = info.get("mtime") or info.get("created") or 0
            mtime = float(getattr(mtime, "timestamp", lambda: mtime)())
            if name.startswith(".tmp-") and now - mtime > older_than:
                out.append(info["name"])
        return out

    def delete(self, digest: str) -> None:
        self.fs.rm(self.path(digest))
