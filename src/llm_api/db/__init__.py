"""Persistence: the async engine and session maker, ORM tables and Alembic migrations."""
