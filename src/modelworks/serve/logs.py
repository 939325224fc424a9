"""Structured logs: one JSON object per line on stderr, every request line carrying its request id."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "modelworks.serve"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
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


def log(message: str, level: int = logging.INFO, **fields) -> None:
    logger = logging.getLogger(LOGGER)
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})
