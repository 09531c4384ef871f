"""gunicorn's uvicorn worker, serving with llm-api's HTTP protocol (a bounded request head,
http_server.py). gunicorn.conf.py names it; uvicorn-worker is a production dependency only."""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from llm_api.http_server import HeadLimitedProtocol


class Worker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no types
    CONFIG_KWARGS: dict[str, Any] = {**UvicornWorker.CONFIG_KWARGS, "http": HeadLimitedProtocol}
