"""Read-only views for the web page (`GET /system/graph`, `GET /system/history`).

The graph is the multitask system as the muNet paper draws it: every task's live path, each
component once however many tasks use it, with the task that created it (None for a root's
components) and a row for drawing, so that the same layer of different paths lines up even
when a path dropped a block or added an adapter. The history is every task's score over time:
the live-pointer moves (swaps) and the scores of the candidates the evolver tried.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict

from sqlalchemy import select

from munet.names import parse_name
from munet.storage import lineage
from munet.storage.schema import Candidate, Component, LiveHistory, PathComponent, Root, Task

# The last candidates per task that the history carries (the chart shows them as dots).
MAX_CANDIDATES = 500


def _iso(t: dt.datetime | None) -> str | None:
    return t.replace(tzinfo=dt.timezone.utc).isoformat() if t else None


def slot(name: str, position: int) -> tuple[float, str]:
    """Where a component sits in any path of its root, bottom (input) first."""
    kind, index, _ = parse_name(name)
    if kind in ("cls_token", "pos_embed"):
        return -1.0, kind
    if kind == "stem":
        return 0.0, ""
    if kind == "adapter":      # an adapter runs before block `index`
        return index + 0.5, ""
    if kind == "blocks":
        return index + 1.0, ""
    order = {"neck": 0, "final_norm": 1, "head": 2}
    if kind in order:
        return 1e6 + order[kind], ""
    return 1e5 + position, name  # unknown kinds keep their path order


def graph_json(system) -> dict:
    """Tasks (their live path's component ids, bottom first) and each live component once."""
    with system.ReadSession() as s:
        tasks = lineage.active_tasks(s)
        task_names = dict(s.execute(select(Task.id, Task.name)).all())
        root_names = dict(s.execute(select(Root.id, Root.name)).all())
        live = {t.live_path_id: t.name for t in tasks if t.live_path_id}
        paths: dict[str, list[str]] = defaultdict(list)
        if live:
            rows = s.execute(select(PathComponent.path_id, PathComponent.component_id)
                             .where(PathComponent.path_id.in_(list(live))).order_by(PathComponent.position))
            for path_id, cid in rows:
                paths[live[path_id]].append(cid)
        users: dict[str, list[str]] = defaultdict(list)
        for t in tasks:
            for cid in paths.get(t.name, []):
                users[cid].append(t.name)
        comps = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(list(users))))} if users else {}
        slots = {}
        for t in tasks:
            for pos, cid in enumerate(paths.get(t.name, [])):
                slots.setdefault(cid, slot(comps[cid].name, pos))
        rows_order = {key: i for i, key in enumerate(sorted(set(slots.values())))}
        components = [{
            "id": cid, "name": c.name, "params": c.num_params,
            "created_by": task_names.get(c.task_id) if c.task_id else None,
            "root": root_names.get(c.root_id) if c.task_id is None else None,
            "used_by": users[cid], "row": rows_order[slots[cid]],
        } for cid, c in comps.items()]
        components.sort(key=lambda c: (c["row"], c["id"]))
        return {
            "tasks": [{"name": t.name, "status": t.status, "live_path_id": t.live_path_id,
                       "components": paths.get(t.name, [])} for t in tasks],
            "components": components,
            "rows": len(rows_order),
            "summary": lineage.system_summary(s),
        }


def history_json(system, max_candidates: int = MAX_CANDIDATES) -> dict:
    """{task: {"swaps": live-pointer moves, "candidates": the last scored candidates}}."""
    with system.ReadSession() as s:
        tasks = lineage.active_tasks(s)
        out = {t.name: {"created_at": _iso(t.created_at), "swaps": [], "candidates": []} for t in tasks}
        by_id = {t.id: t.name for t in tasks}
        if not by_id:
            return {"tasks": out}
        for h in s.scalars(select(LiveHistory).where(LiveHistory.task_id.in_(list(by_id))).order_by(LiveHistory.id)):
            out[by_id[h.task_id]]["swaps"].append({
                "at": _iso(h.at), "score": h.score, "path_id": h.path_id,
                "previous_path_id": h.previous_path_id, "reason": h.reason})
        for task_id, name in by_id.items():
            rows = s.execute(select(Candidate.created_at, Candidate.score, Candidate.outcome)
                             .where(Candidate.task_id == task_id, Candidate.score.is_not(None))
                             .order_by(Candidate.id.desc()).limit(max_candidates)).all()
            out[name]["candidates"] = [{"at": _iso(at), "score": score, "outcome": outcome}
                                       for at, score, outcome in reversed(rows)]
        return {"tasks": out}
