"""Audio kept inside WebDataset tar shards (or datasets files), named by a path like any file's, and work shared
out by shard.

A manifest's audio path may name a member of a shard instead of a file::

    "audio": "shards/emilia-000001.tar#EN_B00001_S00002_W000000.flac@1536"

the shard's path (relative to the manifest, as any path), ``#``, the member's name in the tar, and optionally
``@`` the byte offset of its header, so that reading it is one seek (``manifest import --format webdataset
--no-extract`` writes them with it). Without the offset the shard's headers are read once per process to find
it. Resolved, such a reference stays a ``Path`` (``/data/shards/emilia-000001.tar#KEY.flac@1536``): everything
that keys, sorts, pickles or shows audio by path works unchanged; only what opens the bytes asks
``member_of`` (``audio.py``, the one reading path; ``code_cache.FileHashes``, which hashes the member's bytes
and remembers them by the shard's size and time).

A row of a Hugging Face ``datasets`` file is named the same way, by its number: ``data/train-00000.parquet#17``
(``hf_tables.row_audio`` reads its ``Audio`` value).

Each shard is read by one rank: ``shares`` gives rank r the shards r, r + world, r + 2 world, ... (a file that
is no member is its own "shard"), so N shards on W ranks are read once each whatever N % W is.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from higgs_ddp.errors import HiggsError

MARK = re.compile(r"\.(tar|arrow|parquet)#")  # where the shard's path ends and the member's name begins
TABLES = (".arrow", ".parquet")  # a datasets file: its "members" are its rows, by number (hf_tables.row_audio)
OFFSET = re.compile(r"@(\d+)$")
INDEXED_SHARDS = 8  # shards whose member offsets a process keeps (references written without an offset)


class MemberError(HiggsError, ValueError):
    """A member that cannot be read: ``reason`` as the data report counts it, the message without the path."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Member:
    shard: Path
    name: str  # as the tar names it (a datasets file: the row's number)
    offset: Optional[int] = None  # of its (first) header block


def member_ref(shard: str, name: str, offset: Optional[int] = None) -> str:
    return f"{shard}#{name}" + (f"@{offset}" if offset is not None else "")


def split_ref(text: str) -> tuple:
    """``shards/s.tar#KEY.flac@1536`` -> (``shards/s.tar``, ``KEY.flac@1536``); (text, None) for a plain path."""
    m = MARK.search(text) if "#" in text else None  # (the test first: 10M plain paths pay no regex)
    if m is None:
        return text, None
    return text[: m.end() - 1], text[m.end():]


def member_of(path) -> Optional[Member]:
    """The member ``path`` names, or None for a plain file (a file whose name holds ``.tar#``, ``.arrow#`` or
    ``.parquet#`` cannot be named)."""
    shard, rest = split_ref(str(path))
    if not rest:
        return None
    m = OFFSET.search(rest)
    name, offset = (rest[: m.start()], int(m.group(1))) if m else (rest, None)
    return Member(Path(shard), name, offset) if name else None


def container(path) -> Path:
    """The file ``path``'s bytes are in: its shard, or itself."""
    m = member_of(path)
    return Path(path) if m is None else m.shard


def watched(path) -> Path:
    """What a prepared index watches for a clip (its time, ``corpus_index.folder_signature``): the clip's folder
    (a file added, removed or replaced there), or for a member its shard itself (rewritten in place)."""
    m = member_of(path)
    return Path(path).parent if m is None else m.shard


def shares(items: list, world: int, path_of: Callable = lambda x: x) -> list:
    """``items`` (each with a path, ``path_of``) dealt to ``world`` ranks by shard: the shards in the order their
    first item comes, shard i to rank i % world, each with all its items. -> a list per rank."""
    if not any("#" in str(path_of(item)) for item in items):  # no member: each file its own shard, cheaply
        return [items[r::world] for r in range(world)]
    groups: dict = {}
    for item in items:  # by the shard's path as text: no Path built per member
        groups.setdefault(split_ref(str(path_of(item)))[0], []).append(item)
    out = [[] for _ in range(world)]
    for i, group in enumerate(groups.values()):
        out[i % world].extend(group)
    return out


