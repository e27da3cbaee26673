"""The voice-clone reference of each sample (``data.reference``).

* ``given``: what the manifest says (a simple line's ``ref_audio`` + ``ref_text``, if any).
* ``none``: simple lines train without a reference (their ``ref_audio`` is not even encoded).
* ``same_speaker``: each simple line gets another training clip of its speaker as its reference, with that
  clip's transcript, in the place the official prompt puts it (``prompt.build_chatml``: a user turn with the
  reference text and an assistant turn with the reference audio, before the text to speak). It is context,
  never a target: only the last assistant turn is learned. The manifest's own references are replaced.

ChatML lines keep their conversation as written under every setting.

The choice is a pure function of (train.seed, the sample's id, the candidates' ids and codes), made when
the data is built: every rank makes it alike, a resumed run makes it again identically, and it consumes
no random stream. Candidates are ranked by a hash of (seed, sample id, candidate id), so adding clips
changes a sample's reference only where a new clip outranks the old one. Excluded: the clip itself (by id
and by file), clips with identical or near-identical codes (a copy, a re-export; ``near_identical``), clips
shorter than ``data.reference_seconds[0]``, and validation clips (a training prompt never holds them). Clips
within the bounds rank before longer ones, which are cut (``cut_frame``), since a cut reference's transcript
can only be estimated (``cut_transcript``).

A sample whose speaker has one clip, or none left after the exclusions, or that names no speaker, trains
without a reference; the report counts them and names the speakers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from higgs_ddp.data.manifest import Entry
from higgs_ddp.data.prompt import build_chatml

# Near-identical recordings: at some offset within MAX_LAG frames (0.5 s at 25 frames/s: a file trimmed or
# padded differently), at least this fraction of the shorter clip's frames carry the same code in every
# codebook. Different takes of speech practically never share a whole frame (8 codebooks of 1024).
NEAR_IDENTICAL_FRACTION = 0.5
MAX_LAG = 12
# A long reference is cut at the quietest boundary within this window below the longest allowed length:
# 1 s holds a pause between words or phrases in ordinary speech.
CUT_WINDOW_SECONDS = 1.0
MAX_NAMED = 20  # speakers named in the printed line (the report lists them all)
# Fewer samples paired than this share of those that could be: the run hardly learns voice cloning, so the
# one line becomes a warning (all 40 clips shorter than data.reference_seconds[0] pair none, say).
FEW_PAIRED = 0.5
# Why a clip of the sample's speaker cannot be its reference (Pairing.excluded_by).
EXCLUDED = {"too_short": "shorter than data.reference_seconds[0]",
            "near_identical": "the same recording or near-identical to it",
            "validation": "validation clips"}


@dataclass
class Pairing:
    """What data.reference did, for the data report and the one printed line."""

    mode: str
    paired: int = 0  # samples given a same-speaker reference
    cut: int = 0  # of them, with a reference cut to data.reference_seconds[1]
    replaced: int = 0  # manifest references set aside (same_speaker, none)
    single_clip_speakers: list = field(default_factory=list)  # their samples train without a reference
    no_speaker: int = 0  # samples without "speaker": no reference
    no_candidate: int = 0  # samples whose speaker's other clips are all excluded (too short, near-identical)
    # of those samples, how many had clips excluded for each reason of EXCLUDED (a sample may count twice)
    excluded_by: dict = field(default_factory=lambda: dict.fromkeys(EXCLUDED, 0))
    shortest_seconds: float = 0.0  # data.reference_seconds[0], for the words
    pairs: list = field(default_factory=list)  # [{sample, reference, reference_file, frames, ref_text}]

    def line(self) -> str:
        if self.mode != "same_speaker":
            return f"references: data.reference={self.mode}" + (
                f": {self.replaced} manifest reference(s) left out" if self.replaced else "")
        parts = [f"references: {self.paired} sample(s) paired with another clip of their speaker "
                 f"({self.cut} cut to data.reference_seconds)", *self._unpaired()]
        if self.replaced:
            parts.append(f"{self.replaced} manifest reference(s) replaced")
        return "; ".join(parts)

    def _unpaired(self) -> list:
        """Why samples train without a reference, one phrase per cause."""
        names, parts = self.single_clip_speakers, []
        if names:
            shown = ", ".join(names[:MAX_NAMED]) + (f", ... ({len(names) - MAX_NAMED} more)"
                                                    if len(names) > MAX_NAMED else "")
            parts.append(f"{len(names)} speaker(s) with a single clip, trained without a reference: {shown}")
        if self.no_speaker:
            parts.append(f"{self.no_speaker} sample(s) without a speaker, trained without a reference")
        if self.no_candidate:
            words = {**EXCLUDED, "too_short": f"shorter than data.reference_seconds[0]={self.shortest_seconds:g} s"}
            why = ", ".join(f"{words[k]} for {n}" for k, n in self.excluded_by.items() if n)
            parts.append(f"{self.no_candidate} sample(s) whose speaker has no other usable clip, trained without "
                         f"a reference (other clips {why})")
        return parts

    def warning(self) -> Optional[str]:
        """Said loudly when data.reference=same_speaker paired fewer than FEW_PAIRED of its samples."""
        total = self.paired + len(self.single_clip_speakers) + self.no_speaker + self.no_candidate
        if self.mode != "same_speaker" or not total or self.paired >= FEW_PAIRED * total:
            return None
        return (f"data.reference=same_speaker paired only {self.paired} of {total} sample(s) with a reference, so "
                f"the run will hardly learn to clone a voice: " + "; ".join(self._unpaired()))

    def report(self) -> dict:
        return {**dataclasses.asdict(self), "single_clip_speaker_count": len(self.single_clip_speakers)}


def without_reference(entry: Entry) -> Entry:
    """A simple line's sample with no reference; other entries as they are."""
    if entry.text is None or len(entry.audio) == 1:
        return entry
    return dataclasses.replace(entry, chatml=build_chatml(entry.text, entry.scene), audio=list(entry.learned))


