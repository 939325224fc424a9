"""Early stopping on the task's monitored validation metric."""

from __future__ import annotations

import math


class EarlyStopper:
    def __init__(self, mode: str, patience: int, min_delta: float):
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_evals = 0

    def improved(self, value: float) -> bool:
        """Record one evaluation; True when it is the best so far (by more than min_delta)."""
        better = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if better:
            self.best = value
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])
