"""Logging set-up shared by every command: structlog to stderr, console or JSON lines."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(json: bool = False, level: int = logging.INFO) -> None:
    """structlog: readable console lines for CLIs, JSON lines for services.
    `OPENPI_RL_LOG_JSON=1|0` overrides (the daemon sets it so its children log alike)."""
    json = {"1": True, "0": False}.get(os.environ.get("OPENPI_RL_LOG_JSON", ""), json)
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
