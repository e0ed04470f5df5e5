"""The schema exists only through migrations: the migrated database matches the tables exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from graft import tables  # noqa: F401  (registers the tables on the metadata)
from graft.config import Settings
from graft.db import Base


def test_migrations_match_the_tables(settings: Settings) -> None:
    engine = create_engine(settings.effective_database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() is not None
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()
