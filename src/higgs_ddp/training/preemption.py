"""Stop cleanly when asked: SIGTERM (preemption, scancel) or SIGUSR1 (Slurm's warning before the time
limit, ``#SBATCH --signal``).

A signal only sets a flag. Once per optimizer step the ranks all-reduce it, so a signal that reached a
single rank stops all of them after the same step; they save a checkpoint and exit 0 (a non-zero exit
would make ``torchrun --max-restarts`` start the workers again). ``{output_dir}/status.json`` says
whether the run finished or stopped early, which is how ``launch/`` scripts decide to requeue.

Slurm (preemption, ``scancel``) signals every process of the job step, and torchrun passes SIGTERM on to
each training process's whole process group: the DataLoader workers get the signal too. They leave it to
the training process (``leave_stop_signals_to_parent``), which shuts them down before its final save.
SIGINT (Ctrl-C) is not a stop request: it stays a hard stop (KeyboardInterrupt, nothing saved).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

import torch

from higgs_ddp.runtime.files import write_json_atomic
from higgs_ddp.runtime.distributed import all_reduce_max
from higgs_ddp.runtime.layout import STATUS

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
        if self.signum:
            return  # keep the first; a second signal changes nothing
        self.signum = signum
        # The DataLoader's SIGCHLD handler raises in this thread, wherever it is, when a worker dies: in the
        # middle of a step, between two collectives the other ranks already wait in. While stopping, a
        # dead worker is left to the prefetcher to report, at the next fetch (train.py then stops all ranks
        # before that step); the batches are shut down before the final save.
        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _child_ended_while_stopping)

    def agreed(self, device: torch.device) -> int:
        """Collective: the signal any rank received (0 if none)."""
        return int(all_reduce_max(torch.tensor([self.signum], device=device)).item())


def _child_ended_while_stopping(signum, frame) -> None:
    pass  # see StopRequest._handler


def leave_stop_signals_to_parent(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker outlives SIGTERM and SIGUSR1 from anyone but its parent.

    A worker dying of the step-wide signal would make the training process's SIGCHLD handler raise in its
    step or its save (issue 19). torch's own worker handler exits on SIGTERM from the parent and dies of
    anyone else's; here anyone else's is ignored, while the parent's (the DataLoader's last-resort
    ``terminate()``, multiprocessing's exit handler) still ends the worker at once: an ignored SIGTERM
    would leave those waiting forever. A Python handler cannot see the sender, so the signals are blocked
    in this thread (and the threads it starts) and a thread takes them with ``sigwaitinfo``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(os.getppid(),), name="higgs-ddp-stop-signals",
                     daemon=True).start()


def _take_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # as torch's handler does: exit 0, which the parent does not report as a failure


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def write_status(output_dir, state: str, step: Optional[int], **extra) -> None:
    """``running`` | ``stopped`` (resume to continue) | ``finished`` | ``failed`` (with ``error``)."""
    write_json_atomic(Path(output_dir) / STATUS, {"state": state, "step": step, **extra})


def write_failure(output_dir, step: Optional[int], error: str) -> None:
    """``failed`` and the one-line reason, so that a monitor can tell a crash from a live run. ``step`` is
    the step the run was on (None: it failed before its first step)."""
    if not Path(output_dir).is_dir():  # it failed before it made its output_dir: nothing to mark
        return
    try:
        write_status(output_dir, "failed", step, error=error)
    except OSError:  # (a full disk, say) the error being raised is the one to report, not this one
        pass
