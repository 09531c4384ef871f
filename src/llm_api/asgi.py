"""A module-level ASGI app for servers that import one: `fastapi run` (pyproject's
[tool.fastapi] entrypoint), `uvicorn llm_api.asgi:app`, gunicorn (gunicorn.conf.py)."""

from __future__ import annotations

from llm_api.main import create_app

app = create_app()
