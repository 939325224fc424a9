"""Structured logs: one JSON object per line on stderr, every request line carrying its request id."""

from __future__ import annotations

import json
import logging
import sys
import threading
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


class BatchedStderrHandler(logging.Handler):
    """Lines to stderr, the access lines (`log_request`) written in batches: at most FLUSH_S after they were logged,
    or at once when LIMIT characters wait or when any other line is logged (which writes the waiting ones first,
    in order). Why: a write per request is a system call per request on the event loop's thread, which lets go of
    the GIL there and then waits to get it back from the inference thread. On its own the gain was within this
    machine's noise (bench/recommendation_serve.py, docs/benchmarks.md); kept as cheaper by construction. The
    cost: a process killed outright (SIGKILL, a crash in native code) loses at most the last FLUSH_S of access
    lines; a normal stop, SIGTERM included, loses none (uvicorn's own last line writes them)."""

    FLUSH_S = 0.2
    LIMIT = 64 * 1024

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream
        self.waiting: list[str] = []
        self.size = 0
        self.flusher = threading.Thread(target=self._flush_regularly, name="log-flush", daemon=True)
        self.flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # logging's own lock of this handler (created by Handler.__init__)
            self.waiting.append(line)
            self.size += len(line)
            if not getattr(record, "batched", False) or self.size >= self.LIMIT:
                self._write()

    def flush(self) -> None:
        with self.lock:
            self._write()

    def _write(self) -> None:
        if not self.waiting:
            return
        text, self.waiting, self.size = "".join(self.waiting), [], 0
        stream = self.stream or sys.stderr  # looked up per write: tests and tools swap sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nowhere left to log to
            pass

    def _flush_regularly(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            if self.waiting:
                self.flush()


_handler: BatchedStderrHandler | None = None


def configure_logging(level: str = "info") -> None:
    """Our logger and uvicorn's, all as JSON lines on stderr. One handler per process, made at the first call:
    each handler runs its own flushing thread, and a server started again in the same process (tests, notebooks)
    would otherwise leave one more thread behind every time."""
    global _handler
    if _handler is None:
        _handler = BatchedStderrHandler()
        _handler.setFormatter(JsonFormatter())
    for name in (LOGGER, "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [_handler]
        logger.setLevel(level.upper())
        logger.propagate = False


_logger = logging.getLogger(LOGGER)


def log(message: str, level: int = logging.INFO, **fields) -> None:
    _emit(message, level, fields, batched=False)


def log_request(level: int, **fields) -> None:
    """A request's access line: as `log("request", ...)`, but written with others in a batch (BatchedStderrHandler)
    unless it is a warning or worse."""
    _emit("request", level, fields, batched=level < logging.WARNING)


def _emit(message: str, level: int, fields: dict, batched: bool) -> None:
    if _logger.isEnabledFor(level):
        # The record is made without Logger.log's caller lookup (a walk up the stack for a file and line that the
        # JSON line never shows): the server writes a line per request, and the lookup was a fifth of its cost.
        record = _logger.makeRecord(LOGGER, level, "", 0, message, (), None,
                                    extra={"fields": fields, "batched": batched})
        _logger.handle(record)
