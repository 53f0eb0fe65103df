"""Structured logs: JSON lines, or console lines for a person (RP_LOG_FORMAT=json|console; by
default console on a terminal, JSON otherwise), level from RP_LOG_LEVEL. Context fields
(`service`, and `node_id` in a node agent) are bound once; `job_id`, `endpoint_id`,
`worker_id` are passed where they are known."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(service: str) -> structlog.stdlib.BoundLogger:
    level_name = os.environ.get("RP_LOG_LEVEL", "INFO").upper()
    level = getattr(logging, level_name, logging.INFO)
    fmt = os.environ.get("RP_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
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
