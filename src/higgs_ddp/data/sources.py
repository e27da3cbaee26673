"""WebDataset shards and Hugging Face ``datasets`` folders named directly as ``data.manifest`` /
``data.val_manifest``, without a separate ``manifest import`` (issue 31)::

    data:
      manifest: "shards/emilia-{000000..000099}.tar"   # a brace pattern, a .tar, a folder of .tar shards,
                                                        # a datasets folder, or one .arrow/.parquet file

Such a source becomes an ordinary manifest of in-place members (``manifest import --no-extract``'s lines:
``shard.tar#KEY.flac@OFFSET``, ``file.parquet#row``; nothing is extracted), written under the code cache,
``{cache_dir}/sources/{key}/manifest.jsonl``, ``key`` a hash of the source as named (and its layout). The
rest of the data path (pieces, index, warm start) reads that manifest as any other.

The work goes by shard: shard i is imported by rank i % world (its headers and JSON read once, by one
rank), into its own part (``parts/{hash of its path}.json``: the shard's path, size and mtime, its rows and
problems),
so an interrupted import keeps the shards it finished, and a later one redoes only the shards that changed.
Rank 0 then writes the manifest (the parts in the source's order) and ``source.json``: every shard's path,
size and mtime, and the problems. A start lists and stats the shards (no shard is read) and compares them
with ``source.json``: a shard added, removed, or rewritten (another size or mtime) makes the import run
again for that shard, and the manifest is rewritten, which the prepared index then notices as a changed
manifest (``corpus_index``; a shard rewritten under the same members is also noticed by its mtime, as
``members.watched`` makes the index watch a member's shard).

The import's problems (a sample without its JSON, a member that is no audio, a damaged shard: named
``shard.tar:KEY.flac``, with the importer's reasons) go into the data report with the manifest's, so
``data.on_error`` treats them alike: ``error`` refuses the data listing them, ``skip`` counts them by
reason. Ids repeated across shards are found by prepare, as in any manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from higgs_ddp.config import Config, ConfigError
from higgs_ddp.data.hf_tables import TableError, data_files
from higgs_ddp.data.importers import LayoutError, detect, import_corpus, write_manifest
from higgs_ddp.data.manifest import Problem
from higgs_ddp.data.tar_shards import ShardError, is_pattern, shard_paths
from higgs_ddp.runtime.distributed import DistEnv, all_gather_objects, barrier
from higgs_ddp.runtime.files import write_json_atomic

FORMAT = 1
LAYOUTS = ("webdataset", "hf")


class SourceError(LayoutError):
    """A source that cannot be listed (no shards, a pattern naming a missing shard, an unreadable datasets
    folder): one line."""


def source_layout(path: str) -> Optional[str]:
    """"webdataset" or "hf" where ``path`` names such a source, None for anything else (a manifest file, a
    path that is not there, a folder of another layout)."""
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        return "webdataset" if suffix == ".tar" else "hf" if suffix in (".parquet", ".arrow") else None
    if p.is_dir():
        try:
            layout = detect(p)
        except LayoutError:
            return None
        return layout if layout in LAYOUTS else None
    return "webdataset" if is_pattern(path) else None


def _files(spec: str, layout: str) -> tuple:
    """-> (the source's files in its order, the folder they are named from)."""
    try:
        if layout == "webdataset":
            return shard_paths(spec)
        p = Path(spec)
        return data_files(p), p if p.is_dir() else p.parent
    except (ShardError, TableError) as e:
        raise SourceError(f"data.manifest {spec}: {e}") from None


def source_files(spec: str, layout: str) -> list:
    """The files of source ``spec``, in its order (SourceError: none, or a shard of a pattern missing)."""
    return _files(spec, layout)[0]


def _signature(path: Path) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def folder_of(cache: str, spec: str, layout: str) -> Path:
    key = hashlib.sha256(json.dumps([FORMAT, layout, os.path.abspath(spec)]).encode()).hexdigest()[:16]
    return Path(cache) / "sources" / key


def part_path(folder: Path, file: Path) -> Path:
    """A file's part, named by its path: a shard added or removed leaves the other shards' parts as they are."""
    return folder / "parts" / (hashlib.sha256(os.path.abspath(file).encode()).hexdigest()[:16] + ".json")


def _part(files: list, i: int, layout: str, root: Path, manifest: Path, folder: Path) -> None:
    """Import file i into its part, unless a part of that file as it is now is there."""
    part = part_path(folder, files[i])
    sig = _signature(files[i])
    old = _read_json(part)
    if old is not None and old.get("file") == sig and old.get("format") == FORMAT:
        return
    imported = import_corpus(files[i], layout, manifest, extract=False, shown_root=root)
    part.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(part, {"format": FORMAT, "file": sig, "rows": imported.rows,
                             "problems": [[p.where, p.reason, p.message] for p in imported.problems]})


def materialise(spec: str, layout: str, cache: str, env: DistEnv, quiet: bool) -> tuple:
    """Every rank: the manifest of source ``spec`` (imported where ``source.json`` does not match its files as
    they are now, the files dealt to the ranks), and its problems. -> (manifest path, [Problem])."""
    try:
        files, root, listing = *_files(spec, layout), None
    except SourceError as e:  # said on every rank, not left to one while the others wait
        files, root, listing = [], None, str(e)
    listing = next((f for f in all_gather_objects(listing) if f), None)
    if listing:
        raise SourceError(listing)
    folder = folder_of(cache, spec, layout)
    manifest, meta_path = folder / "manifest.jsonl", folder / "source.json"
    want = {"format": FORMAT, "source": os.path.abspath(spec), "layout": layout,
            "files": [_signature(f) for f in files]}
    fresh = None
    if env.is_main:
        meta = _read_json(meta_path)
        fresh = meta is not None and manifest.is_file() and {k: meta.get(k) for k in want} == want
    fresh = all_gather_objects(fresh)[0]
    if not fresh:
        failure = None
        try:
            for i in range(env.rank, len(files), env.world_size):  # by shard: each read by one rank
                _part(files, i, layout, root, manifest, folder)
        except (LayoutError, OSError) as e:  # the other ranks must hear of it, not wait forever
            failure = f"data.manifest {spec}: {e}"
        failures = [f for f in all_gather_objects(failure) if f]
        if failures:
            raise SourceError(failures[0])
        if env.is_main:
            rows, problems = [], []
            for i in range(len(files)):
                part = _read_json(part_path(folder, files[i]))
                if part is None or part.get("file") != want["files"][i]:  # changed while it was imported
                    failure = f"data.manifest {spec}: {files[i]} changed while it was read; run again"
                    break
                rows += part["rows"]
                problems += part["problems"]
            if failure is None:
                current = {part_path(folder, f).name for f in files}
                for stale in (folder / "parts").glob("*.json"):  # the parts of files the source no longer has
                    if stale.name not in current:
                        stale.unlink(missing_ok=True)
                write_manifest(rows, manifest)
                write_json_atomic(meta_path, {**want, "samples": len(rows), "problems": problems})
                if not quiet:
                    print(f"data: {spec}: {len(files)} {'shard' if layout == 'webdataset' else 'file'}(s) read "
                          f"into {manifest}: {len(rows)} sample(s), {len(problems)} left out", flush=True)
        failure = all_gather_objects(failure)[0]
        if failure:
            raise SourceError(failure)
    barrier()
    meta = _read_json(meta_path) or {}
    return str(manifest), [Problem(*p) for p in meta.get("problems", [])]


def resolve(cfg: Config, env: DistEnv, quiet: bool, cache: str) -> tuple:
    """-> (``cfg`` with each source among data.manifest / data.val_manifest replaced by its manifest, and
    data.cache_dir set to ``cache``; the sources' problems). ``cfg`` itself where nothing is a source."""
    d = cfg.data
    listed = [*d.manifest, *d.val_manifest]
    layouts = [source_layout(m) for m in listed]
    if not any(layouts):
        return cfg, []
    if not d.allow_outside_root and d.root is None:
        raise ConfigError("data.allow_outside_root=false with a shard source in data.manifest needs data.root "
                          "(the folder its shards must be in)")
    from higgs_ddp.runtime.shared_fs import check_shared_directory

    check_shared_directory(cache, "data.cache_dir", env)  # rank 0 writes the manifest every rank reads
    paths, problems = [], []
    for spec, layout in zip(listed, layouts):
        if layout is None:
            paths.append(spec)
            continue
        path, found = materialise(spec, layout, cache, env, quiet)
        paths.append(path)
        problems += found
    n = len(d.manifest)
    data = dataclasses.replace(d, manifest=paths[:n], val_manifest=paths[n:], cache_dir=cache)
    return dataclasses.replace(cfg, data=data), problems