def with_reference(entry: Entry, ref: Entry, frames: Optional[int], ref_text: str) -> Entry:
    target = entry.learned[0]
    ref_audio = dataclasses.replace(ref.learned[0], frames=frames)
    return dataclasses.replace(entry, chatml=build_chatml(entry.text, entry.scene, ref_text, with_reference=True),
                               audio=[ref_audio, target])


def rank(seed: int, sample_id: str, candidate_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{sample_id}\0{candidate_id}".encode()).digest()


def near_identical(a: np.ndarray, b: np.ndarray) -> bool:
    """The same recording, judged on codes (C, T): equal, or at some offset within MAX_LAG frames at least
    NEAR_IDENTICAL_FRACTION of the shorter clip's frames equal in every codebook."""
    if a.shape == b.shape and np.array_equal(a, b):
        return True
    shorter = min(a.shape[1], b.shape[1])
    for lag in range(-MAX_LAG, MAX_LAG + 1):
        x, y = a[:, max(lag, 0):], b[:, max(-lag, 0):]
        n = min(x.shape[1], y.shape[1])
        if n and (x[:, :n] == y[:, :n]).all(0).sum() >= NEAR_IDENTICAL_FRACTION * shorter:
            return True
    return False


def cut_frame(energy: Optional[np.ndarray], frames: int, lo: int, hi: int, frame_rate: float) -> int:
    """How many frames of a clip longer than ``hi`` frames to keep: at most ``hi``, at least ``lo``. The cut
    goes at the boundary k (frames [0, k) kept) whose louder neighbour, max(energy[k-1], energy[k]), is the
    quietest within CUT_WINDOW_SECONDS below ``hi``: a boundary between two quiet frames is a pause, so no
    word is chopped; the latest such boundary wins ties, keeping the most reference. Without the audio's
    energy (a clip given as .npy codes) the cut is at ``hi``."""
    if energy is None:
        return hi
    energy = np.asarray(energy, np.float64)[:frames]
    start = max(lo, hi - round(CUT_WINDOW_SECONDS * frame_rate), 1)
    ks = np.arange(start, min(hi, frames - 1) + 1)
    if not len(ks):
        return hi
    score = np.maximum(energy[np.minimum(ks - 1, len(energy) - 1)], energy[np.minimum(ks, len(energy) - 1)])
    return int(ks[len(ks) - 1 - np.argmin(score[::-1])])


def cut_transcript(text: str, fraction: float) -> str:
    """The part of a transcript spoken in the first ``fraction`` of its clip, estimated: speech rate taken as
    even, cut at the nearest word boundary (at a character for text without spaces)."""
    words = text.split()
    if len(words) == 1:  # no spaces (Chinese, Japanese): by characters
        return words[0][:max(1, round(len(words[0]) * fraction))]
    ends = np.cumsum([len(w) + 1 for w in words]) - 1
    keep = int(np.argmin(np.abs(ends - fraction * len(" ".join(words))))) + 1
    return " ".join(words[:keep])


def _excluded_by(clip: Entry, sample: Entry, pool: Callable[[Entry], bool], found: dict, lo: int) -> str:
    """Why ``clip`` cannot be ``sample``'s reference (a key of EXCLUDED), once every candidate failed."""
    if not pool(clip):
        return "validation"
    if clip.learned[0].path != sample.learned[0].path and found[clip.learned[0].path].shape[1] < lo:
        return "too_short"
    return "near_identical"  # the same file, or codes that near_identical() matched


# pick_same_speaker's outcome per clip
NOT_PAIRABLE, NO_SPEAKER, SINGLE_CLIP, NO_CANDIDATE, PAIRED = range(5)


def pick_same_speaker(speaker: np.ndarray, ids: list, target: np.ndarray, frames: np.ndarray, pool: np.ndarray,
                      pairable: np.ndarray, seed: int, lo: int, hi: int, same: Callable[[int, int], bool]) -> tuple:
    """The references of the module's text over columns, one row per clip: ``speaker`` (a number per speaker,
    -1: none), ``ids``, ``target`` (a number per learned file: the same file, the same number), ``frames`` (of
    its codes), ``pool`` (a training clip that may serve), ``pairable`` (a simple line whose target has codes);
    ``same(i, j)``: clips i and j are near-identical (``near_identical`` on their codes). The clips are grouped
    by speaker with one sort (offsets per speaker; no per-speaker Python list of the corpus); each sample ranks
    only its own speaker's clips. -> (reference row per clip, -1 for none; outcome per clip: PAIRED,
    NO_CANDIDATE, SINGLE_CLIP, NO_SPEAKER or NOT_PAIRABLE)."""
    n = len(speaker)
    ref = np.full(n, -1, np.int64)
    outcome = np.where(pairable, np.where(speaker >= 0, SINGLE_CLIP, NO_SPEAKER), NOT_PAIRABLE).astype(np.int8)
    rows = np.flatnonzero(pairable & (speaker >= 0))
    order = rows[np.argsort(speaker[rows], kind="stable")]  # by speaker, each speaker's clips in corpus order
    if not len(order):
        return ref, outcome
    starts = np.flatnonzero(np.r_[True, speaker[order][1:] != speaker[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    for a, b in zip(starts.tolist(), ends.tolist()):
        if b - a == 1:
            continue
        clips = order[a:b]
        usable = clips[pool[clips] & (frames[clips] >= lo)]
        rows_ = list(zip(usable.tolist(), [ids[j].encode() for j in usable.tolist()], (frames[usable] > hi).tolist(),
                         target[usable].tolist()))
        for i in clips.tolist():
            me, mine = ids[i].encode(), int(target[i])
            prefix = hashlib.sha256(b"%d\0%s\0" % (seed, me))  # rank(seed, me, c): the digest of prefix + c

            def ranked(c: bytes) -> bytes:
                h = prefix.copy()
                h.update(c)
                return h.digest()

            candidates = [(long_, ranked(c), j) for j, c, long_, t in rows_ if c != me and t != mine]
            pick = None
            if candidates:  # the first in rank order, as a rule; near copies push to the next (rare: then a sort)
                best = min(candidates)
                pick = best[2] if not same(i, best[2]) else next(
                    (j for _, _, j in sorted(candidates)[1:] if not same(i, j)), None)
            if pick is None:
                outcome[i] = NO_CANDIDATE
            else:
                ref[i], outcome[i] = pick, PAIRED
    return ref, outcome


def pair_same_speaker(entries: list, found: dict, pool: Callable[[Entry], bool], seed: int, lo: int, hi: int,
                      frame_rate: float, energy: Callable, pairing: Pairing) -> list:
    """Each simple entry whose target has codes (``found``) with a reference chosen as the module says;
    ``pool(e)``: e is a training clip that may serve; ``energy(audio_ref)``: per-frame energy or None;
    ``lo``/``hi``: data.reference_seconds in frames. (The choice: ``pick_same_speaker``, over columns.)"""
    def target(e: Entry):
        return e.learned[0] if e.text is not None and e.learned else None

    pairable = np.array([target(e) is not None and target(e).path in found for e in entries], bool)
    names: dict = {}
    speaker = np.array([names.setdefault(e.speaker, len(names)) if e.speaker and ok else -1
                        for e, ok in zip(entries, pairable)], np.int64)
    files: dict = {}
    tgt = np.array([files.setdefault(target(e).path, len(files)) if ok else -1 for e, ok in zip(entries, pairable)],
                   np.int64)
    frames = np.array([found[target(e).path].shape[1] if ok else 0 for e, ok in zip(entries, pairable)], np.int64)
    in_pool = np.array([bool(ok) and pool(e) for e, ok in zip(entries, pairable)], bool)

    def same(i: int, j: int) -> bool:
        return near_identical(found[target(entries[i]).path], found[target(entries[j]).path])

    refs, outcome = pick_same_speaker(speaker, [e.id for e in entries], tgt, frames, in_pool, pairable, seed, lo,
                                      hi, same)
    counts = np.bincount(speaker[speaker >= 0], minlength=len(names))
    pairing.single_clip_speakers = sorted(s for s, k in names.items() if counts[k] == 1)
    by_speaker: dict = {}  # (only where a sample found no candidate: which clips were excluded, and why)
    cuts: dict = {}
    out = []
    for i, e in enumerate(entries):
        if outcome[i] == NO_SPEAKER:
            pairing.no_speaker += 1
        if outcome[i] == NO_CANDIDATE:
            if not by_speaker:
                for j in np.flatnonzero(speaker >= 0).tolist():
                    by_speaker.setdefault(speaker[j], []).append(entries[j])
            pairing.no_candidate += 1
            for reason in {_excluded_by(c, e, pool, found, lo) for c in by_speaker[speaker[i]] if c.id != e.id}:
                pairing.excluded_by[reason] += 1
        if outcome[i] != PAIRED:
            out.append(e)
            continue
        ref = entries[refs[i]]
        r = target(ref)
        total = found[r.path].shape[1]
        frames_kept = None
        ref_text = ref.text
        if total > hi:
            if r.path not in cuts:
                cuts[r.path] = cut_frame(energy(r), total, lo, hi, frame_rate)
            frames_kept = cuts[r.path]
            ref_text = cut_transcript(ref.text, frames_kept / total)
            pairing.cut += 1
        pairing.paired += 1
        pairing.pairs.append({"sample": e.id, "reference": ref.id, "reference_file": r.shown,
                              "frames": frames_kept, "ref_text": ref_text})
        out.append(with_reference(e, ref, frames_kept, ref_text))
    return out
