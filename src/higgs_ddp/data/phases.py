"""Where a start-up spends its time, phase by phase: cheap enough (two clock reads per phase) to run on
every start. ``load_data`` keeps them in the data report and rank 0 prints them in one line. The process's
CPU seconds per phase are kept too: on a machine whose cores are busy with other work the wall clock
says little about how the work splits over ranks; the CPU seconds do."""

from __future__ import annotations

import time


class Phases:
    def __init__(self):
        self.seconds: dict = {}
        self.cpu_seconds: dict = {}  # this process's (all its threads'), not its DataLoader workers'
        self.t0 = self.t = time.perf_counter()
        self.cpu = time.process_time()

    def mark(self, name: str) -> None:
        """The time since the previous mark (or the start) goes to ``name``."""
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu - self.cpu
        self.t, self.cpu = now, cpu

    def total(self) -> float:
        return self.t - self.t0

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"{self.total():.1f} s ({parts})"
