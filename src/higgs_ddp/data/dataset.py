"""From manifests to training samples: parse, get codes (cache / prepare / .npy), tokenize, apply the
bad-input policy, split off validation.

``data.on_error: error`` stops before training with every problem listed (``file:line: what``);
``skip`` drops the bad samples, counts them by reason and trains on the rest. Either way the full list
goes to ``{output_dir}/data_report.json``.
"""

from __future__ import annotations

import gc
import hashlib
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from higgs_ddp.config import Config, ConfigError
from higgs_ddp.data.audio import AudioProblem, DurationRule, frame_energy
from higgs_ddp.runtime.files import write_json_atomic
from higgs_ddp.data import piece_prepare, sources
from higgs_ddp.data.index_start import IndexedStart
from higgs_ddp.data.manifest import Entry, Problem, read_manifest
from higgs_ddp.data.members import watched
from higgs_ddp.data.phases import Phases
from higgs_ddp.data.prompt import Sample, check_audio_count
from higgs_ddp.data.records import Data, Record, fingerprint  # noqa: F401 (where they were, for their users)
from higgs_ddp.data.references import Pairing, pair_same_speaker, without_reference
from higgs_ddp.data.token_cache import TokenCache, entry_key
from higgs_ddp.runtime.distributed import DistEnv, barrier
from higgs_ddp.errors import HiggsError

MAX_LISTED = 50


class DataError(HiggsError, ValueError):
    """Bad input data; the message lists every problem, one line each, naming file and line."""


class ManifestDataset(torch.utils.data.Dataset):
    def __init__(self, records: list):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> Sample:
        return self.records[idx].sample()

    @property
    def lengths(self) -> np.ndarray:
        if hasattr(self.records, "lengths"):  # a prepared index's column: no record is built
            return self.records.lengths
        return np.fromiter((r.positions for r in self.records), np.int64, len(self.records))


