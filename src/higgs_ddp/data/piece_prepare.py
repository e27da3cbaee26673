"""A cold start's preparation split over the ranks, in pieces that survive an interruption (issue 31).

The manifests' lines are cut into about PIECES pieces, of at most MAX_LINES lines (rank 0 finds the line
boundaries; the plan is the same for any number of ranks, so a prepare resumed on another number keeps
its pieces); a cut that would split the lines of one tar shard's (or datasets file's) members moves past
them, so that each shard is read by one rank (a piece then holds more lines, by up to a shard's). Rank r builds pieces r, r + world, ...: it parses its lines, hashes
and (where the code cache lacks them) encodes their audio, tokenizes their prompts, and measures their
samples, everything a training sample needs that depends on its own line only, and writes the piece whole
(``{cache_dir}/index/{key}.pieces/piece-NNNNNN.npz``, numpy arrays, no pickles) as soon as it is done. A
rerun after a kill keeps every piece that was finished (plan.json: the manifests' sizes and mtimes, so a
changed manifest starts over) and builds the rest.

Rank 0 then joins the pieces (piece_join.py): the checks that need the whole corpus (duplicate ids,
validation samples that are training samples) run on 64-bit hashes of the ids, paths and contents, sorted
and compared, candidates confirmed on the strings; the columns are gathered in load_data's order into the
index the full way would write (corpus_index.py), byte for byte. Every rank then maps it.

Not in pieces: ``data.reference: same_speaker`` (pairing looks at every clip of a speaker at once), a slow
tokenizer (no index), a manifest listed twice: those load the full way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from higgs_ddp.config import Config
from higgs_ddp.data.code_cache import CodeCache, FileHashes
from higgs_ddp.data.corpus_index import record_columns
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.data.members import watched
from higgs_ddp.data.phases import Phases
from higgs_ddp.data.references import without_reference
from higgs_ddp.data.token_cache import TokenCache, entry_key
from higgs_ddp.runtime.distributed import DistEnv, all_gather_objects, barrier
from higgs_ddp.runtime.files import atomic_file, write_json_atomic

FORMAT = 1
MAX_LINES = 20_000
PIECES = 64  # a corpus of fewer than PIECES * MAX_LINES lines is cut in about this many pieces: ranks share it
# Lines per piece, where set (tuning, tests); by default from the corpus's size (``plan``).
PIECE_LINES = int(os.environ.get("HIGGS_DDP_PIECE_LINES", 0)) or None
# Test hook (tests/distributed/test_piece_prepare.py): seconds to sleep after writing each piece, so that a
# test can kill a prepare between two pieces.
PAUSE_S = float(os.environ.get("HIGGS_DDP_TEST_PIECE_PAUSE_S", 0))


def applies(cfg: Config) -> bool:
    """Whether the cold start goes in pieces (see the module's text for what does not)."""
    paths = [os.path.abspath(p) for p in [*cfg.data.manifest, *cfg.data.val_manifest]]
    return cfg.data.reference != "same_speaker" and len(set(paths)) == len(paths)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def strings(values: list) -> tuple:
    raw = [v.encode() for v in values]
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum([len(b) for b in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw), np.uint8), offsets


def line_starts(path: str, block: int = 1 << 24) -> np.ndarray:
    """Byte offset of every line's start (a last line without a newline included)."""
    out, at = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            out.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + at + 1)
            at += len(chunk)
    starts = np.concatenate(out)
    return starts[starts < at] if at else starts[:0]


