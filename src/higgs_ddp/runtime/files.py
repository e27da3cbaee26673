"""Files and folders that exist whole or not at all: written beside their place under a temporary name, then
renamed into it. A reader (another rank, a DataLoader worker, an image viewer, a resumed run) never sees half
of one, and a failed write leaves nothing behind.

``durable``: also fsync the data, and the folder the rename happened in, before returning, so that the file
survives a power cut or a preempted node, not only a crashed process. Checkpoints and a run's weights are
durable; caches (rebuilt when missing) and reports are not, since fsync costs a disk flush each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path


def fsync_path(path) -> None:
    """Flush one file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """Flush every file and folder under ``path``, ``path`` included."""
    path = Path(path)
    for p in path.rglob("*"):
        fsync_path(p)
    fsync_path(path)


def temporary_name(path) -> Path:
    """A hidden name beside ``path``, unique to this writer."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_file(path, durable: bool = False):
    """``with atomic_file(p) as tmp: write to tmp`` -> ``p`` holds what was written, whole, or is unchanged."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str, durable: bool = False) -> None:
    with atomic_file(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path, obj, durable: bool = False, indent=None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + ("\n" if indent else ""), durable)


@contextlib.contextmanager
def atomic_folder(path, durable: bool = False):
    """``with atomic_folder(p) as tmp: fill the (new, empty) folder tmp`` -> ``p`` is that folder, whole. An
    existing ``p`` is replaced: set aside, the new one renamed in, then the old one removed, so that at every
    moment ``p`` is the old folder or the new one."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
