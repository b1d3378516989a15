"""Settings from the environment (DESIGN.md names), as one plain object."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: str
    db_url: str
    store_url: str
    data_url: str
    redis_url: str | None
    api_token: str | None

    @classmethod
    def from_env(cls, home: str | None = None) -> "Settings":
        env = os.environ
        home = str(Path(home or env.get("MUNET_HOME") or "./munet-data").resolve())
        return cls(
            home=home,
            db_url=env.get("MUNET_DB_URL") or f"sqlite:///{home}/munet.db",
            store_url=env.get("MUNET_STORE_URL") or f"{home}/layers",
            data_url=env.get("MUNET_DATA_URL") or f"{home}/datasets",
            redis_url=env.get("MUNET_REDIS_URL") or None,
            api_token=env.get("MUNET_API_TOKEN") or None,
        )
