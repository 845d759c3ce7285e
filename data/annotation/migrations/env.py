"""Alembic environment: runs migrations on the connection `speechrl.data.annotation.db.migrate` hands over."""
from alembic import context

from speechrl.data.annotation.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copy
with context.begin_transaction():
    context.run_migrations()
