"""structlog set-up: JSON lines when stderr is not a terminal, readable output when it is.
Logs go to stderr; stdout belongs to the generated text and --json results."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _StderrLogger:
    """Looks sys.stderr up at every line, so a replaced stream (pytest's capture) is followed."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_logger(*_args) -> _StderrLogger:
    return _StderrLogger()


def configure(level: str | None = None, json: bool | None = None) -> None:
    level = (level or os.environ.get("SPECEDGE_LOG", "info")).upper()
    if json is None:
        json = not sys.stderr.isatty()
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def install_uvloop() -> None:
    import uvloop

    uvloop.install()
