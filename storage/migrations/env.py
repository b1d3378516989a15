"""Alembic environment: runs against the engine munet hands over (or the configured URL)."""
from alembic import context
from sqlalchemy import create_engine

from munet.storage.schema import Base

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))

with engine.connect() as connection:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
