"""Preference pairs on disk: what ``higgs-ddp prefs build`` writes and a DPO run (train.objective=dpo) reads.

    DIR/prefs.json                  {"format": 1, "codec", "num_codebooks", "codebook_size", "tokenizer",
                                     "model", "reward", "candidates", "seed"}: what the codes and the prompt
                                     tokens depend on, and how the pairs were made
    DIR/pairs.jsonl                 one pair per line: {"id", "text", optional "ref_audio" / "ref_audio_codes"
                                     + "ref_text", "scene", "speaker", "language", "chosen": {"codes", "key",
                                     "seed", "reward", "stopped"}, "rejected": {...}}
    DIR/codes/part-*.safetensors    int16 (codebooks, frames) tensors named by a candidate's "key": codes as the
                                     codec returns them (no delay pattern, no stream BOS/EOS columns)

A candidate's "stopped" (optional, true or false) says whether it ended by itself (the stream EOS) or was cut
at the generation limit: a cut one is not taught to end where its codes end (no stream EOS target, no text
target after its audio; collator.py). Without the field a candidate counts as stopped (a pairs file written
by hand holds whole recordings; one built before prefs build recorded it is assembled again, without
generating anything, by running the same prefs build command).

Paths in pairs.jsonl are relative to its folder (absolute ones allowed). Everything is checked before any
weight is built, and every problem is one line ``FILE:LINE: what``: a damaged pairs file must not cost a job
its queue time, and codes of another codec (or a prompt tokenized by another tokenizer) would train on
nonsense without an error anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from higgs_ddp.data.code_cache import map_shard
from higgs_ddp.data.manifest import AudioRef, reference_problem
from higgs_ddp.errors import HiggsError
from higgs_ddp.runtime.files import atomic_file, write_json_atomic

FORMAT = 1
HEADER = "prefs.json"
PAIRS = "pairs.jsonl"
CODES = "codes"
IDENTITY = ("codec", "num_codebooks", "codebook_size", "tokenizer")  # what must match the run's
SHARD_ENTRIES = 256
# A line's fields (candidates may carry more: a builder's extra scores are kept, not read).
FIELDS = {"id": str, "text": str, "ref_audio": str, "ref_audio_codes": str, "ref_text": str, "scene": str,
          "speaker": str, "language": str, "chosen": dict, "rejected": dict}
ROLES = ("chosen", "rejected")
MAX_LISTED = 20


class PreferenceError(HiggsError, ValueError):
    """A preferences folder that cannot be trained on; the first line names the file (and line) and what."""


@dataclass
class Candidate:
    path: Path  # the codes shard, resolved
    shown: str  # as pairs.jsonl wrote it
    key: str
    seed: Optional[int] = None
    reward: Optional[float] = None
    stopped: Optional[bool] = None  # None: not recorded (trained as stopped; see the module's docstring)
    codes: Optional[np.ndarray] = None  # (codebooks, frames) int16, once loaded (a view into the mapped shard)


@dataclass
class Pair:
    where: str  # pairs.jsonl:line
    id: str  # the prompt's id: pairs of one prompt share it (and the validation split keeps them together)
    text: str
    chosen: Candidate
    rejected: Candidate
    ref: Optional[AudioRef] = None  # reference audio (or .npy codes), resolved
    ref_text: Optional[str] = None
    scene: Optional[str] = None
    speaker: Optional[str] = None
    language: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Unique within a file: the prompt and its two candidates."""
        return f"{self.id}:{self.chosen.key}>{self.rejected.key}"


def run_identity(codec: str, codec_revision: Optional[str], tokenizer, num_codebooks: int,
                 codebook_size: int) -> dict:
    """The header's identity fields for a codec and tokenizer: a builder writes them, a run compares them."""
    from higgs_ddp.data.codec import codec_identity
    from higgs_ddp.data.token_cache import tokenizer_key

    return {"codec": codec_identity(codec, codec_revision), "num_codebooks": int(num_codebooks),
            "codebook_size": int(codebook_size), "tokenizer": tokenizer_key(tokenizer) or tokenizer.name_or_path}


