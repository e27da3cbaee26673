"""Where a start-up spends its time, phase by phase: cheap enough (a clock read per phase) to run on
every start. ``load_data`` keeps them in the data report and rank 0 prints them in one line."""

from __future__ import annotations

import time


class Phases:
    def __init__(self):
        self.seconds: dict = {}
        self.t0 = self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        """The time since the previous mark (or the start) goes to ``name``."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now

    def total(self) -> float:
        return self.t - self.t0

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"{self.total():.1f} s ({parts})"
