"""A progress bar on a terminal, silence elsewhere (pipes, CI, --json)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def advance(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        fraction = min(1.0, self.done / self.total)
        bar = "#" * int(30 * fraction)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {elapsed:5.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
