"""Before anything is written: does every rank, on every node, see the same directory as rank 0?

A multi-node run whose ``output_dir`` (or code cache) is a local disk on each node trains and then fails
much later: rank 0's checkpoint misses the other nodes' shards, a resume finds nothing on node 1, each
node encodes the corpus on its own. So at start rank 0 writes a file holding a random token into the
directory, every rank looks for that file at its own path for the directory, and every rank learns the
answer of every other: all of them stop together, with one line naming the nodes that do not see it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from higgs_ddp.errors import HiggsError

if TYPE_CHECKING:  # (imported where used: `higgs-ddp train` checks a folder with unwritable before torch loads)
    from higgs_ddp.runtime.distributed import DistEnv

# NFS and other network filesystems cache "no such file" for a few seconds (lookupcache, actimeo): a rank
# that misses the file looks again, listing the directory (which refreshes the cache) until this passes.
VISIBLE_WITHIN_S = 5.0


class SharedFilesystemError(HiggsError, RuntimeError):
    """A directory that must be shared is not the same on every rank; every rank raises it."""


def check_shared_directory(path, setting: str, env: DistEnv, wait_s: float = VISIBLE_WITHIN_S) -> list[str]:
    """Raise SharedFilesystemError on every rank unless every rank's ``path`` is rank 0's directory.

    ``setting`` names the config key the user sets (``output_dir``, ``data.cache_dir``). A collective:
    every rank calls it, with its own config's path. Returns each rank's host name (by rank); one
    process: only that it can write there."""
    from higgs_ddp.runtime.distributed import all_gather_objects

    if env.world_size == 1 or not env.distributed:
        why = unwritable(path)
        if why:
            raise SharedFilesystemError(f"{setting} {path} cannot be written ({why}); set {setting} to a folder "
                                        f"you can write")
        return [socket.gethostname()]
    path = Path(path)
    token, probe = "", None
    if env.is_main:  # the directory is rank 0's to create (as it creates the run files)
        token = uuid.uuid4().hex
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".higgs-ddp-shared-check-{token}"
            probe.write_text(token)
        except OSError as e:
            token = f"unwritable: {e.strerror or e}"
    host = socket.gethostname()
    (token0, host0, path0), *_ = all_gather_objects((token, host, str(path)))  # rank 0 wrote it (or failed)
    if token0.startswith("unwritable: "):
        seen = False
    else:
        seen = env.is_main or _sees(path / f".higgs-ddp-shared-check-{token0}", token0, wait_s)
    answers = all_gather_objects((seen, host, env.rank, str(path)))  # also: everyone has looked
    if probe is not None:
        probe.unlink(missing_ok=True)
    if token0.startswith("unwritable: "):
        raise SharedFilesystemError(f"{setting} {path0} cannot be written on node {host0} (rank 0): "
                                    f"{token0.split(': ', 1)[1]}; give a directory every node can write")
    blind = [(h, r, p) for ok, h, r, p in answers if not ok]
    if blind:
        nodes = sorted({h for h, _, _ in blind})
        ranks = ", ".join(f"{h} (rank {r}: {p})" for h, r, p in blind[:8]) + (" ..." if len(blind) > 8 else "")
        raise SharedFilesystemError(
            f"{setting} is not the same directory on every node: rank 0 on {host0} wrote a file into {path0} "
            f"that {len(blind)} rank(s) on node(s) {', '.join(nodes)} do not see at their {setting}: {ranks}; "
            f"put {setting} on a filesystem every node mounts, at the path each node's config gives")
    return [h for _, h, _, _ in answers]


def unwritable(folder) -> str | None:
    """Why this process could not write into ``folder`` (None: it can), found by trying, without leaving
    anything behind: a nameless temporary file in it, or in the nearest folder above that exists when
    ``folder`` does not (it would be created there). Trying is the only test that holds for root, whom
    permission bits do not stop, and for read-only mounts."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def describe_nodes(hosts: list[str]) -> str:
    """'2 rank(s) on 2 node(s): a (rank 0), b (rank 1)'; more ranks a node: '... a (ranks 0-7), b (ranks 8-15)'."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    shown = [f"{h} (rank{'s' if len(r) > 1 else ''} {_span(r)})" for h, r in list(ranks.items())[:8]]
    more = f", ... ({len(ranks) - 8} more)" if len(ranks) > 8 else ""
    return f"{len(hosts)} rank(s) on {len(ranks)} node(s): {', '.join(shown)}{more}"


def _span(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else (f"{ranks[0]}-{ranks[-1]}" if ranks == list(
        range(ranks[0], ranks[-1] + 1)) else ",".join(map(str, ranks)))


def _sees(probe: Path, token: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        try:
            os.listdir(probe.parent)  # refreshes a network filesystem's cached "no such file"
        except OSError:
            pass
        time.sleep(0.2)
