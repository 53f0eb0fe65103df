"""Structured logs: JSON lines (RP_LOG_FORMAT=json) or console, level from RP_LOG_LEVEL."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(service: str) -> structlog.stdlib.BoundLogger:
    level_name = os.environ.get("RP_LOG_LEVEL", "INFO").upper()
    level = getattr(logging, level_name, logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if os.environ.get("RP_LOG_FORMAT", "console") == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr)
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger(service)
