"""Read-side queries: live paths, component usage (for parameter accounting), lineage."""
from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .schema import Candidate, Component, ComponentLock, LiveHistory, PathComponent, PathRow, Root, Task


def path_component_ids(s: Session, path_id: str) -> list[str]:
    rows = s.execute(select(PathComponent.component_id).where(PathComponent.path_id == path_id)
                     .order_by(PathComponent.position))
    return [r[0] for r in rows]


def active_tasks(s: Session) -> list[Task]:
    return list(s.scalars(select(Task).where(Task.status != "deleted").order_by(Task.id)))


def live_paths(s: Session) -> dict[str, str]:
    """{task name: live path id} for every task that has one and is not deleted."""
    return {t.name: t.live_path_id for t in active_tasks(s) if t.live_path_id}


def component_users(s: Session) -> dict[str, set[str]]:
    """{component id: names of the tasks whose live path uses it}."""
    users: dict[str, set[str]] = defaultdict(set)
    live = live_paths(s)
    by_path = {pid: name for name, pid in live.items()}
    if not by_path:
        return users
    rows = s.execute(select(PathComponent.path_id, PathComponent.component_id).where(PathComponent.path_id.in_(by_path)))
    for path_id, cid in rows:
        users[cid].add(by_path[path_id])
    return users


def locks(s: Session, component_ids: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for cid, lock in s.execute(select(ComponentLock.component_id, ComponentLock.lock)
                               .where(ComponentLock.component_id.in_(component_ids))):
        out[cid].add(lock)
    return out


def ancestry(s: Session, path_id: str) -> list[PathRow]:
    """The path and its parents up to the first path that has none (a root path or a seed)."""
    chain, seen = [], set()
    while path_id and path_id not in seen:
        seen.add(path_id)
        row = s.get(PathRow, path_id)
        if row is None:
            break
        chain.append(row)
        path_id = row.parent_id
    return chain


def training_line(s: Session, path_id: str) -> dict:
    """The candidates whose training a path's weights carry, oldest first: from the row that
    trained the path back through its parents while they are of the same task (in-visit
    parents by the "path:"/"parent:" notes, committed ones by `candidates.path_id`). It ends
    at a seed, at another task's or the root's path, or where a parent left no record
    (`complete` False: candidates recorded before the "path:" note existed)."""
    path = s.get(PathRow, path_id)
    if path is None:
        raise KeyError(path_id)
    rows = list(s.scalars(select(Candidate).where(Candidate.task_id == path.task_id)))
    by_path: dict[str, Candidate] = {}
    for row in rows:
        for note in row.mutations or []:
            if isinstance(note, str) and note.startswith("path:"):
                by_path[note[5:]] = row
        if row.path_id:
            by_path[row.path_id] = row
    line, want, complete = [], path_id, True
    while want is not None:
        row = by_path.get(want)
        if row is None:
            complete = False
            break
        line.append(row)
        if "seed" in (row.mutations or []):
            break
        notes = [n[7:] for n in row.mutations or [] if isinstance(n, str) and n.startswith("parent:")]
        parent = notes[0] if notes else row.parent_path_id
        if not notes:
            parent_row = s.get(PathRow, parent) if parent else None
            if parent_row is None or parent_row.task_id != path.task_id:
                break  # a mutated child of another task's path or of the root: the line starts here
        want = parent
    line.reverse()
    return {"candidates": line, "steps": len(line), "examples": sum(r.examples or 0 for r in line),
            "seconds": sum(r.seconds or 0.0 for r in line), "complete": complete,
            "starts_from": "seed" if line and "seed" in (line[0].mutations or []) else "mutated parent" if line else None}


def component_origin(s: Session, component_id: str) -> dict:
    """Who made a component, from what, and who uses it now."""
    c = s.get(Component, component_id)
    if c is None:
        raise KeyError(component_id)
    task = s.get(Task, c.task_id) if c.task_id else None
    chain, parent = [], c.parent_id
    while parent:
        chain.append(parent)
        parent = s.scalar(select(Component.parent_id).where(Component.id == parent))
    return {
        "id": c.id, "name": c.name, "params": c.num_params, "created_by": task.name if task else None,
        "created_in_path": c.path_id, "cloned_from": chain,
        "used_by": sorted(component_users(s).get(c.id, ())),
    }


def shared_components(s: Session) -> dict[str, list[str]]:
    """{component id: tasks} for components used by the live paths of two or more tasks."""
    return {cid: sorted(names) for cid, names in component_users(s).items() if len(names) > 1}


def live_history(s: Session, task_id: int) -> list[LiveHistory]:
    return list(s.scalars(select(LiveHistory).where(LiveHistory.task_id == task_id).order_by(LiveHistory.id)))


def system_summary(s: Session) -> dict:
    """Counts and parameter totals of the whole multitask system (`munet system`)."""
    roots = list(s.scalars(select(Root)))
    tasks = active_tasks(s)
    users = component_users(s)
    params = dict(s.execute(select(Component.id, Component.num_params).where(Component.id.in_(list(users)))).all()) if users else {}
    unique = sum(params.values())
    return {
        "roots": [{"name": r.name, "timm": r.timm_name, "params": r.total_params, "root_params": r.root_params} for r in roots],
        "tasks": len(tasks),
        "tasks_with_live_path": sum(1 for t in tasks if t.live_path_id),
        "components": _count(s, Component),
        "live_components": len(users),
        "shared_components": sum(1 for u in users.values() if len(u) > 1),
        "unique_params": unique,
        "params_per_task": unique / len(tasks) if tasks else 0.0,
    }


def _count(s: Session, model) -> int:
    return int(s.scalar(select(func.count()).select_from(model)))
