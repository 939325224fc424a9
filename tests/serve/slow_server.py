"""`modelworks` with a slow model: `python slow_server.py SECONDS serve PACKAGE ...` sleeps SECONDS in every
prediction call (warm-up included) before running the real graph.

A real server whose batches take seconds keeps requests in flight long enough for the drain tests to send their
signal while they are; the tiny model alone answers in about a millisecond.
"""

from __future__ import annotations

import sys
import time

from modelworks.cli import main
from modelworks.export.runtime import InferenceModel

if __name__ == "__main__":
    seconds = float(sys.argv[1])
    predict = InferenceModel.predict

    def slow_predict(self, items):
        time.sleep(seconds)
        return predict(self, items)

    InferenceModel.predict = slow_predict
    raise SystemExit(main(sys.argv[2:]))