# ---- reading ----


def read_header(pairs_path, expected: Optional[dict] = None) -> dict:
    """prefs.json beside ``pairs_path``, checked; with ``expected`` (``run_identity``, or some of its keys) its
    identity must match."""
    path = Path(pairs_path).parent / HEADER
    if not path.is_file():
        raise PreferenceError(f"{path}: not found (a preferences folder holds {HEADER} beside {PAIRS}, as "
                              f"higgs-ddp prefs build writes it)")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PreferenceError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(header, dict):
        raise PreferenceError(f"{path}: must be a JSON object")
    if header.get("format") != FORMAT:
        raise PreferenceError(f"{path}: format {header.get('format')!r}, this version reads format {FORMAT}")
    missing = [k for k in IDENTITY if k not in header]
    if missing:
        raise PreferenceError(f"{path}: missing {', '.join(missing)} (what the codes and tokens were made with)")
    for k in ("num_codebooks", "codebook_size"):
        if not isinstance(header[k], int) or isinstance(header[k], bool) or header[k] <= 0:
            raise PreferenceError(f"{path}: {k} must be a positive integer, got {header[k]!r}")
    if expected is not None:
        for k in IDENTITY:
            if k in expected and header[k] != expected[k]:
                raise PreferenceError(f"{path}: {k} is {header[k]!r}, this run's is {expected[k]!r}: the pairs were "
                                      f"made for another {_what(k)}; build them again with this run's model and codec")
    return header


def _what(key: str) -> str:
    return {"codec": "codec (data.codec)", "tokenizer": "tokenizer (model.tokenizer)"}.get(key, "model")


class _Problem(PreferenceError):
    """One line's problem, before it is given the line's place."""


def _candidate(obj, role: str, base: Path) -> Candidate:
    if not isinstance(obj, dict):
        raise _Problem(f"{role!r} must be an object with \"codes\" and \"key\"")
    for k in ("codes", "key"):
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            raise _Problem(f"{role}.{k} is missing or not a non-empty string")
    seed, reward, stopped = obj.get("seed"), obj.get("reward"), obj.get("stopped")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _Problem(f"{role}.seed must be an integer, got {seed!r}")
    if reward is not None and (not isinstance(reward, (int, float)) or isinstance(reward, bool)):
        raise _Problem(f"{role}.reward must be a number, got {reward!r}")
    if stopped is not None and not isinstance(stopped, bool):
        raise _Problem(f"{role}.stopped must be true or false, got {stopped!r}")
    return Candidate((base / obj["codes"]).resolve(), obj["codes"], obj["key"], seed, reward, stopped)


