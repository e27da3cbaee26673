"""One run at a time in an ``output_dir``: two would resume from each other's checkpoints and write the same
checkpoints and ``metrics.jsonl``.

Global rank 0 holds a POSIX record lock (``fcntl.lockf``) on ``{output_dir}/run.lock`` for the run's life,
and writes who it is into the file. The kernel drops such a lock when its process ends, however it ends
(SIGKILL, out of memory), so nothing is ever left stuck on one machine: a Slurm requeue or a torchrun
restart (``--max-restarts``) starts its new ranks only after the old ones are gone, and gets in. Unlike
``flock``, the lock belongs to the process, not to the open file: the DataLoader workers forked from rank 0
do not inherit it, so a killed rank 0 frees the folder at once even while its workers linger. Network
filesystems (NFS) carry these locks to the server, which sees them across nodes; a node that crashed keeps
its lock until the server's lease on it ends (NFSv4: about 90 s).

The other ranks learn rank 0's outcome in one collective and stop with it. A second run is refused in one
line naming the holder: its host, pid and start time.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # (no torch at import: `higgs-ddp train` calls refusal before it launches the ranks)
    from higgs_ddp.runtime.distributed import DistEnv

from higgs_ddp.runtime.shared_fs import SharedFilesystemError, unwritable

LOCK_FILE = "run.lock"
# A refused attempt tries again this long: `higgs-ddp train` looks at the lock before it launches the ranks
# (refusal), holding it for an instant, which must not turn its own rank 0 away.
RETRY_S = 1.0


class OutputDirInUse(SharedFilesystemError):
    """Another live run holds the output_dir; every rank raises it (as a shared-filesystem error, every rank
    reports it: other nodes must hear it too)."""


class RunLock:
    """The lock rank 0 holds; ``release`` (or the end of the process) frees the folder."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the lock
            self.fd = None


def take(output_dir) -> RunLock:
    """The output_dir's lock for this process, with this process named in it. OutputDirInUse when another
    run holds it; SharedFilesystemError when output_dir cannot be written."""
    out = Path(output_dir)
    why = unwritable(out)
    if why:
        raise SharedFilesystemError(cannot_write(out, why))
    out.mkdir(parents=True, exist_ok=True)
    # The only descriptor of the lock file this process ever opens: closing any other one would drop the lock.
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + RETRY_S
    while not _try_lock(fd, fcntl.LOCK_EX):
        if time.monotonic() > deadline:
            holder = _holder(fd)
            os.close(fd)
            raise OutputDirInUse(in_use_message(out, holder))
        time.sleep(0.05)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return RunLock(fd)


def refusal(output_dir) -> Optional[str]:
    """Why a run could not have ``output_dir`` now (it cannot be written, or another run holds it), None if
    it could; found without writing anything: what ``higgs-ddp train`` checks before it launches the ranks."""
    out = Path(output_dir)
    why = unwritable(out)
    if why:
        return cannot_write(out, why)
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run has held this folder yet
    try:
        if _try_lock(fd, fcntl.LOCK_SH):  # dropped again when the file is closed below
            return None
        return in_use_message(out, _holder(fd))
    finally:
        os.close(fd)


def hold_output_dir(output_dir, env: DistEnv) -> Optional[RunLock]:
    """Collective: rank 0 takes the lock; every rank raises what rank 0 met (OutputDirInUse, or
    SharedFilesystemError: output_dir cannot be written). -> the lock on rank 0, None on the others."""
    from higgs_ddp.runtime.distributed import all_gather_objects

    lock, refused = None, None
    if env.is_main:
        try:
            lock = take(output_dir)
        except SharedFilesystemError as e:
            refused = (isinstance(e, OutputDirInUse), str(e))
        except OSError as e:  # the folder was writable a moment ago
            refused = (False, cannot_write(output_dir, e.strerror or str(e)))
    if env.distributed and env.world_size > 1:
        refused = all_gather_objects(refused)[0]
    if refused:
        in_use, message = refused
        raise (OutputDirInUse if in_use else SharedFilesystemError)(message)
    return lock


def cannot_write(out, why: str) -> str:
    return f"output_dir {out} cannot be written ({why}); set output_dir to a folder you can write"


def in_use_message(out: Path, holder: dict) -> str:
    who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
           if {"pid", "host", "started"} <= holder.keys() else "its holder did not say who it is")
    return (f"output_dir {out} is in use by another run ({who}); two runs in one output_dir would write the "
            f"same checkpoints and metrics: wait for it to end or stop it, or set another output_dir")


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _holder(fd: int) -> dict:
    """Who the lock file says holds it ({} when it cannot be read: the holder may be writing it just now)."""
    for _ in range(5):
        try:
            found = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}
