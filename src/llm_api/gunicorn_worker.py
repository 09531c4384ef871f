"""gunicorn's uvicorn worker, serving with llm-api's HTTP protocol and settings (a bounded
request head, no proxy headers, no server header: http_server.SERVER_OPTIONS), as `llm-api serve`
does. gunicorn.conf.py names it; uvicorn-worker is a production dependency only."""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from llm_api.http_server import SERVER_OPTIONS


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no types
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, **SERVER_OPTIONS}
