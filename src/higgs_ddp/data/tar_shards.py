"""WebDataset tar shards, read with the standard library's ``tarfile``.

A WebDataset shard is a plain tar whose members are grouped into samples by key: ``KEY.flac`` + ``KEY.json``
(Emilia: ``KEY.mp3`` + ``KEY.json``). The key is the member's path up to the first dot of its file name and
the rest is the extension, as the ``webdataset`` library splits them; a sample is a run of consecutive members
with the same key.

Why not the ``webdataset`` library (1.0.2, probed in a scratch install, 2026-12): it is a training-time
pipeline (URLs through pipes, shuffling, decoders), and what it does with a damaged shard is what we must not
do. A shard cut at a member boundary, or with a garbage header in the middle, reads as a shorter complete
shard: the samples after the damage are dropped without a word (``tarfile`` itself, which it reads with,
stops there silently). A cut inside a member's data raises ``tarfile.ReadError`` with a tuple for a message.
Here ``read_shard`` checks that the archive ends with its end-of-archive blocks and names the member reached,
and a sample's problems are the importer's to name by shard and member. Local paths are all we read, so the
library's URL streaming buys nothing; its brace patterns (``shard-{000000..000099}.tar``) are ``expand_braces``
below. So: no new dependency.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

from higgs_ddp.errors import HiggsError

BRACES = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"(\d+)\.\.(\d+)")
BLOCK = tarfile.BLOCKSIZE  # 512: a tar ends with (at least one) block of zeros


class ShardError(HiggsError, ValueError):
    """The shards named cannot be listed (a pattern that does not parse, no shard found): one line."""


@dataclass
class Sample:
    key: str
    members: dict  # extension as written (``flac``, ``json``) -> the member's bytes
    offsets: dict = field(default_factory=dict)  # extension -> the byte offset of the member's header

    def name(self, ext: str) -> str:
        return f"{self.key}.{ext}"


@dataclass
class Damage:
    member: Optional[str]  # the member it concerns (None: the shard as a whole)
    reason: str
    message: str


# --------------------------------------------------------------------------------------------- listing


def is_pattern(src: str) -> bool:
    return BRACES.search(src) is not None


def _alternatives(body: str, pattern: str) -> list:
    """``000..009`` -> 000, 001, ..., 009 (zero-padded when either end is: the shard writers' names); ``a,b``."""
    m = RANGE.fullmatch(body)
    if m:
        a, b = m.groups()
        width = max(len(a), len(b)) if any(len(x) > 1 and x.startswith("0") for x in (a, b)) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]
    if "," in body:
        return body.split(",")
    raise ShardError(f"{pattern}: {{{body}}} is neither a range ({{000000..000009}}) nor a list ({{a,b}})")


def expand_braces(pattern: str) -> list:
    """The names a brace pattern stands for, in its order: ``s-{0..2}.tar`` -> s-0.tar, s-1.tar, s-2.tar; several
    braces multiply. Nested braces are refused rather than guessed at."""
    m = BRACES.search(pattern)
    head = pattern if m is None else pattern[: m.start()]
    if "{" in head or "}" in head:
        raise ShardError(f"{pattern}: unbalanced or nested braces (one level: 'shard-{{000..009}}.tar')")
    if m is None:
        return [pattern]
    tails = expand_braces(pattern[m.end():])
    return [head + alt + tail for alt in _alternatives(m.group(1), pattern) for tail in tails]


def shard_paths(src: str) -> tuple:
    """-> (the shards ``src`` names, in order; the folder to show their names relative to). ``src``: a .tar
    file, a folder (every .tar under it, by path), or a brace pattern, each of whose shards must exist."""
    path = Path(src)
    if path.is_dir():
        shards, root = sorted(p for p in path.rglob("*.tar") if p.is_file()), path
        if not shards:
            raise ShardError(f"{src}: no .tar shards in this folder or below it")
    elif path.is_file():
        shards, root = [path], path.parent
    elif is_pattern(src):
        shards, root = [Path(p) for p in expand_braces(src)], Path(src[: src.index("{")] + "x").parent
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise ShardError(f"{src}: {len(missing)} of its {len(shards)} shards not found (first: {missing[0]})")
    else:
        raise ShardError(f"{src}: not found")
    by_stem: dict = {}
    for p in shards:  # a shard's audio is extracted into a folder named by its stem
        if by_stem.setdefault(p.stem, p) != p:
            raise ShardError(f"{src}: two shards named {p.stem}: {by_stem[p.stem]} and {p}")
    return shards, root


# --------------------------------------------------------------------------------------------- reading


def split_name(name: str) -> tuple:
    """``a/b/KEY.flac`` -> (``a/b/KEY``, ``flac``); (None, None) for a name without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), ext


def _end_is_marked(f, offset: int) -> bool:
    """Whether the archive goes on, where ``tarfile`` stopped, with the zero block that ends a tar. ``tarfile``
    stops silently at a cut between members and at an unreadable header alike."""
    f.seek(offset)
    return f.read(BLOCK) == bytes(BLOCK)


def _members(tf: tarfile.TarFile) -> Iterator[Union[tuple, Damage]]:
    """(key, ext, TarInfo) for each regular member (folders are skipped), a Damage for what is no sample's part."""
    for info in tf:
        if info.isdir():
            continue
        if not info.isfile():
            yield Damage(info.name, "not_a_file", f"member {info.name} is a link or special file, not a file")
            continue
        key, ext = split_name(info.name)
        if key is None:
            yield Damage(info.name, "not_a_sample", f"member {info.name} is not named KEY.EXT (no sample's part)")
            continue
        yield key, ext, info


def read_shard(path: Path) -> Iterator[Union[Sample, Damage]]:
    """The samples of one shard, in order. A member that is not part of a sample is a Damage; a shard that cannot
    be opened, or that ends before its end-of-archive block (cut short, a damaged header), is one Damage naming
    the member reached, and the sample being read there is not given (it may have lost members)."""
    try:
        f = path.open("rb")
    except OSError as e:
        yield Damage(None, "shard_unreadable", f"cannot be read ({e.strerror or type(e).__name__})")
        return
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            yield Damage(None, "shard_unreadable", f"not readable as a tar archive ({e})")
            return
        current: Optional[Sample] = None  # the sample being read
        reached, reading = None, None  # the last member read whole; the one whose data is being read
        try:
            for item in _members(tf):
                if isinstance(item, Damage):
                    reached = item.member
                    yield item
                    continue
                key, ext, info = item
                if current is not None and current.key != key:
                    yield current  # a sample is whole when the next key begins
                    current = None
                current = current or Sample(key, {})
                if ext in current.members:
                    yield Damage(info.name, "duplicate_key", f"member {info.name} appears twice in a row")
                    continue
                reading = info.name
                current.members[ext] = tf.extractfile(info).read()
                current.offsets[ext] = info.offset
                reached, reading = reading, None
            whole, why = _end_is_marked(f, tf.offset), "no further member header, no end-of-archive block"
        except (tarfile.TarError, EOFError, OSError) as e:  # a cut inside a member's data, an I/O error
            whole, why = False, str(e) or type(e).__name__
        if whole:
            if current is not None:
                yield current
            return
        where = f"at member {reading}" if reading else f"after member {reached}" if reached else "at its start"
        lost = f"sample {current.key} and any after it are" if current is not None else "what follows is"
        yield Damage(reading or reached, "shard_corrupt", f"cut short or corrupt {where} ({why}): {lost} not read")
