"""What every benchmark prints beside its figures: the CPU it ran on (`lscpu`'s model name)."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
