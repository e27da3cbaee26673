"""Joining a cold start's pieces (piece_prepare.py) into the corpus index the full way writes, on rank 0.

The checks across pieces are load_data's (dataset._overlaps, dataset._same_recordings), with the same
messages, at scale: ids, learned paths and learned contents are 64-bit hashes computed in the pieces;
sorting them finds every repeat, and only those candidates are confirmed on their strings (a hash collision
of two different strings is no repeat), walked in load_data's order where the order decides who is first.
No set or dict of every id is built.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from higgs_ddp.data.corpus_index import COLUMNS, OWN_CODES
from higgs_ddp.data.manifest import Problem


def runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The positions starts[0], ..., starts[0] + lens[0] - 1, starts[1], ... end to end."""
    starts, lens = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
    before = np.cumsum(lens) - lens
    return np.repeat(starts - before, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def gather(src: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """src[starts[0]:starts[0] + lens[0]], src[starts[1]:...], ... end to end, without a Python loop."""
    return src[runs(starts, lens)] if int(np.sum(lens)) else src[:0].copy()


def _cat(pieces: list, name: str) -> np.ndarray:
    return np.concatenate([p[name] for p in pieces])


class Strings:
    """Strings stored end to end (bytes + offsets) over all pieces, by global number."""

    def __init__(self, pieces: list, name: str, offsets: str = ""):
        b, o = (name, offsets) if offsets else (f"{name}_b", f"{name}_o")
        self.bytes = np.concatenate([p[b] for p in pieces]) if pieces else np.zeros(0, np.uint8)
        base, starts, ends = 0, [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for p in pieces:
            starts.append(p[o][:-1] + base)
            ends.append(p[o][1:] + base)
            base += len(p[b])
        self.starts, self.ends = np.concatenate(starts), np.concatenate(ends)

    def __getitem__(self, i) -> str:
        return self.bytes[self.starts[i]:self.ends[i]].tobytes().decode()

    def take(self, order: np.ndarray) -> tuple:
        """-> (bytes, offsets) of the strings ``order`` names, in that order (corpus_index's layout)."""
        lens = self.ends[order] - self.starts[order]
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        return gather(self.bytes, self.starts[order], lens), offsets


def repeats(hashes: np.ndarray) -> np.ndarray:
    """The positions whose hash some other position has too (candidates for a repeated string)."""
    if len(hashes) < 2:
        return np.zeros(0, np.int64)
    order = np.argsort(hashes, kind="stable")
    s = hashes[order]
    same = s[1:] == s[:-1]
    mark = np.zeros(len(s), bool)
    mark[1:] |= same
    mark[:-1] |= same
    return np.sort(order[mark])


def first_of(hashes: np.ndarray, candidates: np.ndarray, text) -> dict:
    """For a table of hashes (position j's string: ``text(j)``): string -> its first position, for the
    positions whose hash is among ``candidates`` only."""
    hit = np.flatnonzero(np.isin(hashes, candidates))
    first: dict = {}
    for j in hit.tolist():
        first.setdefault(text(j), j)
    return first


class Join:
    """``pieces``: every piece's arrays but its HEAVY ones (piece_prepare.HEAVY: its tokens and codes), which
    ``heavy(piece number, name)`` reads, one piece's one array at a time, as the index's columns are written."""

    def __init__(self, pieces: list, cfg, num_codebooks: int, heavy):
        self.pieces, self.cfg, self.C, self.heavy = pieces, cfg, num_codebooks, heavy
        d = cfg.data
        cat = functools.partial(_cat, pieces)
        self.n = sum(len(p["e_id_hash"]) for p in pieces)
        self.piece_of = np.repeat(np.arange(len(pieces)), [len(p["e_id_hash"]) for p in pieces])
        self.is_val = np.repeat([bool(p["meta"]["piece"][1]) for p in pieces], [len(p["e_id_hash"]) for p in pieces])
        self.id_hash, self.id_given = cat("e_id_hash"), cat("e_id_given")
        self.pick = cat("e_pick") if d.val_fraction else np.zeros(self.n, bool)
        self.replaced = cat("e_replaced")
        rec_base = np.cumsum([0] + [len(p["r_positions"]) for p in pieces])[:-1]
        local = cat("e_record")
        self.record = np.where(local >= 0, local + rec_base[self.piece_of], -1)
        self.local_index = np.concatenate([np.arange(len(p["e_id_hash"])) for p in pieces])
        l_base = np.cumsum([0] + [int(p["l_off"][-1]) for p in pieces])[:-1]
        self.l_start = np.concatenate([p["l_off"][:-1] + b for p, b in zip(pieces, l_base)])
        self.l_end = np.concatenate([p["l_off"][1:] + b for p, b in zip(pieces, l_base)])
        self.l_path_hash, self.l_key_hash = cat("l_path_hash"), cat("l_key_hash")
        self.ids, self.where = Strings(pieces, "e_id"), Strings(pieces, "e_where")
        self.paths, self.shown, self.keys = Strings(pieces, "l_path"), Strings(pieces, "l_shown"), Strings(pieces, "l_key")
        self.l_entry = np.repeat(np.arange(self.n), self.l_end - self.l_start)
        self.dropped: dict = {}  # entry -> Problem, from the checks across pieces
        self.overlapped: list = []  # of them, those dataset._overlaps drops (before audio is read)

    # ---- dataset._overlaps ----

    def overlaps(self) -> None:
        cand = repeats(self.id_hash)
        train_first: dict = {}  # id -> first training entry with it (every training id, among the candidates)
        for i in cand[~self.is_val[cand]].tolist():
            sid = self.ids[i]
            if sid in train_first:
                self.dropped[i] = self._duplicate(i, train_first[sid])
            else:
                train_first[sid] = i
        kept_train = ~self.is_val.copy()
        kept_train[list(self.dropped)] = False
        # The first kept training entry learning each path, looked up for the validation refs that may share one
        train_refs = np.flatnonzero(kept_train[self.l_entry])
        val_refs = np.flatnonzero(self.is_val[self.l_entry])
        maybe = np.isin(self.l_path_hash[val_refs], self.l_path_hash[train_refs])
        clips = first_of(self.l_path_hash[train_refs], np.unique(self.l_path_hash[val_refs[maybe]]),
                         lambda j: self.paths[train_refs[j]])
        clips = {p: train_refs[j] for p, j in clips.items()}
        walk = np.union1d(cand[self.is_val[cand]], self.l_entry[val_refs[maybe]])
        cand_set = set(cand.tolist())
        val_kept: dict = {}  # id -> kept validation entry (candidate ids only)
        for i in walk.tolist():
            sid = self.ids[i] if i in cand_set else None
            if sid is not None and sid in train_first:
                t = train_first[sid]
                self.dropped[i] = Problem(self._where(i), "val_in_train", f"validation sample id {sid!r} is also "
                                          f"the training sample at {self._where(t)}")
                continue
            if sid is not None and sid in val_kept:
                self.dropped[i] = self._duplicate(i, val_kept[sid])
                continue
            shared = next((j for j in range(self.l_start[i], self.l_end[i]) if self.paths[j] in clips), None)
            if shared is not None:
                t = self.l_entry[clips[self.paths[shared]]]
                self.dropped[i] = Problem(self._where(i), "val_in_train", f"validation sample learns "
                                          f"{self.shown[shared]}, which the training sample at {self._where(t)} "
                                          f"learns too")
                continue
            if sid is not None:
                val_kept[sid] = i
        self.overlapped = list(self.dropped)

    def _where(self, i: int) -> str:
        return self.where[i]

    def _duplicate(self, i: int, other: int) -> Problem:
        hint = ("" if self.id_given[i] else " (a line without \"id\" gets its manifest's file name and line "
                "as its id: give the lines ids, or name the manifests differently)")
        return Problem(self._where(i), "duplicate_id", f"id {self.ids[i]!r} is already the id of "
                       f"{self._where(other)}{hint}")

    # ---- dataset._same_recordings ----

    def same_recordings(self) -> None:
        kept = np.ones(self.n, bool)
        kept[list(self.dropped)] = False
        in_val = self.is_val | self.pick
        source = np.flatnonzero((kept & ~in_val)[self.l_entry])  # refs whose recordings are learned in training
        check = np.flatnonzero((kept & in_val)[self.l_entry])
        maybe = np.isin(self.l_key_hash[check], self.l_key_hash[source])
        learned = first_of(self.l_key_hash[source], np.unique(self.l_key_hash[check[maybe]]),
                           lambda j: self.keys[source[j]])
        learned = {k: source[j] for k, j in learned.items()}
        for i in np.unique(self.l_entry[check[maybe]]).tolist():
            shared = next((j for j in range(self.l_start[i], self.l_end[i]) if self.keys[j] in learned), None)
            if shared is None:
                continue
            ref = learned[self.keys[shared]]
            other = self._where(self.l_entry[ref])
            same = (f"which the training sample at {other} learns too" if self.paths[ref] == self.paths[shared] else
                    f"the same recording (identical bytes) as {self.shown[ref]}, which the training sample at "
                    f"{other} learns")
            self.dropped[i] = Problem(self._where(i), "val_in_train", f"validation sample learns "
                                      f"{self.shown[shared]}, {same}")

    # ---- the outcome ----

    def outcome(self) -> tuple:
        """-> (the rows in the index's order (global record numbers), how many are training rows, the
        problems in load_data's order)."""
        kept = np.ones(self.n, bool)
        kept[list(self.dropped)] = False
        has = kept & (self.record >= 0)
        train = has & ~self.is_val & ~self.pick
        picked = has & ~self.is_val & self.pick
        rows = np.concatenate([self.record[train], self.record[has & self.is_val], self.record[picked]])
        problems = []
        for k, piece in enumerate(self.pieces):
            lo = int(np.searchsorted(self.piece_of, k))
            at = []  # (line, problems of that line)
            for line, where, reason, message in piece["meta"]["line_problems"]:
                at.append((line, [Problem(where, reason, message)]))
            local = piece["meta"]["problems"]
            for j, line in enumerate(piece["e_line"].tolist()):
                i = lo + j
                if i in self.dropped:
                    at.append((line, [self.dropped[i]]))
                elif str(j) in local:
                    at.append((line, [Problem(self._where(i), r, m) for r, m in local[str(j)]]))
            for _, ps in sorted(at, key=lambda t: t[0]):
                problems += ps
        return rows, int(train.sum()), problems

    def references_left_out(self) -> int:
        """Manifest references data.reference=none set aside, of the samples _overlaps kept (load_data's count)."""
        kept = np.ones(self.n, bool)
        kept[self.overlapped] = False
        return int((self.replaced & kept).sum())

    # ---- the columns ----

    def columns(self, rows: np.ndarray) -> tuple:
        """-> (columns, code files, speakers, own codes bytes) of the records ``rows``, as
        corpus_index.record_columns lays them out for those records in that order."""
        P = self.pieces
        cat = functools.partial(_cat, P)
        n = len(rows)
        cols = {"positions": cat("r_positions")[rows], "seconds": cat("r_seconds")[rows]}
        cols["id_bytes"], cols["id_offsets"] = Strings(P, "r_id_bytes", "r_id_offsets").take(rows)
        cols["where_bytes"], cols["where_offsets"] = Strings(P, "r_where_bytes", "r_where_offsets").take(rows)
        rec_piece = np.repeat(np.arange(len(P)), [len(p["r_positions"]) for p in P])[rows]
        # speakers: numbered by first appearance
        names, local_to_global = {}, []
        for p in P:
            local_to_global.append(np.array([names.setdefault(s, len(names)) for s in p["meta"]["speakers"]] or [0],
                                            np.int64))
        spk_local = cat("r_speaker")[rows].astype(np.int64)
        spk = np.full(n, -1, np.int64)
        for k in range(len(P)):
            m = (rec_piece == k) & (spk_local >= 0)
            spk[m] = local_to_global[k][spk_local[m]]
        all_names = list(names)
        speakers, cols["speaker"] = _first_numbered(spk, all_names)
        # prompts: stored once per token key, in order of first use
        keys = np.ascontiguousarray(cat("r_tokkey")[rows]).view(np.uint64)  # (n, 2): a 16-byte key each
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.ravel()
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        tok_len = cat("r_tok_len")[rows]
        u_rows = first[order]
        u_len = tok_len[u_rows]
        u_at = np.cumsum(u_len) - u_len
        cols["tok_start"] = u_at[rank[inverse]]
        cols["tok_len"] = tok_len
        u_piece, u_src = rec_piece[u_rows], cat("r_tok_start")[rows][u_rows]
        for name in ("input_ids", "label_ids"):  # written into the index's file, piece after piece
            cols[name] = functools.partial(self._scatter, f"r_{name}", u_piece, u_src, u_at, u_len, COLUMNS[name])
        # codes: the rows of each record, end to end
        ao = [p["r_audio_offsets"] for p in P]
        code_base = np.cumsum([0] + [int(a[-1]) for a in ao])[:-1]
        a_start = np.concatenate([a[:-1] + b for a, b in zip(ao, code_base)])[rows]
        a_len = np.concatenate([np.diff(a) for a in ao])[rows]
        cols["audio_offsets"] = np.zeros(n + 1, np.int64)
        np.cumsum(a_len, out=cols["audio_offsets"][1:])
        code_rows = gather(np.arange(int(sum(int(a[-1]) for a in ao)), dtype=np.int64), a_start, a_len)
        row_piece = np.repeat(np.arange(len(P)), [int(a[-1]) for a in ao])[code_rows]
        file_names, f_local = {}, []
        for p in P:
            f_local.append(np.array([file_names.setdefault(f, len(file_names)) for f in p["meta"]["files"]] or [0],
                                    np.int64))
        cf_local = cat("r_code_file")[code_rows].astype(np.int64)
        cf = np.zeros(len(code_rows), np.int64)
        for k in range(len(P)):
            m = row_piece == k
            cf[m] = f_local[k][cf_local[m]]
        files, cols["code_file"] = _first_numbered(cf, list(file_names))
        cols["code_offset"] = cat("r_code_offset")[code_rows]
        cols["code_stride"] = cat("r_code_stride")[code_rows]
        cols["code_frames"] = cat("r_code_frames")[code_rows]
        own = None
        if OWN_CODES in files:
            mine = cols["code_file"] == files.index(OWN_CODES)
            size = 2 * self.C * cols["code_stride"][mine].astype(np.int64)
            at = np.cumsum(size) - size
            own = functools.partial(self._scatter, "own_codes", row_piece[mine], cols["code_offset"][mine], at, size,
                                    np.uint8, raw=True)
            cols["code_offset"] = cols["code_offset"].copy()
            cols["code_offset"][mine] = at
        cols = {k: v if callable(v) else np.ascontiguousarray(v, COLUMNS[k]) for k, v in cols.items()}
        return cols, files, speakers, own

    def _scatter(self, name: str, piece: np.ndarray, src: np.ndarray, at: np.ndarray, lens: np.ndarray, dtype,
                 path, raw: bool = False) -> None:
        """Write the output file ``path`` whose run j is piece ``piece[j]``'s HEAVY array ``name`` from
        ``src[j]``, ``lens[j]`` long, at ``at[j]``: one piece's array in memory at a time, the output on disk
        (an .npy file as np.save writes it, or ``raw`` bytes)."""
        total = int(lens.sum())
        if raw:
            out = np.memmap(path, dtype, "w+", shape=(total,)) if total else None
            if out is None:
                open(path, "wb").close()
        else:
            out = np.lib.format.open_memmap(path, "w+", dtype, (total,))
        for k in np.unique(piece).tolist():
            sel = np.flatnonzero(piece == k)
            arr = self.heavy(k, name)
            out[runs(at[sel], lens[sel])] = gather(arr, src[sel], lens[sel])
            del arr  # (before the next piece's is read)
        if out is not None:
            out.flush()
            del out

    def seconds_sum(self, rows: np.ndarray) -> float:
        return sum(np.concatenate([p["r_seconds"] for p in self.pieces])[rows].tolist())


def _first_numbered(values: np.ndarray, names: list) -> tuple:
    """Renumber ``values`` (indexes into ``names``, -1: none) by first appearance. -> (names in that order,
    the new numbers)."""
    valid = values >= 0
    if not valid.any():
        return [], np.where(valid, 0, -1).astype(np.int64)
    u, first = np.unique(values[valid], return_index=True)
    order = u[np.argsort(first, kind="stable")]
    new = np.full(len(names), -1, np.int64)
    new[order] = np.arange(len(order))
    out = np.full(len(values), -1, np.int64)
    out[valid] = new[values[valid]]
    return [names[j] for j in order], out


def summary_stats(pieces: list) -> dict:
    """prepare_audio's stats (prepare.summary_line) over all the pieces: a file that two pieces name (a reference
    clip, a member of a shard cut by a piece boundary) counted once, a recording once, a recording encoded by
    one piece and found cached by a later one counted as encoded. {} where no piece prepared audio."""
    stats = [p["meta"]["stats"] for p in pieces if p["meta"]["stats"]]
    if not stats:
        return {}
    summed = {k: sum(s[k] for s in stats) for k in stats[0] if k != "cache"}
    if any("f_path_hash" not in p for p in pieces):  # a piece of an earlier version: its sums (may count twice)
        return {**summed, "cache": stats[0]["cache"]}
    cat = functools.partial(_cat, pieces)
    path, key, hashed = cat("f_path_hash"), cat("f_key_hash"), cat("f_hashed")
    _, first = np.unique(path, return_index=True)  # each file once
    return {**summed, "cache": stats[0]["cache"],
            "files": len(first), "distinct": len(np.unique(key)),
            "cached": len(np.setdiff1d(key[hashed], key[cat("f_new")])),
            "encoded": len(np.unique(key[cat("f_encoded")])),
            "failed": int(cat("f_failed")[first].sum()),
            "audio_hours": float(cat("f_seconds")[first].sum()) / 3600}


def fingerprint_columns(cols: dict, n: int, code_files: list, num_codebooks: int) -> dict:
    """records.fingerprint of the first ``n`` rows of an index's columns (in memory; ``code_files``: the
    files code_file numbers, read as they are mapped), the same bytes hashed in the same order, without
    building a record per row."""
    import hashlib

    import torch

    ido, idb = cols["id_offsets"], cols["id_bytes"].tobytes()
    names = [idb[ido[i]:ido[i + 1]] for i in range(n)]
    ids = hashlib.sha256(b"".join(s + b"\0" for s in sorted(names)))
    raw = [torch.from_file(str(p), shared=False, size=os.path.getsize(p), dtype=torch.uint8).numpy()
           for p in code_files]
    content = hashlib.sha256()
    tok_start, tok_len, ao = cols["tok_start"].tolist(), cols["tok_len"].tolist(), cols["audio_offsets"].tolist()
    inp, lab = cols["input_ids"], cols["label_ids"]
    cf, co = cols["code_file"].tolist(), cols["code_offset"].tolist()
    cs, fr = cols["code_stride"].tolist(), cols["code_frames"].tolist()
    C = num_codebooks
    for i in range(n):
        a, k = tok_start[i], tok_len[i]
        shape = f"({k},)".encode()
        parts = [names[i], b"\0", inp[a:a + k].tobytes(), shape, lab[a:a + k].tobytes(), shape]
        for j in range(ao[i], ao[i + 1]):
            full = raw[cf[j]][co[j]:co[j] + 2 * C * cs[j]].view(np.int16).reshape(C, cs[j])
            parts += [np.ascontiguousarray(full[:, :fr[j]]).tobytes(), f"({C}, {fr[j]})".encode()]
        content.update(b"".join(parts))
    return {"samples": n, "ids": ids.hexdigest()[:16], "content": content.hexdigest()[:16]}
