"""Garbage collection of the layer store.

A blob is kept while any path of record uses it: root paths, every path that was ever
live for a task that is not deleted (so operators can roll back), and anything written
within the grace period (a commit in flight writes blobs before its transaction). Rows
stay for lineage; only bytes go. Safe to run while other processes commit.
"""
from __future__ import annotations

import datetime as dt
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .blobs import LayerStore
from .schema import Component, LiveHistory, PathComponent, PathRow, Root, Task, utcnow


def referenced_blobs(s: Session, grace_seconds: float) -> set[str]:
    deleted = select(Task.id).where(Task.status == "deleted")
    paths = set(s.scalars(select(Root.root_path_id)))
    paths |= set(s.scalars(select(LiveHistory.path_id).where(LiveHistory.task_id.not_in(deleted))))
    paths |= set(s.scalars(select(Task.live_path_id).where(Task.status != "deleted")))
    paths.discard(None)
    young = utcnow() - dt.timedelta(seconds=grace_seconds)
    keep = set(s.scalars(select(Component.blob_hash).join(PathComponent, PathComponent.component_id == Component.id)
                         .where(PathComponent.path_id.in_(paths))))
    keep |= set(s.scalars(select(PathRow.probe_hash).where(PathRow.id.in_(paths))))
    keep |= set(s.scalars(select(Component.blob_hash).where(Component.created_at >= young)))
    keep |= set(s.scalars(select(PathRow.probe_hash).where(PathRow.created_at >= young)))
    keep.discard(None)
    return keep


def collect(Session: sessionmaker[Session], store: LayerStore, grace_seconds: float = 3600.0,
            dry_run: bool = False) -> dict:
    """Delete unreferenced blobs older than the grace period; returns what it did."""
    now = time.time()
    on_disk = store.digests()  # listed before the query: a blob written after it is young anyway
    with Session() as s:
        keep = referenced_blobs(s, grace_seconds)
    doomed = [d for d, mtime in on_disk.items() if d not in keep and now - mtime > grace_seconds]
    freed = 0
    for digest in doomed:
        if not dry_run:
            freed += store.fs.size(store.path(digest))
            store.delete(digest)
    temps = store.stale_temps(grace_seconds)
    if not dry_run:
        for name in temps:
            store.fs.rm(name)
    return {"blobs": len(on_disk), "kept": len(on_disk) - len(doomed), "deleted": len(doomed),
            "bytes_freed": freed, "temp_files_removed": len(temps), "dry_run": dry_run}
