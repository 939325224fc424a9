"""The server's JSON log lines: access lines written in batches, every other line at once and after the access lines
logged before it, nothing lost at a normal stop (test_server_process.py checks the lines of a stopped server)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

from modelworks.serve.logs import BatchedStderrHandler, JsonFormatter, configure_logging


def make_logger(stream: io.StringIO, handler_class=BatchedStderrHandler) -> tuple[logging.Logger, BatchedStderrHandler]:
    handler = handler_class(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test-batched-{id(stream)}")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, handler


def access(logger: logging.Logger, n: int, level: int = logging.INFO) -> None:
    extra = {"fields": {"n": n}, "batched": level < logging.WARNING}
    logger.handle(logger.makeRecord(logger.name, level, "", 0, "request", (), None, extra=extra))


def messages(stream: io.StringIO) -> list:
    return [(line["message"], line.get("n")) for line in map(json.loads, stream.getvalue().splitlines())]


def test_access_lines_wait_for_a_batch_and_other_lines_write_them_first_in_order():
    stream = io.StringIO()
    logger, handler = make_logger(stream)
    access(logger, 1)
    access(logger, 2)
    assert stream.getvalue() == ""  # batched: not yet written
    logger.info("ready")  # any other line writes the waiting ones, then itself
    assert messages(stream) == [("request", 1), ("request", 2), ("ready", None)]
    access(logger, 3, logging.WARNING)  # a request that failed is written at once
    assert messages(stream)[-1] == ("request", 3)


def test_waiting_access_lines_are_written_within_the_flush_interval():
    stream = io.StringIO()
    logger, handler = make_logger(stream)
    access(logger, 1)
    deadline = time.monotonic() + 10 * handler.FLUSH_S
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert messages(stream) == [("request", 1)]



class NoTimer(BatchedStderrHandler):
    FLUSH_S = 3600  # its timer never writes within a test: what writes is the size limit


def test_access_lines_are_written_once_the_size_limit_waits():
    stream = io.StringIO()
    logger, handler = make_logger(stream, NoTimer)
    lines = handler.LIMIT // 60 + 2  # each line is over 60 characters
    for n in range(lines):
        access(logger, n)
    written = messages(stream)
    assert written == [("request", n) for n in range(len(written))] and 0 < len(written) < lines
    handler.flush()
    assert messages(stream) == [("request", n) for n in range(lines)]


def test_configuring_the_logs_again_reuses_the_handler_and_its_thread():
    """A server started several times in one process (tests, a notebook) configures the logs each time: one
    handler and one flushing thread serve them all, at the level of the last call."""
    loggers = [logging.getLogger(name) for name in ("modelworks.serve", "uvicorn", "uvicorn.error")]
    before = [(logger.handlers, logger.level, logger.propagate) for logger in loggers]
    try:
        configure_logging("info")
        handler = loggers[0].handlers[0]
        flushers = sum(t.name == "log-flush" for t in threading.enumerate())
        for level in ("debug", "warning"):
            configure_logging(level)
        assert all(logger.handlers == [handler] for logger in loggers)
        assert sum(t.name == "log-flush" for t in threading.enumerate()) == flushers
        assert all(logger.level == logging.WARNING for logger in loggers)
    finally:  # the other tests in this process see the logs as they were
        for logger, (handlers, level, propagate) in zip(loggers, before):
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
