"""The prepared corpus index (issue 31): what a training start needs of its data, in plain columns beside the
code cache, so that a warm start maps a few files instead of parsing manifests and holding a Python record
per clip. Written once: joined from the pieces a cold start prepares over all ranks (piece_prepare.py), or
after a start that loaded the data the full way (``load_data``); read by every later start.

    {cache_dir}/index/{key}/header.json   format, counts, the columns' shapes, change signatures, fingerprint
    {cache_dir}/index/{key}/report.json   the data report of the load that built it (rank 0 copies it)
    {cache_dir}/index/{key}/NAME.npy      the columns: numpy .npy (no pickles), mapped read-only
    {cache_dir}/index/{key}/codes.bin     int16 codes that live in no code-cache shard (.npy code files)

``key`` hashes everything besides the manifests' contents that load_data's result depends on: the data
settings (not num_workers, prefetch_factor, shuffle: they serve batches, they don't make samples), the
manifests' absolute paths, the model's audio shape, the tokenizer (``token_cache.tokenizer_key``), train.seed
under data.reference=same_speaker, and FORMAT (raise it whenever load_data would build other samples from
the same files). Rows are the training samples, then the validation samples, in load_data's order. For n
samples holding m audio contents:

    id_bytes, id_offsets (n + 1)          uint8, int64: sample i's id is id_bytes[id_offsets[i]:id_offsets[i + 1]]
    where_bytes, where_offsets (n + 1)    the same for its "manifest:line"
    positions, seconds, speaker (n)       int64, float64, int32 (-1: none, else header["speakers"][s])
    tok_start, tok_len (n)                int64: its prompt is input_ids/label_ids[tok_start:tok_start + tok_len]
    input_ids, label_ids                  int32 (a prompt that several samples share is stored once)
    audio_offsets (n + 1)                 int64: its audio contents are rows audio_offsets[i]:audio_offsets[i + 1]
    code_file, code_offset (m)            int32 (into header["code_files"]), int64: the byte where the codes start
    code_stride, code_frames (m)          int32: frames per codebook row in that file, frames used (a cut reference)

The codes stay in the code cache's shards (the index points into them), so the index is small: ~100 bytes a
sample plus the distinct prompts. A start that finds a valid index maps the columns (every rank of a node
and every DataLoader worker shares the pages), plans batches from ``positions``, and builds a sample only
when it is fetched (``IndexedRecords.__getitem__``).

What a warm start checks, without reading a manifest line or an audio file:
* each manifest's size and mtime (as git checks its work tree); one changed within 2 s of the index being
  written (the file system's clock may not tell the two apart) is compared by its sha256, kept in the header;
* the mtime of every folder holding a file the manifests name: a file added, removed, renamed, or replaced
  by writing a new file and renaming it over the old one changes its folder's mtime;
* each code shard the index points into: present, with the size it had;
* each index file: present, with the dtype, shape and size the header gives (a file cut short is never
  read as zeros).
Not seen: an audio or .npy file rewritten in place (its folder keeps its mtime). Stat-ing every file costs
~6 us each here (10M clips: a minute per rank), so a warm start does not; after editing files in place,
touch a manifest (or delete {cache_dir}/index) and the next start rebuilds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from higgs_ddp.data.code_cache import code_source, sha256_file
from higgs_ddp.runtime.files import atomic_folder, write_json_atomic
from higgs_ddp.data.records import Record

FORMAT = 1
RACY_NS = 2_000_000_000  # a manifest changed this close to the index's writing is checked by its bytes
NEUTRAL = {"num_workers", "prefetch_factor", "shuffle"}
COLUMNS = {  # name -> dtype
    "id_bytes": np.uint8, "id_offsets": np.int64, "where_bytes": np.uint8, "where_offsets": np.int64,
    "positions": np.int64, "seconds": np.float64, "speaker": np.int32, "tok_start": np.int64, "tok_len": np.int64,
    "input_ids": np.int32, "label_ids": np.int32, "audio_offsets": np.int64, "code_file": np.int32,
    "code_offset": np.int64, "code_stride": np.int32, "code_frames": np.int32,
}
OWN_CODES = "codes.bin"
MAPPED_FILES = 64  # code files kept mapped per process (a mapping holds no file descriptor)


class IndexInvalid(Exception):
    """Why an index cannot be used: one line, naming the file."""


def index_key(cfg, mc, tokenizer_key: Optional[str], cache: str) -> str:
    d = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in NEUTRAL}
    d["manifest"] = [os.path.abspath(p) for p in cfg.data.manifest]
    d["val_manifest"] = [os.path.abspath(p) for p in cfg.data.val_manifest]
    d["cache_dir"] = os.path.abspath(cache)
    material = {"format": FORMAT, "data": d, "tokenizer": tokenizer_key,
                "audio": [mc.audio_num_codebooks, mc.audio_codebook_size, mc.use_delay_pattern,
                          mc.encode_audio_in_tokens],
                "seed": cfg.train.seed if cfg.data.reference == "same_speaker" else None}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- signatures: what the index was built from ----

def manifest_signature(paths: list) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": sha256_file(Path(p))})
    return out


def folder_signature(folders) -> dict:
    out = {}
    for f in sorted({str(f) for f in folders}):
        try:
            out[f] = os.stat(f).st_mtime_ns
        except OSError:  # a folder that does not exist (yet): its files were reported missing
            out[f] = None
    return out


# ---- writing ----

def _strings(values: list) -> tuple:
    raw = [v.encode() for v in values]
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum([len(b) for b in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw), np.uint8), offsets


def record_columns(records: list, num_codebooks: int, own_codes) -> tuple:
    """-> (columns, code files, speakers) for ``records`` (dataset.Record). Codes mapped from a code-cache
    shard are pointed at; others are appended to ``own_codes`` (a binary file object)."""
    n = len(records)
    cols = {k: np.zeros(n, COLUMNS[k]) for k in ("positions", "seconds", "speaker", "tok_start", "tok_len")}
    cols["id_bytes"], cols["id_offsets"] = _strings([r.id for r in records])
    cols["where_bytes"], cols["where_offsets"] = _strings([r.where for r in records])
    speakers: dict = {}
    prompts: dict = {}  # (address, length) of a prompt's ids and labels -> its start: shared prompts stored once
    ids, labels, used = [], [], 0
    files: dict = {}  # path -> index
    code_rows = []  # (file, offset, stride, frames)
    audio_offsets = np.zeros(n + 1, np.int64)
    own_at = 0
    for i, r in enumerate(records):
        cols["positions"][i], cols["seconds"][i] = r.positions, r.seconds
        cols["speaker"][i] = -1 if r.speaker is None else speakers.setdefault(r.speaker, len(speakers))
        where = (r.input_ids.ctypes.data, r.label_ids.ctypes.data, len(r.input_ids))
        start = prompts.get(where)
        if start is None:
            start = prompts[where] = used
            ids.append(r.input_ids)
            labels.append(r.label_ids)
            used += len(r.input_ids)
        cols["tok_start"][i], cols["tok_len"][i] = start, len(r.input_ids)
        for c in r.codes:
            src = code_source(c)
            if src is not None and c.strides[1] == 2 and c.shape[0] == num_codebooks:
                path, offset = src
                code_rows.append((files.setdefault(str(path), len(files)), offset, c.strides[0] // 2, c.shape[1]))
            else:  # held in memory: kept in the index itself
                data = np.ascontiguousarray(c, np.int16).tobytes()
                own_codes.write(data)
                code_rows.append((files.setdefault(OWN_CODES, len(files)), own_at, c.shape[1], c.shape[1]))
                own_at += len(data)
        audio_offsets[i + 1] = len(code_rows)
    cols["input_ids"] = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    cols["label_ids"] = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    cols["audio_offsets"] = audio_offsets
    rows = np.asarray(code_rows, np.int64).reshape(-1, 4)
    for j, name in enumerate(("code_file", "code_offset", "code_stride", "code_frames")):
        cols[name] = rows[:, j].astype(COLUMNS[name])
    return cols, list(files), list(speakers)


def write_index(folder: Path, cols: dict, meta: dict, report: dict, write_codes=None, finish=None) -> None:
    """Write the index whole under a temporary name, then put it in place: a reader finds all of it or none.
    ``cols``: name -> array, or -> a function writing that column's .npy file at the path it is given.
    ``meta``: the header's other fields (code_files as paths; their sizes are taken here); ``write_codes``:
    writes codes.bin into the folder it is given, when the index holds codes of its own; ``finish``: the
    folder written so far -> more header fields (what is computed from the index's own files)."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        if write_codes is not None:
            write_codes(tmp)
        specs = {}
        for name, dtype in COLUMNS.items():
            if callable(cols[name]):  # writes the .npy file itself (a column bigger than memory should hold)
                cols[name](tmp / f"{name}.npy")
                shape = np.load(tmp / f"{name}.npy", mmap_mode="r", allow_pickle=False).shape
            else:
                arr = np.ascontiguousarray(cols[name], dtype)
                np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
                shape = arr.shape
            specs[name] = {"shape": list(shape), "bytes": (tmp / f"{name}.npy").stat().st_size}
        files = []
        for p in meta["code_files"]:
            on_disk = tmp / OWN_CODES if p == OWN_CODES else Path(p)
            files.append({"path": p, "size": on_disk.stat().st_size})
        write_json_atomic(tmp / "report.json", report)
        more = finish(tmp, files) if finish is not None else {}
        header = {**meta, **more, "format": FORMAT, "columns": specs, "code_files": files,
                  "built_ns": time.time_ns()}
        write_json_atomic(tmp / "header.json", header)


# ---- reading ----

def check_index(folder: Path) -> dict:
    """The header of a usable index in ``folder``; IndexInvalid (one line) otherwise. No manifest line, audio
    file or column value is read: stat calls, and the .npy files' own headers."""
    folder = Path(folder)
    try:
        header = json.loads((folder / "header.json").read_text())
        specs = header["columns"]
        fmt = header["format"]
    except FileNotFoundError:
        raise IndexInvalid(f"no prepared index for this data in {folder.parent} yet") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexInvalid(f"index file {folder / 'header.json'} is damaged ({type(e).__name__}: {e})") from None
    if fmt != FORMAT:
        raise IndexInvalid(f"index {folder} was written in index format {fmt}, this version reads format {FORMAT}")
    for name, dtype in COLUMNS.items():
        path = folder / f"{name}.npy"
        try:
            size = path.stat().st_size
            spec = specs[name]
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype != dtype or list(arr.shape) != spec["shape"] or size != spec["bytes"]:
                raise ValueError(f"{arr.dtype} {list(arr.shape)}, {size} bytes; the header says {np.dtype(dtype)} "
                                 f"{spec['shape']}, {spec['bytes']} bytes")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexInvalid(f"index file {path} is damaged ({e})") from None
    for m in header["manifests"]:
        try:
            st = os.stat(m["path"])
        except OSError:
            raise IndexInvalid(f"manifest {m['path']} is gone since the index was built") from None
        changed = (st.st_size, st.st_mtime_ns) != (m["size"], m["mtime_ns"])
        if not changed and header["built_ns"] - st.st_mtime_ns < RACY_NS:  # too close to tell by the clock
            changed = sha256_file(Path(m["path"])) != m["sha256"]
        if changed:
            raise IndexInvalid(f"manifest {m['path']} changed since the index was built")
    for f, mtime in header["folders"].items():
        try:
            now = os.stat(f).st_mtime_ns
        except OSError:
            now = None
        if now != mtime:
            what = ("audio folder", "a file added, removed or replaced") if f.endswith(os.sep) or os.path.isdir(f) \
                else ("shard", "rewritten")  # data/members.watched: a member's shard itself
            raise IndexInvalid(f"{what[0]} {f} changed since the index was built ({what[1]})")
    for c in header["code_files"]:
        path = folder / OWN_CODES if c["path"] == OWN_CODES else Path(c["path"])
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        if size != c["size"]:
            raise IndexInvalid(f"code file {path} is missing or changed since the index was built")
    return header


class CorpusIndex:
    """The columns of a checked index, mapped; samples are built one at a time."""

    def __init__(self, folder: Path, header: dict):
        self.folder, self.header = Path(folder), header
        self.cols = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                     for name in COLUMNS}
        self.code_files = [str(self.folder / OWN_CODES) if c["path"] == OWN_CODES else c["path"]
                           for c in header["code_files"]]
        self.speakers = header["speakers"]
        self.num_codebooks = header["num_codebooks"]
        self._mapped: OrderedDict = OrderedDict()

    def __getstate__(self):  # a DataLoader worker started by spawn maps the files again, copies nothing
        return {"folder": self.folder, "header": self.header}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["header"])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.cols.values())

    def _file(self, i: int) -> np.ndarray:
        raw = self._mapped.pop(i, None)
        if raw is None:
            path = self.code_files[i]
            raw = torch.from_file(path, shared=False, size=os.stat(path).st_size, dtype=torch.uint8).numpy()
        self._mapped[i] = raw
        if len(self._mapped) > MAPPED_FILES:
            self._mapped.popitem(last=False)
        return raw

    def _string(self, name: str, i: int) -> str:
        o = self.cols[f"{name}_offsets"]
        return self.cols[f"{name}_bytes"][o[i]:o[i + 1]].tobytes().decode()

    def record(self, i: int):
        c = self.cols
        a, n = int(c["tok_start"][i]), int(c["tok_len"][i])
        codes = []
        for j in range(int(c["audio_offsets"][i]), int(c["audio_offsets"][i + 1])):
            stride, frames, at = int(c["code_stride"][j]), int(c["code_frames"][j]), int(c["code_offset"][j])
            raw = self._file(int(c["code_file"][j]))
            full = raw[at:at + 2 * self.num_codebooks * stride].view(np.int16).reshape(self.num_codebooks, stride)
            codes.append(full[:, :frames])
        s = int(c["speaker"][i])
        return Record(self._string("where", i), self._string("id", i), c["input_ids"][a:a + n],
                      c["label_ids"][a:a + n], codes, int(c["positions"][i]), float(c["seconds"][i]),
                      None if s < 0 else self.speakers[s])


class IndexedRecords(Sequence):
    """Rows [lo, hi) of an index, standing where load_data's list of records stands: a record is built when
    it is asked for, and the batching plan reads ``lengths`` without building any."""

    def __init__(self, index: CorpusIndex, lo: int, hi: int, fingerprint: Optional[dict]):
        self.index, self.lo, self.hi, self._fingerprint = index, lo, hi, fingerprint

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.index.record(self.lo + i)

    @property
    def lengths(self) -> np.ndarray:
        return self.index.cols["positions"][self.lo:self.hi]

    def fingerprint(self) -> Optional[dict]:
        """As dataset.fingerprint computes it, kept when the index was built (None: compute it)."""
        return self._fingerprint
