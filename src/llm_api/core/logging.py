"""structlog setup: JSON lines in production, readable console output in development."""

from __future__ import annotations

import logging
import sys

import structlog

from llm_api.core.config import Settings
from llm_api.core.redaction import redact_secrets


def configure_logging(settings: Settings) -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if settings.json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Updated in place: loggers cached under an earlier configuration (a second app in one
    # process, as the tests make) follow this one too, and structlog's capture_logs reaches them.
    processors = structlog.get_config()["processors"]
    # filter_by_level first: a call below the level is dropped before the other processors
    # (timestamp, names) run, not after them in the stdlib handler.
    processors[:] = [
        structlog.stdlib.filter_by_level,
        *shared,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,  # last before rendering, so exception text is covered too
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("uvicorn.access",):  # our own access log replaces it
        logging.getLogger(noisy).handlers[:] = []
        logging.getLogger(noisy).propagate = False