def _parse(obj, base: Path, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise _Problem("each line must be a JSON object")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise _Problem(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    for name, typ in FIELDS.items():
        if name in obj and not isinstance(obj[name], typ):
            raise _Problem(f"field {name!r} must be a {typ.__name__}, got {type(obj[name]).__name__}")
    for name in ("id", "text", "chosen", "rejected"):
        if name not in obj:
            raise _Problem(f"missing field {name!r}")
    if not obj["id"].strip():
        raise _Problem("field 'id' is empty")
    if not obj["text"].strip():
        raise _Problem("field 'text' is empty")
    if "ref_audio" in obj and "ref_audio_codes" in obj:
        raise _Problem("give 'ref_audio' or 'ref_audio_codes', not both")
    has_ref = "ref_audio" in obj or "ref_audio_codes" in obj
    problem = reference_problem(has_ref, obj.get("ref_text"), "'ref_audio' or 'ref_audio_codes'", "'ref_text'")
    if problem:
        raise _Problem(problem[1])
    ref = None
    if has_ref:
        is_codes = "ref_audio_codes" in obj
        shown = obj["ref_audio_codes" if is_codes else "ref_audio"]
        if not shown.strip():
            raise _Problem("the reference's path is empty")
        ref = AudioRef((base / shown).resolve(), shown, is_codes)
    chosen, rejected = (_candidate(obj[r], r, base) for r in ROLES)
    if (chosen.path, chosen.key) == (rejected.path, rejected.key):
        raise _Problem(f"chosen and rejected are the same candidate ({chosen.key} in {chosen.shown})")
    return Pair(where, obj["id"], obj["text"], chosen, rejected, ref, obj.get("ref_text"), obj.get("scene"),
                obj.get("speaker"), obj.get("language"))


def _fail(path: Path, problems: list) -> None:
    if not problems:
        return
    more = f" ({len(problems) - 1} more problem(s) in this file, listed below)" if len(problems) > 1 else ""
    listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                      if len(problems) > MAX_LISTED else [])
    raise PreferenceError(problems[0] + more + ("\n" + "\n".join(listed) if more else ""))


def read_pairs(pairs_path, expected: Optional[dict] = None, load_codes: bool = True) -> tuple[dict, list]:
    """-> (header, pairs) of ``pairs_path``, every line and (``load_codes``) every candidate's codes checked
    against the header's num_codebooks / codebook_size; ``expected``: the run's ``run_identity``.

    Raises PreferenceError whose first line is the first problem, ``FILE:LINE: what`` (the rest listed below)."""
    path = Path(pairs_path)
    if not path.is_file():
        raise PreferenceError(f"{path}: preferences file not found (data.preferences names DIR/{PAIRS})")
    header = read_header(path, expected)
    base = path.parent
    pairs, problems, seen = [], [], {}
    with path.open("rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                try:
                    raw = raw_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise _Problem(f"not valid UTF-8 text (byte {e.start})") from None
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.rstrip())
                except json.JSONDecodeError as e:
                    raise _Problem(f"invalid JSON ({e.msg} at column {e.colno})") from None
                pair = _parse(obj, base, where)
                if pair.name in seen:
                    raise _Problem(f"the same pair ({pair.name}) as line {seen[pair.name]}")
                seen[pair.name] = lineno
                pairs.append(pair)
            except _Problem as e:
                problems.append(f"{where}: {e}")
    _fail(path, problems)
    if not pairs:
        raise PreferenceError(f"{path}: no pairs in it")
    if load_codes:
        _fail(path, load_pair_codes(pairs, header["num_codebooks"], header["codebook_size"]))
    return header, pairs


def read_run_pairs(preferences, val_preferences=None, expected: Optional[dict] = None) -> tuple[list, list]:
    """A DPO run's pairs, data.preferences and data.val_preferences, each read and checked by ``read_pairs``
    -> (train pairs, validation pairs). The trainer calls it with the run's whole identity before any weight
    is built; ``higgs-ddp train`` before it starts torchrun, with the codec's alone (``launch_identity``): one
    problem is then one line, not one per rank inside torchrun's report."""
    train = read_pairs(preferences, expected)[1]
    val = read_pairs(val_preferences, expected)[1] if val_preferences else []
    return train, val


def launch_identity(codec: str, codec_revision: Optional[str]) -> dict:
    """What of ``run_identity`` is known without loading the tokenizer or the model's config: the codec."""
    from higgs_ddp.data.codec import codec_identity

    return {"codec": codec_identity(codec, codec_revision)}


def load_pair_codes(pairs: list, num_codebooks: int, codebook_size: int) -> list:
    """Every candidate's codes, mapped from their shards (each shard once) and checked -> the problems,
    ``FILE:LINE: what`` each."""
    shards: dict = {}  # path -> {key: codes} or the reason it cannot be read
    problems = []
    for pair in pairs:
        for role in ROLES:
            c: Candidate = getattr(pair, role)
            if c.path not in shards:
                shards[c.path] = _open_shard(c.path)
            tensors = shards[c.path]
            what = f"{role} codes {c.shown}"
            if isinstance(tensors, str):
                problems.append(f"{pair.where}: {what}: {tensors}")
                continue
            if c.key not in tensors:
                problems.append(f"{pair.where}: {what} holds no tensor named {c.key!r}")
                continue
            arr = tensors[c.key]
            bad = codes_problem(arr, num_codebooks, codebook_size)
            if bad:
                problems.append(f"{pair.where}: {what}, {c.key!r}: {bad}")
                continue
            c.codes = arr
    return problems


def _open_shard(path: Path):
    if not path.is_file():
        return "file not found" if not path.exists() else "not a file"
    try:
        return map_shard(path)
    except (SafetensorError, OSError, RuntimeError) as e:
        # map_shard accepts 2-D int16 tensors only: another dtype is a damaged shard for this format too
        return f"not a readable shard of int16 codes ({' '.join(str(e).split())})"


def codes_problem(arr, num_codebooks: int, codebook_size: int) -> Optional[str]:
    """What is wrong with a (codebooks, frames) codes array for this model, or None."""
    if arr.ndim != 2:
        return f"shape {tuple(arr.shape)}, expected (codebooks, frames)"
    if arr.shape[0] != num_codebooks:
        return f"{arr.shape[0]} codebooks, expected {num_codebooks}"
    if arr.shape[1] == 0:
        return "zero frames"
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        return f"code {lo if lo < 0 else hi} outside the codebook range [0, {codebook_size})"
    return None


# ---- writing ----


def write_code_shard(path, codes: dict, header: dict) -> None:
    """One shard of ``codes`` (key -> (codebooks, frames) integer array), checked against the header, written
    whole (a reader never sees half of one)."""
    tensors = {}
    for key, arr in codes.items():
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.integer):
            raise PreferenceError(f"codes {key!r}: {arr.dtype}, expected integers")
        bad = codes_problem(arr, header["num_codebooks"], header["codebook_size"])
        if bad:
            raise PreferenceError(f"codes {key!r}: {bad}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int16)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": str(FORMAT), "codec": str(header["codec"])})


