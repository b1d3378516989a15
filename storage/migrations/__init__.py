"""Alembic migrations of the munet schema."""
