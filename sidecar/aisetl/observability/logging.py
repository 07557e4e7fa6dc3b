"""structlog, configured once at the entry point.

JSON lines when stderr is not a TTY (a log shipper reads them), a console
renderer when a person watches. Request-scoped context (request ID, ETL ID) is
bound through ``structlog.contextvars`` by the HTTP middleware.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(role: str, level: str = "info", fmt: str | None = None) -> None:
    """Configure structlog and the stdlib root logger for one process."""
    json_out = (fmt == "json") or (fmt is None and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer()
    )
    lvl = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role)
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
