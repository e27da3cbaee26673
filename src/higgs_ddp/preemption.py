"""Stop cleanly when asked: SIGTERM (preemption, scancel) or SIGUSR1 (Slurm's warning before the time
limit, ``#SBATCH --signal``).

A signal only sets a flag. Once per optimizer step the ranks all-reduce it, so a signal that reached a
single rank stops all of them after the same step; they save a checkpoint and exit 0 (a non-zero exit
would make ``torchrun --max-restarts`` start the workers again). ``{output_dir}/status.json`` says
whether the run finished or stopped early, which is how ``launch/`` scripts decide to requeue.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import torch

from .code_cache import write_json_atomic
from .distributed import all_reduce_max

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.signum = self.signum or signum  # keep the first; a second signal changes nothing

    def agreed(self, device: torch.device) -> int:
        """Collective: the signal any rank received (0 if none)."""
        return int(all_reduce_max(torch.tensor([self.signum], device=device)).item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def write_status(output_dir, state: str, step: Optional[int], **extra) -> None:
    """``running`` | ``stopped`` (resume to continue) | ``finished`` | ``failed`` (with ``error``)."""
    write_json_atomic(Path(output_dir) / "status.json", {"state": state, "step": step, **extra})


def write_failure(output_dir, step: Optional[int], error: str) -> None:
    """``failed`` and the one-line reason, so that a monitor can tell a crash from a live run. ``step`` is
    the step the run was on (None: it failed before its first step)."""
    if not Path(output_dir).is_dir():  # it failed before it made its output_dir: nothing to mark
        return
    try:
        write_status(output_dir, "failed", step, error=error)
    except OSError:  # (a full disk, say) the error being raised is the one to report, not this one
        pass
