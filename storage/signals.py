"""Redis signals (`munet:swaps`, `munet:tasks`). SQL stays the source of truth: a lost
message only delays a swap until the next SQL poll, so publishing never fails a commit."""
from __future__ import annotations

import json
import logging
import time

SWAPS = "munet:swaps"
TASKS = "munet:tasks"
log = logging.getLogger("munet.signals")


def publish(redis_url: str | None, channel: str, payload: dict) -> bool:
    if not redis_url:
        return False
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        client.publish(channel, json.dumps(payload))
        client.close()
        return True
    except redis.RedisError as e:
        log.warning("could not publish on %s (%s); listeners fall back to SQL polling", channel, e)
        return False


def swap_message(task: str, path_id: str, score: float | None) -> dict:
    return {"task": task, "path_id": path_id, "score": score, "committed_at": time.time()}