def plan(cfg: Config, lines: Optional[int] = None) -> dict:
    """The pieces: (manifest number, validation?, first byte, end byte, first line number), in load_data's
    order, and the manifests they cut (size, mtime)."""
    pieces, manifests = [], []
    listed = [(m, False) for m in cfg.data.manifest] + [(m, True) for m in cfg.data.val_manifest]
    found = [line_starts(m) for m, _ in listed]
    # the number of ranks plays no part: a prepare resumed on another number of ranks keeps its pieces
    lines = lines or max(1, min(MAX_LINES, -(-sum(len(s) for s in found) // PIECES)))
    for i, ((m, is_val), starts) in enumerate(zip(listed, found)):
        st = os.stat(m)
        manifests.append({"path": os.path.abspath(m), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        if not len(starts):  # an empty manifest: a piece of no lines (its arrays say what it holds: nothing)
            pieces.append([i, is_val, 0, 0, 1])
        with open(m, "rb") as f:
            line = _line_reader(f, starts, st.st_size)
            a = 0
            while a < len(starts):
                b = min(a + lines, len(starts))
                shard = _shard_of(line(b - 1)) if b < len(starts) else None
                while shard is not None and b < len(starts) and _shard_of(line(b)) == shard:
                    b += 1  # a shard's lines stay in one piece: its tar is read by one rank, once
                pieces.append([i, is_val, int(starts[a]), int(starts[b]) if b < len(starts) else st.st_size, a + 1])
                a = b
    return {"format": FORMAT, "manifests": manifests, "lines": lines, "pieces": pieces}


_SHARD = re.compile(rb'"([^"]*\.(?:tar|arrow|parquet))#')  # a line's first member's shard (members.MARK)


def _shard_of(line: bytes):
    """The shard a manifest line's first audio member is in, or None (a line of plain files)."""
    m = _SHARD.search(line) if b"#" in line else None
    return None if m is None else m.group(1)


def _line_reader(f, starts: np.ndarray, size: int):
    def line(k: int) -> bytes:
        f.seek(int(starts[k]))
        return f.read((int(starts[k + 1]) if k + 1 < len(starts) else size) - int(starts[k]))
    return line


class PieceBuilder:
    """One rank's pieces, built with one token cache, code cache and file-hash memory for all of them."""

    def __init__(self, cfg: Config, env: DistEnv, tokenizer, mc, cache: str, quiet: bool, phases: Phases, full):
        from higgs_ddp.data.prepare import cache_identity

        d = cfg.data
        self.cfg, self.env, self.tokenizer, self.mc, self.quiet = cfg, env, tokenizer, mc, quiet
        self.phases, self.full = phases, full
        self.codec = None  # loaded when a piece has audio to encode, then kept for the next
        self.stats: dict = {}
        self.listed = list(d.manifest) + list(d.val_manifest)
        self.tokens = TokenCache(cache, tokenizer)
        self.hashes = FileHashes(cache)
        self.codes = CodeCache(cache, cache_identity(d.codec, d.codec_revision, d.audio))

    def _codec(self):
        from higgs_ddp.data.codec import load_codec

        if self.codec is None:
            self.codec = load_codec(self.cfg.data.codec, self.cfg.data.codec_revision, device=self.env.device)
        return self.codec

    def _prepare(self, refs: list):
        from higgs_ddp.data.prepare import prepare_local

        d = self.cfg.data
        prep = prepare_local(refs, self.codes, self.hashes, d.codec, d.codec_revision, d.max_audio_seconds,
                             self.env, d.num_workers, True, d.audio, self._codec)
        self.stats, self.prep = prep.stats, prep
        return prep

    def build(self, piece: list) -> dict:
        """-> the piece's arrays: every parsed entry (what the join checks across pieces, and its record's
        row or its own problems), the records' columns, its line problems."""
        d, mc, full = self.cfg.data, self.mc, self.full
        m, is_val, start, stop, first = piece
        entries, line_problems = read_manifest(self.listed[m], d.root, d.allow_outside_root, start, stop, first)
        # a member: its shard; a plain file (no "#": members.watched's own test): its folder, without a Path each
        folders = {os.path.dirname(p) if "#" not in p else str(watched(p))
                   for p in {str(r.path) for e in entries for r in e.audio}}
        replaced = np.zeros(len(entries), bool)
        if d.reference != "given":
            kept = [without_reference(e) for e in entries]
            replaced = np.array([a is not b for a, b in zip(kept, entries)], bool)
            entries = kept
        self.phases.mark("manifest")
        self.stats, self.prep = {}, None
        found, failed, seconds, content = full.audio_codes(entries, self.cfg, self.env, mc.audio_num_codebooks,
                                                       mc.audio_codebook_size, True, Phases(), self._prepare)
        self.phases.mark("audio and codes")
        keys = [entry_key(e.chatml) for e in entries]
        todo = list({k: (k, e.chatml, e.id) for k, e in zip(keys, entries) if k not in self.tokens}.values())
        untokenized = self.tokens.tokenize(todo, write=False) if todo else {}  # (the piece keeps them meanwhile)
        self.phases.mark("tokens")
        records, problems = full.records(entries, keys, found, failed, seconds, self.tokens, untokenized,
                                     self.tokenizer, mc, d.max_tokens_per_batch)
        row_of = {r.where: i for i, r in enumerate(records)}
        own = io.BytesIO()
        cols, files, speakers = record_columns(records, mc.audio_num_codebooks, own)
        key_of = dict(zip((e.where for e in entries), keys))
        out = {f"r_{k}": v for k, v in cols.items()}
        out["r_tokkey"] = np.frombuffer(b"".join(key_of[r.where] for r in records), np.uint8).reshape(-1, 16)
        out["own_codes"] = np.frombuffer(own.getvalue(), np.uint8)
        out["e_where_b"], out["e_where_o"] = strings([e.where for e in entries])
        out["e_id_b"], out["e_id_o"] = strings([e.id for e in entries])
        out["e_id_hash"] = np.array([hash64(e.id) for e in entries], np.uint64)
        out["e_id_given"] = np.array([e.id_given for e in entries], bool)
        out["e_pick"] = np.array([bool(d.val_fraction) and full.in_val(e.id, d.val_fraction) for e in entries], bool)
        out["e_replaced"] = replaced
        out["e_record"] = np.array([row_of.get(e.where, -1) for e in entries], np.int64)
        out["e_line"] = np.array([int(e.where.rpartition(":")[2]) for e in entries], np.int64)
        learned = [r for e in entries for r in e.learned]
        out["l_off"] = np.zeros(len(entries) + 1, np.int64)
        np.cumsum([len(e.learned) for e in entries], out=out["l_off"][1:])
        paths = [str(r.path) for r in learned]
        contents = [f"c:{content[r.path]}" if r.path in content else f"p:{r.path}" for r in learned]
        out["l_path_b"], out["l_path_o"] = strings(paths)
        out["l_shown_b"], out["l_shown_o"] = strings([r.shown for r in learned])
        out["l_key_b"], out["l_key_o"] = strings(contents)
        out["l_path_hash"] = np.array([hash64(p) for p in paths], np.uint64)
        out["l_key_hash"] = np.array([hash64(c) for c in contents], np.uint64)
        local: dict = {}
        for p in problems:
            local.setdefault(p.where, []).append([p.reason, p.message])
        meta = {"format": FORMAT, "piece": piece, "files": files, "speakers": speakers,
                "problems": {str(i): local[e.where] for i, e in enumerate(entries) if e.where in local},
                "line_problems": [[int(p.where.rpartition(":")[2]), p.where, p.reason, p.message]
                                  for p in line_problems],
                "folders": {f: _mtime(f) for f in sorted(folders)}, "stats": self.stats,
                "code_sizes": {f: os.stat(f).st_size for f in files if f != "codes.bin"}}
        out["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        out.update(file_arrays(self.prep))
        return out


def file_arrays(prep) -> dict:
    """Per audio file a piece prepared (``prep``: its Prepared, or None), what the summary line counts, so that
    the join counts a file or recording two pieces name once (piece_join.summary_stats): hashes of its path and
    of its content (its path where it did not hash), whether it failed, whether its content was new to the
    cache and whether that was encoded, its usable seconds."""
    paths = sorted({*prep.content, *prep.problems}, key=str) if prep is not None else []
    content = prep.content if prep is not None else {}
    return {
        "f_path_hash": np.array([hash64(str(p)) for p in paths], np.uint64),
        "f_key_hash": np.array([hash64(f"c:{content[p]}" if p in content else f"p:{p}") for p in paths], np.uint64),
        "f_hashed": np.array([p in content for p in paths], bool),
        "f_failed": np.array([p in prep.problems for p in paths], bool),
        "f_new": np.array([content.get(p) in prep.new_contents for p in paths], bool),
        "f_encoded": np.array([content.get(p) in prep.encoded_contents for p in paths], bool),
        "f_seconds": np.array([prep.seconds.get(p, 0.0) for p in paths], np.float64),
    }


def _mtime(folder: str):
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def piece_path(folder: Path, i: int) -> Path:
    return folder / f"piece-{i:06d}.npz"


# A piece's arrays of the tokens and codes themselves: the bulk of it (~90 % at 100k clips). The join holds
# every piece's other arrays (per entry and record) for its checks, but these of one piece at a time, read
# back as it writes the index's columns (piece_join.Join.columns), so that rank 0's memory does not grow with
# the corpus by them.
HEAVY = ("r_input_ids", "r_label_ids", "own_codes")


def read_piece(path: Path, piece: list, light: bool = False):
    """The arrays of a finished piece, or None: missing, cut short, of another plan or format, or built
    before a change to the folders its files are in or to the code shards it points into. ``light``: without
    the HEAVY arrays (read_heavy reads them)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if not (light and k in HEAVY)}
        meta = json.loads(arrays["meta"].tobytes())
    except (OSError, ValueError, KeyError, EOFError):
        return None
    arrays["meta"] = meta
    return arrays if current(arrays, piece) else None


def read_heavy(path: Path, name: str) -> np.ndarray:
    """One of a piece's HEAVY arrays (an .npz member is read alone)."""
    with np.load(path, allow_pickle=False) as z:
        return z[name]


def current(arrays: dict, piece: list) -> bool:
    """Whether a piece's arrays still hold: of this plan and format, its folders and code shards unchanged."""
    meta = arrays["meta"]
    if meta.get("format") != FORMAT or meta.get("piece") != piece:
        return False
    if any(_mtime(f) != t for f, t in meta["folders"].items()):
        return False
    for f, size in meta["code_sizes"].items():
        try:
            if os.stat(f).st_size != size:
                return False
        except OSError:
            return False
    return True


def write_piece(path: Path, arrays: dict) -> None:
    with atomic_file(path) as tmp:  # a piece is there whole or not at all
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def build_pieces(cfg: Config, env: DistEnv, tokenizer, mc, cache: str, folder: Path, quiet: bool,
                 phases: Phases, full) -> tuple:
    """Every rank: its share of the pieces, built or kept from an interrupted run. -> (the plan, this rank's
    counts, the pieces it built if it is rank 0: {number: arrays}). ``folder``: where the pieces live."""
    if env.is_main:
        new = plan(cfg, PIECE_LINES)
        try:
            old = json.loads((folder / "plan.json").read_text())
        except (OSError, ValueError):
            old = None
        if old != new:  # another plan (a manifest changed): nothing of the old one is kept
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / "plan.json", new)
    (the_plan,) = all_gather_objects(new if env.is_main else None)[:1]
    pieces = the_plan["pieces"]
    builder = None
    built = kept = 0
    mine: dict = {}  # rank 0: the pieces it built, as the join reads them (light: without their HEAVY arrays)
    for i in range(env.rank, len(pieces), env.world_size):
        path = piece_path(folder, i)
        if path.exists() and read_piece(path, pieces[i], light=True) is not None:
            kept += 1
            continue
        phases.mark("pieces kept")
        builder = builder or PieceBuilder(cfg, env, tokenizer, mc, cache, quiet, phases, full)
        arrays = builder.build(pieces[i])
        write_piece(path, arrays)
        if env.is_main:
            mine[i] = {**{k: v for k, v in arrays.items() if k not in HEAVY},
                       "meta": json.loads(arrays["meta"].tobytes())}
        phases.mark("piece write")
        built += 1
        if PAUSE_S:
            time.sleep(PAUSE_S)
    if builder is not None:
        builder.codec = None
        builder.tokens.write_pending()
        builder.hashes.save()  # (ranks write it in turn; one rank's new hashes may be lost: the pieces keep them)
    phases.mark("pieces kept")
    barrier()  # every piece is on disk
    phases.mark("wait for the other ranks")
    if env.is_main and builder is not None:
        builder.codes.refresh()
        builder.codes.write_index()
        builder.tokens.remove_damaged()  # (the other ranks' entries of them are in their new shards now)
    return the_plan, {"built": built, "kept": kept}, mine


def prepare_index(cfg: Config, env: DistEnv, tokenizer, mc, quiet: bool, report_path: Path, start, full,
                  source_problems: list = ()) -> Phases:
    """Every rank: build its pieces; rank 0 joins them and writes the index ``start`` (index_start.py) then
    maps. ``full``: the full way's steps that a piece takes as they are (dataset.full_way; dataset imports
    this module). The data's problems are reported as the full way reports them (dataset.conclude):
    DataError on every rank where data.on_error=error refuses them, and no index. ``source_problems``: what
    the import of shard sources left out (sources.py), reported first. -> this rank's phases."""
    from higgs_ddp.runtime.shared_fs import check_shared_directory

    full.check_manifests(cfg)
    check_shared_directory(start.cache, "data.cache_dir", env)
    folder = start.folder.with_name(start.folder.name + ".pieces")
    phases = Phases()
    the_plan, counts, mine = build_pieces(cfg, env, tokenizer, mc, start.cache, folder, quiet, phases, full)
    counts = all_gather_objects(counts)
    failure = None
    if env.is_main:
        try:
            t0 = time.perf_counter()
            _join(cfg, env, mc, quiet, report_path, start, folder, the_plan, full, mine, list(source_problems))
            built, kept = sum(c["built"] for c in counts), sum(c["kept"] for c in counts)
            if not quiet:
                print(f"prepare: {len(the_plan['pieces'])} piece(s) of up to {the_plan['lines']} manifest lines on "
                      f"{env.world_size} rank(s): {built} built" + (f", {kept} kept from an interrupted prepare"
                                                                     if kept else "")
                      + f"; joined into {start.folder} in {time.perf_counter() - t0:.1f} s", flush=True)
            shutil.rmtree(folder, ignore_errors=True)  # the index holds all of it now
        except Exception as e:  # the other ranks must hear of it, not wait forever
            failure = e
    message = all_gather_objects(None if failure is None else str(failure))[0]
    phases.mark("join")
    if failure is not None:
        raise failure
    if message is not None:
        raise full.error(message)
    return phases


def _join(cfg: Config, env: DistEnv, mc, quiet: bool, report_path: Path, start, folder: Path, the_plan: dict,
          full, mine: dict, source_problems: list):
    from higgs_ddp.data.corpus_index import OWN_CODES, write_index
    from higgs_ddp.data.index_start import _summary
    from higgs_ddp.data.piece_join import Join, fingerprint_columns, summary_stats
    from higgs_ddp.data.references import Pairing

    d = cfg.data
    phases = Phases()
    pieces = []
    for i, piece in enumerate(the_plan["pieces"]):
        arrays = mine.pop(i, None)  # its own are not read back, but checked as a read one is
        arrays = ((arrays if current(arrays, piece) else None) if arrays
                  else read_piece(piece_path(folder, i), piece, light=True))
        if arrays is None:
            raise full.error(f"prepared piece {piece_path(folder, i)} is missing or damaged (a file changed while "
                            f"it was prepared?); run `higgs-ddp prepare --config ...` again")
        pieces.append(arrays)
    phases.mark("piece read")
    stats = summary_stats(pieces)
    if stats and env.is_main and not quiet:  # what prepare_audio says, over all the pieces
        from higgs_ddp.data.prepare import summary_line

        print(summary_line(stats), flush=True)
    def heavy(k: int, name: str) -> np.ndarray:
        try:
            return read_heavy(piece_path(folder, k), name)
        except (OSError, ValueError, KeyError, EOFError):
            raise full.error(f"prepared piece {piece_path(folder, k)} is missing or damaged (a file changed while "
                             f"it was joined?); run `higgs-ddp prepare --config ...` again") from None

    join = Join(pieces, cfg, mc.audio_num_codebooks, heavy)
    join.overlaps()
    join.same_recordings()
    rows, n_train, problems = join.outcome()
    problems = source_problems + problems
    pairing = Pairing(d.reference)
    if d.reference != "given":
        pairing.replaced = join.references_left_out()
    phases.mark("checks")
    report = {
        "policy": d.on_error, "manifests": list(d.manifest), "val_manifests": list(d.val_manifest),
        "entries": join.n + len(source_problems), "train_samples": n_train, "val_samples": len(rows) - n_train,
        "skipped": len(problems), "skipped_by_reason": dict(sorted(Counter(p.reason for p in problems).items())),
        "train_audio_hours": join.seconds_sum(rows[:n_train]) / 3600,
        "references": pairing.report(),
        "problems": [{"where": p.where, "reason": p.reason, "message": p.message} for p in problems],
    }
    report["startup_seconds"], report["startup_cpu_seconds"] = phases.seconds, phases.cpu_seconds
    full.conclude(cfg, env, quiet, report_path, report, problems, pairing, None, n_train, len(rows) - n_train)
    cols, files, speakers, own = join.columns(rows)
    folders: dict = {}
    for p in pieces:
        for f, t in p["meta"]["folders"].items():
            folders.setdefault(f, t)

    def write_codes(tmp: Path) -> None:
        own(tmp / OWN_CODES)

    def finish(tmp: Path, code_files: list) -> dict:
        paths = [tmp / OWN_CODES if c["path"] == OWN_CODES else c["path"] for c in code_files]
        mapped = {k: np.load(tmp / f"{k}.npy", mmap_mode="r") if callable(v) else v for k, v in cols.items()}
        return {"fingerprint": fingerprint_columns(mapped, n_train, paths, mc.audio_num_codebooks)}

    meta = {"samples": len(rows), "train_samples": n_train, "code_files": files, "speakers": speakers,
            "num_codebooks": mc.audio_num_codebooks, "manifests": start.manifests, "folders": folders,
            "summary": _summary(report)}
    write_index(start.folder, cols, meta, report, write_codes if own is not None else None, finish)