def load_codes_file(path: Path, shown: str, num_codebooks: int, codebook_size: int) -> np.ndarray:
    if not path.exists():
        raise AudioProblem("codes_missing", f"codes file {shown} not found")
    if path.is_dir():
        raise AudioProblem("codes_is_directory", f"codes file {shown} is a directory, not a file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files; report, don't crash
        raise AudioProblem("codes_unreadable",
                           f"codes file {shown} is not a readable .npy array ({type(e).__name__})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise AudioProblem("codes_bad_shape", f"codes file {shown} must be a 2-D integer array "
                           f"(codebooks, frames), got {arr.dtype} {arr.shape}")
    return check_codes(arr, f"codes file {shown}", num_codebooks, codebook_size)


def check_codes(arr: np.ndarray, what: str, num_codebooks: int, codebook_size: int) -> np.ndarray:
    if arr.shape[0] != num_codebooks:
        raise AudioProblem("codes_bad_shape", f"{what} has {arr.shape[0]} codebooks, the model uses {num_codebooks}")
    if arr.shape[1] == 0:
        raise AudioProblem("codes_bad_shape", f"{what} has zero frames")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        bad = lo if lo < 0 else hi
        raise AudioProblem("codes_out_of_range", f"{what} holds code {bad}, outside the codebook range "
                           f"[0, {codebook_size})")
    return arr.astype(np.int16, copy=False)  # cached codes are int16 already: no second copy


def positions(sample: Sample, audio_in_id: int, audio_out_id: int, num_codebooks: int, use_delay: bool,
              encode_audio_in: bool) -> int:
    """Sequence positions after the model expands audio (stream BOS + EOS, plus the delay pattern)."""
    return count_positions(sample.input_ids.numpy(), [c.shape[1] for c in sample.audio_codes], audio_in_id,
                           audio_out_id, num_codebooks, use_delay, encode_audio_in)


def count_positions(ids: np.ndarray, frames: list, audio_in_id: int, audio_out_id: int, num_codebooks: int,
                    use_delay: bool, encode_audio_in: bool) -> int:
    """``positions`` from the token ids and each audio content's number of frames."""
    extra = 2 + (num_codebooks - 1 if use_delay else 0)
    n = len(ids)
    slots = ids[(ids == audio_in_id) | (ids == audio_out_id)].tolist()
    for slot, t in zip(slots, frames):
        n -= 1
        if slot == audio_out_id or encode_audio_in:
            n += t + extra
    return n


def _audio_codes(entries: list, cfg: Config, env: DistEnv, C: int, K: int, quiet: bool, phases: Phases,
                 prepare=None):
    """-> (path -> codes, path -> (reason, message), path -> seconds, path -> content hash), for every audio
    and codes file the entries name (content hashes: audio files only). ``prepare``: audio refs -> Prepared,
    in place of prepare_audio (a piece's, piece_prepare.py: no collective, no summary printed)."""
    from higgs_ddp.data.prepare import prepare_audio, summary_line

    d = cfg.data
    audio_refs = [r for e in entries for r in e.audio if not r.is_codes]
    found, failed, seconds, content = {}, {}, {}, {}
    if audio_refs:
        prep = prepare(audio_refs) if prepare else prepare_audio(
            audio_refs, cache_dir(cfg), d.codec, d.codec_revision, d.max_audio_seconds, env, d.num_workers, quiet,
            d.audio, phases)
        if env.is_main and not quiet and not prepare:
            print(summary_line(prep.stats), flush=True)
        for path, arr in prep.codes.items():
            if arr.shape[0] != C:  # the codec, not the data, is wrong: one config error, not a list
                raise ConfigError(f"data.codec={d.codec} produces {arr.shape[0]} codebooks, the model uses {C}")
            try:
                found[path] = check_codes(arr, f"audio {path.name} (encoded)", C, K)
            except AudioProblem as e:
                failed[path] = (e.reason, str(e))
        failed.update(prep.problems)
        seconds, content = prep.seconds, prep.content
    for r in {r.path: r for e in entries for r in e.audio if r.is_codes}.values():
        try:
            found[r.path] = load_codes_file(r.path, r.shown, C, K)
        except AudioProblem as e:
            failed[r.path] = (e.reason, str(e))
    phases.mark("code check")
    return found, failed, seconds, content


def _clip_seconds(r, found: dict, seconds: dict) -> float:
    whole = seconds.get(r.path, 0.0)
    return whole if r.frames is None else whole * r.frames / found[r.path].shape[1]


def cache_dir(cfg: Config) -> str:
    """data.cache_dir, by default beside the first manifest (or, training on preference pairs, beside them)."""
    first = cfg.data.manifest[0] if cfg.data.manifest else cfg.data.preferences
    return cfg.data.cache_dir or str(Path(first).parent / ".higgs_codes")


def _tokens(entries: list, cfg: Config, env: DistEnv, tokenizer) -> tuple:
    """-> (token cache holding every entry that could be tokenized, entry keys, {key: problem message}).

    A cold start shares the tokenizing between the ranks (each writes its share as a shard, then all read
    every shard); a warm start only reads."""
    cache = TokenCache(cache_dir(cfg), tokenizer)
    keys = [entry_key(e.chatml) for e in entries]
    todo = list({k: (k, e.chatml, e.id) for k, e in zip(keys, entries) if k not in cache}.values())
    failed = {}
    if todo and cache.dir is not None:
        barrier()  # every rank has its list before any rank writes a shard
        failed = cache.tokenize(todo[env.rank::env.world_size])
        barrier()
        cache.refresh()
        if env.is_main:
            cache.remove_damaged()
    rest = [t for t in todo if t[0] not in cache and t[0] not in failed]
    failed.update(cache.tokenize(rest))  # another rank's failures (reported by every rank), or no cache
    return cache, keys, failed


def _records(entries: list, keys: list, found: dict, failed: dict, seconds: dict, tokens, untokenized: dict,
             tokenizer, mc, budget: int):
    ids = tokenizer.convert_tokens_to_ids
    in_id, out_id = ids("<|AUDIO|>"), ids("<|AUDIO_OUT|>")
    records, problems = [], []
    for e, key in zip(entries, keys):
        bad = [failed[r.path] for r in e.audio if r.path in failed]
        if bad:
            problems += [Problem(e.where, reason, message) for reason, message in bad]
            continue
        codes = [found[r.path][:, :r.frames] for r in e.audio]  # frames: a reference cut to its bounds
        try:
            if key in untokenized:
                raise ValueError(untokenized[key])
            input_ids, label_ids, n_audio = tokens.get(key)
            check_audio_count(n_audio, len(codes), e.id)
        except ValueError as err:
            problems.append(Problem(e.where, "bad_prompt", str(err)))
            continue
        n = count_positions(input_ids, [c.shape[1] for c in codes], in_id, out_id, mc.audio_num_codebooks,
                            mc.use_delay_pattern, mc.encode_audio_in_tokens)
        if budget and n > budget:
            problems.append(Problem(e.where, "too_long_for_batch", f"sample needs {n} positions, more than "
                                    f"data.max_tokens_per_batch={budget}"))
            continue
        records.append(Record(e.where, e.id, input_ids, label_ids, codes, n,
                              sum(_clip_seconds(r, found, seconds) for r in e.audio), e.speaker))
    return records, problems


def _same_speaker(train_e: list, val_e: list, found: dict, cfg: Config, pairing: Pairing) -> tuple:
    """data.reference=same_speaker (see references.py): the pool is the training clips, those of
    data.val_fraction's validation share left out."""
    from higgs_ddp.data.codec import codec_rates
    from higgs_ddp.data.prepare import decode_for_codec

    d = cfg.data
    codec_rate, frame_rate = codec_rates(d.codec, d.codec_revision)
    lo, hi = (round(s * frame_rate) for s in d.reference_seconds)
    pairing.shortest_seconds = d.reference_seconds[0]
    training = {id(e) for e in train_e if not (d.val_fraction and _in_val(e.id, d.val_fraction))}

    def energy(ref):  # the audio as it was encoded, for where to cut it
        if ref.is_codes:
            return None
        try:
            wave, sr = decode_for_codec(ref.path, ref.shown, DurationRule(), d.audio, codec_rate)
        except AudioProblem:  # changed since it was encoded (its codes came from the cache): cut at the limit
            return None
        return frame_energy(wave.numpy(), sr, frame_rate)

    paired = pair_same_speaker(train_e + val_e, found, lambda e: id(e) in training, cfg.train.seed, lo, hi,
                               frame_rate, energy, pairing)
    return paired[:len(train_e)], paired[len(train_e):]


def _overlaps(train_e: list, val_e: list) -> tuple[list, list, list]:
    """-> (train, val, problems): a sample whose id an earlier one has is dropped, and so is a validation
    sample that is also a training sample (the same id, or the same clip learned): it would score memorised
    data. Ids key the validation split, the checkpoint's data fingerprint and the report, so they must be
    unique; a sample meant twice needs two ids. Shared context (a reference clip) is no overlap."""
    by_id, train_clips, problems = {}, {}, []  # id -> (entry, is_val); learned clip -> training entry

    def problem(e: Entry, is_val: bool) -> Optional[Problem]:
        other, other_is_val = by_id.get(e.id, (None, False))
        if other is not None and is_val and not other_is_val:
            return Problem(e.where, "val_in_train", f"validation sample id {e.id!r} is also the training "
                           f"sample at {other.where}")
        if other is not None:
            hint = ("" if e.id_given else " (a line without \"id\" gets its manifest's file name and line "
                    "as its id: give the lines ids, or name the manifests differently)")
            return Problem(e.where, "duplicate_id", f"id {e.id!r} is already the id of {other.where}{hint}")
        shared = [r for r in e.learned if r.path in train_clips] if is_val else []
        if shared:
            return Problem(e.where, "val_in_train", f"validation sample learns {shared[0].shown}, which the "
                           f"training sample at {train_clips[shared[0].path].where} learns too")
        return None

    kept = ([], [])
    for is_val, entries in ((False, train_e), (True, val_e)):
        for e in entries:
            bad = problem(e, is_val)
            if bad is not None:
                problems.append(bad)
                continue
            kept[is_val].append(e)
            by_id[e.id] = (e, is_val)
            if not is_val:
                train_clips.update({r.path: e for r in e.learned if r.path not in train_clips})
    return kept[0], kept[1], problems


def _same_recordings(train_e: list, val_e: list, content: dict, val_fraction: float) -> tuple[list, list, list]:
    """-> (train, val, problems): a validation sample (of data.val_manifest, or one data.val_fraction will pick)
    that learns the same recording as a training sample, by content (sha256 of the file: a copy, a symlink,
    the same file under another id), is dropped: it would score memorised data. ``_overlaps`` compares ids
    and paths before any audio is read; this runs once prepare has hashed every file. A clip given as .npy
    codes is compared by path."""
    def key(r):
        return content.get(r.path, r.path)

    def in_val(e: Entry, listed_val: bool) -> bool:
        return listed_val or bool(val_fraction and _in_val(e.id, val_fraction))

    learned = {}  # recording -> (training entry, its AudioRef)
    for e in train_e:
        if not in_val(e, False):
            for r in e.learned:
                learned.setdefault(key(r), (e, r))
    kept, problems = ([], []), []
    for listed_val, entries in ((False, train_e), (True, val_e)):
        for e in entries:
            shared = next((r for r in e.learned if key(r) in learned), None) if in_val(e, listed_val) else None
            if shared is None:
                kept[listed_val].append(e)
                continue
            other, ref = learned[key(shared)]
            same = (f"which the training sample at {other.where} learns too" if ref.path == shared.path else
                    f"the same recording (identical bytes) as {ref.shown}, which the training sample at "
                    f"{other.where} learns")
            problems.append(Problem(e.where, "val_in_train", f"validation sample learns {shared.shown}, {same}"))
    return kept[0], kept[1], problems


def _in_val(sample_id: str, fraction: float) -> bool:
    # By a hash of the id, so adding data never moves a sample between the splits.
    h = int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


DEMO_DATA = "runs/tiny/data"  # where `make demo` writes the demo's corpus (Makefile: demo-data)


def check_manifests(cfg: Config) -> None:
    """The manifests are there: nothing to skip to otherwise, so this is refused before any work (train calls
    it before it takes the run's folder, so that nothing is made there). A run on preference pairs reads them
    instead (pair_data.check_preferences)."""
    if cfg.train.objective == "dpo":
        return check_preferences(cfg)
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is required (one path or a list)")
    listed = [*cfg.data.manifest, *cfg.data.val_manifest]
    folders = [m for m in listed if Path(m).is_dir() and sources.source_layout(m) is None]
    if folders:
        raise DataError(f"data.manifest {folders[0]}: a folder, but neither WebDataset .tar shards nor a Hugging "
                        f"Face datasets folder (other layouts: `higgs-ddp manifest import`)")
    missing = [m for m in listed if not Path(m).is_file() and sources.source_layout(m) is None]
    if missing:
        raise DataError(missing_manifests(missing))


def check_preferences(cfg: Config) -> None:
    """train.objective=dpo: the pairs files are there (their contents: data/preferences.py, at the start)."""
    missing = [p for p in (cfg.data.preferences, cfg.data.val_preferences) if p and not Path(p).is_file()]
    if missing:
        raise DataError(f"preferences file not found: {', '.join(missing)} (data.preferences names DIR/pairs.jsonl "
                        f"as `higgs-ddp prefs build --out DIR` writes it)")


def missing_manifests(paths: list) -> str:
    """One line: which manifests are not there, where a relative path was looked for, and for the demo's
    (configs/tiny.yaml run before `make demo`, or from another folder) what writes it."""
    text = f"manifest not found: {', '.join(paths)}"
    if any(not Path(m).is_absolute() for m in paths):
        text += f" (a relative path is read from the current folder, {Path.cwd()}, or beside the config)"
    if any(Path(m).as_posix().endswith(f"{DEMO_DATA}/manifest.jsonl") for m in paths):
        text += (f"; the demo's is written by `make demo` (or `higgs-ddp demo-data {DEMO_DATA}`, then `higgs-ddp "
                 f"manifest import --format ljspeech {DEMO_DATA} --out {DEMO_DATA}/manifest.jsonl`), in the "
                 f"repository's folder: run from there")
    return text


def full_way() -> SimpleNamespace:
    """The steps of the full way a piece takes as they are (piece_prepare.py: this module imports it)."""
    return SimpleNamespace(audio_codes=_audio_codes, records=_records, in_val=_in_val, conclude=conclude,
                           check_manifests=check_manifests, error=DataError)


def load_data(cfg: Config, env: DistEnv, tokenizer, model_config, quiet: bool = False,
              report_path: Optional[Path] = None) -> Data:
    """The training and validation samples of ``cfg.data``; the data report goes to ``report_path``, by
    default the run's ``{output_dir}/data_report.json``."""
    # Millions of small objects, none of them garbage: the cyclic collector would walk them all again and
    # again while they are made (measured: a third of a warm start at 10k clips).
    enabled = gc.isenabled()
    gc.disable()
    try:
        report_path = Path(report_path or Path(cfg.output_dir) / "data_report.json")
        check_manifests(cfg)
        # shards or a datasets folder named as a manifest: their manifest of in-place members (sources.py)
        cfg, source_problems = sources.resolve(cfg, env, quiet, cache_dir(cfg))
        start = IndexedStart(cfg, env, tokenizer, model_config, quiet, cache_dir(cfg), report_path)
        data = start.open()
        if data is None and start.folder is not None and piece_prepare.applies(cfg):
            prepared = piece_prepare.prepare_index(cfg, env, tokenizer, model_config, quiet, report_path, start,
                                                   full_way(), source_problems)
            data = start.open()
            if data is not None:  # the time of the preparation with the index's start's
                for key, times in (("startup_seconds", prepared.seconds), ("startup_cpu_seconds",
                                                                          prepared.cpu_seconds)):
                    data.report[key] = {**times, **data.report[key]}
        if data is None:
            data = _load_data(cfg, env, tokenizer, model_config, quiet, report_path, start.folders, source_problems)
            phases = Phases()
            start.save(data)
            phases.mark("index write")  # (rank 0's; the other ranks wait for it at their next collective)
            for key, times in (("startup_seconds", phases.seconds), ("startup_cpu_seconds", phases.cpu_seconds)):
                data.report[key].update(times)
        return data
    finally:
        if enabled:
            gc.enable()


def _load_data(cfg: Config, env: DistEnv, tokenizer, model_config, quiet: bool, report_path: Path,
               folders: set, source_problems: list = ()) -> Data:
    """The full way; ``folders`` gets the folder of every file the manifests name (the index's signature);
    ``source_problems``: what the import of shard sources left out (sources.py), reported first."""
    check_manifests(cfg)
    d = cfg.data
    C, K = model_config.audio_num_codebooks, model_config.audio_codebook_size
    phases = Phases()
    problems, train_e, val_e = list(source_problems), [], []
    for paths, into in ((d.manifest, train_e), (d.val_manifest, val_e)):
        for path in paths:
            entries, bad = read_manifest(path, d.root, d.allow_outside_root)
            folders.update(watched(r.path) for e in entries for r in e.audio)
            into += entries
            problems += bad
    parsed = len(train_e) + len(val_e)
    train_e, val_e, bad = _overlaps(train_e, val_e)
    problems += bad
    pairing = Pairing(d.reference)
    if d.reference != "given":  # the manifest's own references are not used (nor encoded)
        kept = [without_reference(e) for e in train_e + val_e]
        pairing.replaced = sum(a is not b for a, b in zip(kept, train_e + val_e))
        train_e, val_e = kept[:len(train_e)], kept[len(train_e):]
    phases.mark("manifest")
    found, failed, seconds, content = _audio_codes(train_e + val_e, cfg, env, C, K, quiet, phases)
    train_e, val_e, bad = _same_recordings(train_e, val_e, content, d.val_fraction)
    problems += bad
    if d.reference == "same_speaker":
        train_e, val_e = _same_speaker(train_e, val_e, found, cfg, pairing)
        phases.mark("references")
    tokens, keys, untokenized = _tokens(train_e + val_e, cfg, env, tokenizer)
    phases.mark("tokens")
    train, bad = _records(train_e, keys[:len(train_e)], found, failed, seconds, tokens, untokenized, tokenizer,
                          model_config, d.max_tokens_per_batch)
    problems += bad
    val, bad = _records(val_e, keys[len(train_e):], found, failed, seconds, tokens, untokenized, tokenizer,
                        model_config, d.max_tokens_per_batch)
    problems += bad
    phases.mark("lengths")
    order = {m: i for i, m in enumerate(list(d.manifest) + list(d.val_manifest))}

    def by_place(p: Problem):  # manifest order, then line number
        path, _, line = p.where.rpartition(":")
        return (order.get(path, -1), int(line)) if line.isdigit() else (order.get(p.where, -1), 0)

    problems.sort(key=by_place)
    if d.val_fraction > 0:
        picked = [_in_val(r.id, d.val_fraction) for r in train]
        val += [r for r, v in zip(train, picked) if v]
        train = [r for r, v in zip(train, picked) if not v]
    report = {
        "policy": d.on_error, "manifests": list(d.manifest), "val_manifests": list(d.val_manifest),
        "entries": parsed + len(source_problems),
        "train_samples": len(train), "val_samples": len(val),
        "skipped": len(problems), "skipped_by_reason": dict(sorted(Counter(p.reason for p in problems).items())),
        "train_audio_hours": sum(r.seconds for r in train) / 3600,
        "references": pairing.report(),
        "problems": [{"where": p.where, "reason": p.reason, "message": p.message} for p in problems],
    }
    phases.mark("split")
    report["startup_seconds"] = phases.seconds  # (without the report's own writing)
    report["startup_cpu_seconds"] = phases.cpu_seconds
    conclude(cfg, env, quiet, report_path, report, problems, pairing, phases, len(train), len(val))
    return Data(train, val, report)


def conclude(cfg: Config, env: DistEnv, quiet: bool, report_path: Path, report: dict, problems: list,
             pairing: Pairing, phases: Phases, n_train: int, n_val: int) -> None:
    """The end of a load, the full way's or the pieces' join: the report written (rank 0), the problems
    raised (data.on_error=error) or counted, a split with nothing in it refused."""
    d = cfg.data
    if env.is_main:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report_path, report)
    if problems and d.on_error == "error":
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                         if len(problems) > MAX_LISTED else [])
        # The first line names the first problem too: it is the line repeated last under torchrun, below
        # the ranks' output, where a header alone would leave the problem far above.
        raise DataError(f"{len(problems)} problem(s) in the data, the first: {problems[0]} (full list: "
                        f"{report_path}; data.on_error=skip trains on the rest)\n" + "\n".join(map(str, shown)))
    if env.is_main and not quiet and d.reference != "given":
        print(pairing.line(), flush=True)
        if pairing.warning():
            print(f"higgs-ddp: warning: {pairing.warning()}", file=sys.stderr, flush=True)
    if problems and env.is_main and not quiet:
        counts = ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items())
        print(f"data: skipped {len(problems)} bad sample(s) ({counts}); list in {report_path}",
              flush=True)
    if env.is_main and not quiet and phases is not None:  # (None: the pieces' join; the index start says it)
        print(f"data: ready in {phases.line()}", flush=True)
    if not n_train:
        raise DataError(f"no usable training samples in {', '.join(d.manifest)}")
    if d.val_fraction > 0 and not n_val:
        raise DataError(f"data.val_fraction={d.val_fraction:g} selected none of the {n_train} samples; "
                        f"raise it or give data.val_manifest")