# ------------------------------------------------------------------------------------------------- reading

_OFFSETS: OrderedDict = OrderedDict()  # (shard, size, mtime) -> {normalised member name: header offset}


def _norm(name: str) -> str:
    return posixpath.normpath(name)  # ``./KEY.flac`` (a tar made with ``tar cf s.tar .``) is ``KEY.flac``


def _index(f, m: Member) -> dict:
    """Every member's header offset in the shard (read once per process, for references without an offset)."""
    import os

    st = os.fstat(f.fileno())
    key = (str(m.shard), st.st_size, st.st_mtime_ns)
    if key not in _OFFSETS:
        f.seek(0)
        offsets = {}
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for info in tf:
                    offsets.setdefault(_norm(info.name), info.offset)
        except (tarfile.TarError, EOFError) as e:  # the members before the damage are still found
            if not offsets:
                raise MemberError("audio_unreadable", f"its shard is not a readable tar archive ({e})") from None
        _OFFSETS[key] = offsets
        while len(_OFFSETS) > INDEXED_SHARDS:
            _OFFSETS.popitem(last=False)
    _OFFSETS.move_to_end(key)
    return _OFFSETS[key]


def _at(f, offset: int):
    """The TarInfo whose header starts at ``offset`` (extended headers included), or None."""
    f.seek(offset)
    try:
        return tarfile.open(fileobj=f, mode="r:").firstmember
    except (tarfile.TarError, EOFError):
        return None


def _read_row(m: Member) -> bytes:
    """The audio bytes of row ``m.name`` of a datasets file: held in the row, or in the file its path names."""
    from higgs_ddp.data.hf_tables import TableError, row_audio

    if not m.name.isdigit():
        raise MemberError("audio_missing", f"{m.name!r} is not a row number of {m.shard.name}")
    try:
        data, path = row_audio(m.shard, int(m.name))
    except FileNotFoundError:
        raise MemberError("audio_missing", f"its file {m.shard.name} is not found") from None
    except TableError as e:
        raise MemberError("audio_unreadable", str(e)) from None
    if data:
        return data
    if not path:
        raise MemberError("audio_missing", f"row {m.name} of {m.shard.name} holds neither audio bytes nor a path")
    try:
        return (m.shard.parent / path).read_bytes()
    except OSError as e:
        raise MemberError("audio_missing" if isinstance(e, FileNotFoundError) else "audio_unreadable",
                          f"row {m.name}'s audio file {path} cannot be read ({e.strerror or type(e).__name__})") \
            from None


def read_member(m: Member) -> bytes:
    """The member's bytes. Its offset, when given, is checked against the name there; a shard rewritten since
    the reference was written is searched by name instead."""
    if m.shard.suffix in TABLES:
        return _read_row(m)
    try:
        f = m.shard.open("rb")
    except FileNotFoundError:
        raise MemberError("audio_missing", f"its shard {m.shard.name} is not found") from None
    except OSError as e:
        raise MemberError("audio_unreadable", f"its shard cannot be read ({e.strerror or type(e).__name__})") \
            from None
    with f:
        info = _at(f, m.offset) if m.offset is not None else None
        if info is None or _norm(info.name) != _norm(m.name):
            offset = _index(f, m).get(_norm(m.name))
            if offset is None:
                raise MemberError("audio_missing", f"its shard {m.shard.name} has no member {m.name}")
            info = _at(f, offset)
        if info is None or not info.isfile():
            raise MemberError("audio_unreadable", f"member {m.name} is not a file in its shard")
        f.seek(info.offset_data)
        data = f.read(info.size)
    if len(data) < info.size:
        raise MemberError("audio_corrupt", f"its shard is cut short inside member {m.name} ({len(data)} of its "
                          f"{info.size} bytes)")
    return data
