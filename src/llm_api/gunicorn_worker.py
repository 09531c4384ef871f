"""gunicorn's uvicorn worker, serving with llm-api's HTTP protocol and settings (a bounded
request head, no proxy headers, no server header, and the fast path's protocol unless
LLM_API_FAST_PATH=false: http_server.server_options), as `llm-api serve` does. gunicorn.conf.py
names it; uvicorn-worker is a production dependency only."""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from llm_api.core.config import Settings
from llm_api.http_server import server_options


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no types
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, **server_options(True)}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The setting is read in the worker, from the environment the app reads it from too.
        fast_path = Settings().fast_path
        self.CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, **server_options(fast_path)}
        super().__init__(*args, **kwargs)
