"""Alembic environment of the history database: run by :func:`patchcore.station.history.upgrade`
on the connection it passes in ``config.attributes["connection"]`` (no alembic.ini needed)."""

from __future__ import annotations

from alembic import context

from patchcore.station.schema import VERSION_TABLE, Base


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