def write_pairs(out_dir, header: dict, pairs: list, codes: dict, shard_entries: int = SHARD_ENTRIES) -> Path:
    """Write a preferences folder -> the path of its pairs.jsonl.

    ``header``: at least IDENTITY (``run_identity``), plus whatever says how the pairs were made ("model",
    "reward", "candidates", "seed"); "format" is added. ``pairs``: one dict per line as the format has it,
    each candidate with its "key" (and "seed", "reward", "stopped"); a candidate whose key is in ``codes`` (key ->
    (codebooks, frames) integers) gets "codes", the shard it is written to here (``shard_entries`` a shard);
    one without it must name its shard already (a builder that wrote its own with ``write_code_shard``).
    The pairs file and the header are written whole; the result is read back by ``read_pairs`` unchanged."""
    out = Path(out_dir)
    missing = [k for k in IDENTITY if k not in header]
    if missing:
        raise PreferenceError(f"write_pairs: the header misses {', '.join(missing)}")
    header = {"format": FORMAT, **{k: v for k, v in header.items() if k != "format"}}
    (out / CODES).mkdir(parents=True, exist_ok=True)
    first = 1 + max((int(p.stem.split("-")[-1]) for p in (out / CODES).glob("part-*.safetensors")
                     if p.stem.split("-")[-1].isdigit()), default=-1)
    order = list(dict.fromkeys(c["key"] for p in pairs for c in (p["chosen"], p["rejected"]) if c["key"] in codes))
    shard_of = {}
    for i in range(0, len(order), shard_entries):
        name = f"{CODES}/part-{first + i // shard_entries:05d}.safetensors"
        keys = order[i:i + shard_entries]
        write_code_shard(out / name, {k: codes[k] for k in keys}, header)
        shard_of.update(dict.fromkeys(keys, name))
    lines = []
    for n, p in enumerate(pairs):
        line = dict(p)
        for role in ROLES:
            c = dict(p[role])
            if c["key"] in shard_of:
                c["codes"] = shard_of[c["key"]]
            elif "codes" not in c:
                raise PreferenceError(f"write_pairs: pair {n} ({p.get('id')}): the {role} candidate "
                                      f"{c['key']!r} has no codes (not in codes, no \"codes\" shard named)")
            line[role] = {"codes": c.pop("codes"), "key": c.pop("key"), **c}
        lines.append(json.dumps(line, ensure_ascii=False))
    with atomic_file(out / PAIRS) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    write_json_atomic(out / HEADER, header, indent=1)
    return out / PAIRS
