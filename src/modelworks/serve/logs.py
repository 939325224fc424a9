"""Structured logs: one JSON object per line on stderr, every request line carrying its request id."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "modelworks.serve"


class JsonFormatter(logging.Formatter):
    # The formatted second, kept: every request writes a line, and strftime per line was a measurable share of the
    # event loop's time at 1,000 requests/s. (Two threads racing here both write the same value.)
    _second, _stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry = {"time": f"{self._stamp}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Our logger and uvicorn's, all as JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER, "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


_logger = logging.getLogger(LOGGER)


def log(message: str, level: int = logging.INFO, **fields) -> None:
    if _logger.isEnabledFor(level):
        # The record is made without Logger.log's caller lookup (a walk up the stack for a file and line that the
        # JSON line never shows): the server writes a line per request, and the lookup was a fifth of its cost.
        _logger.handle(_logger.makeRecord(LOGGER, level, "", 0, message, (), None, extra={"fields": fields}))
