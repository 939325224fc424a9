"""One logger, three outputs: the terminal (progress bar on a TTY, plain lines otherwise), metrics.jsonl and
TensorBoard. Only rank 0 writes; other ranks get a logger that does nothing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def format_values(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


class Logger:
    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int, enabled: bool = True,
                 config_text: str = ""):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.bar = None
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        if run_dir is not None:
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
                if config_text and not start_step:  # hyper-parameters beside the curves, in the TEXT tab
                    self.tb.add_text("config", "```\n" + config_text + "\n```", 0)
            except ImportError:  # tensorboard is a dependency, but a stripped install should still train
                self.tb = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length changed (a time budget re-planned): the progress line and bar follow."""
        self.total_steps = total_steps
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """Live training values: the bar's postfix on a TTY, a plain line otherwise."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(format_values(values), refresh=True)
        else:
            print(f"step {step}/{self.total_steps} {format_values(values)}", flush=True)

    def scalars(self, step: int, values: dict[str, float], **extra) -> None:
        """Persist values under `split/name` keys to JSONL and TensorBoard."""
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **extra, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def tensorboard_scalars(self, step: int, values: dict[str, float]) -> None:
        """Values for TensorBoard alone (many per step, such as per-layer statistics), kept out of metrics.jsonl."""
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def histogram(self, step: int, tag: str, values) -> None:
        if self.tb is not None:
            self.tb.add_histogram(tag, values, step)

    def hparams(self, hyperparameters: dict, metric_tags: list[str]) -> None:
        """TensorBoard's HPARAMS view: this run's settings beside its metrics, one row per run, so `tensorboard
        --logdir runs` compares runs side by side. Written into the run's own event files (SummaryWriter.add_hparams
        would open a sub-run beside it), so the row and the curves are one run. The view reads each metric from the
        run's scalar of that tag (its last value): log the scalars too."""
        if self.tb is None:
            return
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(hyperparameters, dict.fromkeys(metric_tags, 0.0)):
            self.tb.file_writer.add_summary(summary)

    def texts(self, step: int, texts: dict[str, str]) -> None:
        """Text the task records at an evaluation (samples of a language model): samples/step-N.txt in the run
        directory and TensorBoard's TEXT tab."""
        if not self.enabled or not texts:
            return
        if self.run_dir is not None:
            folder = self.run_dir / "samples"
            folder.mkdir(exist_ok=True)
            (folder / f"step-{step:07d}.txt").write_text("".join(f"--- {k}\n{v}\n\n" for k, v in texts.items()))
        if self.tb is not None:
            for key, value in texts.items():
                self.tb.add_text(f"samples/{key}", "```\n" + value + "\n```", step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
