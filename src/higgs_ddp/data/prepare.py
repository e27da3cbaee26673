"""Audio to codes, once: decode, down-mix, resample, condition (data.audio), encode with the codec, keep in
the code cache.

    higgs-ddp prepare --config FILE [dotted.key=value ...]
    higgs-ddp prepare --nproc-per-node 8 --config FILE      # every GPU encodes a share

Training calls the same function first, so a run on new data prepares it (ranks share the work) and a
run on prepared data only reads the cache. Data problems are reported, never raised as tracebacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from higgs_ddp.config import AudioConditioning
from higgs_ddp.data.audio import AudioProblem, DurationRule, check_path, condition, read_audio, resample
from higgs_ddp.data.code_cache import CodeCache, FileHashes
from higgs_ddp.data.codec import codec_identity, load_codec
from higgs_ddp.data.members import shares
from higgs_ddp.data.phases import Phases
from higgs_ddp.runtime.distributed import DistEnv, all_gather_objects, barrier
from higgs_ddp.runtime.shared_fs import check_shared_directory


@dataclass
class Prepared:
    codes: dict = field(default_factory=dict)  # resolved path -> (C, T) int16 codes
    seconds: dict = field(default_factory=dict)  # resolved path -> duration
    problems: dict = field(default_factory=dict)  # resolved path -> (reason, message)
    content: dict = field(default_factory=dict)  # resolved path -> sha256 of its bytes (every file that hashed)
    stats: dict = field(default_factory=dict)
    new_contents: set = field(default_factory=set)  # contents the cache lacked (encoded, or failed to)
    encoded_contents: set = field(default_factory=set)  # of them, those encoded


class _Decode(torch.utils.data.Dataset):
    """Decoding runs in DataLoader workers; resampling and encoding on the codec's device. With data.audio
    conditioning on, the workers also resample (on the CPU) and condition: loudness and peaks are judged at
    the codec's rate, on what it encodes."""

    def __init__(self, items: list, rule: DurationRule, audio: AudioConditioning, codec_rate: int):
        self.items, self.rule, self.audio, self.codec_rate = items, rule, audio, codec_rate

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, shown = self.items[i]
        try:
            return (i, *decode_for_codec(path, shown, self.rule, self.audio, self.codec_rate), None)
        except AudioProblem as e:
            return i, None, None, (e.reason, str(e))


def decode_for_codec(path, shown: str, rule: DurationRule, audio: AudioConditioning, codec_rate: int) -> tuple:
    """-> (mono float32 tensor, its rate): the audio of one file as the codec gets it. The durations are
    judged by ``rule``: from the header, and after trimming when trimming changes them."""
    wave, sr = read_audio(path, shown, 0, 0.0, rule)
    if not audio.changes_audio:
        return torch.from_numpy(wave), sr
    wave = resample(torch.from_numpy(wave), sr, codec_rate).numpy()
    wave = condition(wave, codec_rate, audio, shown)
    if audio.trim_silence:
        rule.check_encoded(len(wave) / codec_rate, shown)
    return torch.from_numpy(wave), codec_rate


def cache_identity(codec_name: str, codec_revision, audio: AudioConditioning) -> str:
    """What the cached codes depend on: the codec and the conditioning that changes the audio."""
    key = audio.cache_key()
    return codec_identity(codec_name, codec_revision) + (f"|{key}" if key else "")


def _hash_share(mine: list, shown: dict, hashes: FileHashes):
    """-> (the content hashes of this rank's share ``mine``, None where it has a problem; {path: problem}). Hashes
    go by position in the share, not by path: pickling 100k Paths to gather them costs more than finding them."""
    keys, problems = [], {}
    for path in mine:
        key = None
        try:
            check_path(path, shown[path])
            key = hashes.get(path, shown[path])
        except AudioProblem as e:
            problems[path] = (e.reason, str(e))
        except OSError as e:
            problems[path] = ("audio_unreadable", f"audio {shown[path]} cannot be read ({e.strerror})")
        keys.append(key)
    return keys, problems


def prepare_audio(refs: list, cache_dir: str, codec_name: str, codec_revision, max_seconds: float,
                  env: DistEnv, num_workers: int = 2, quiet: bool = False,
                  audio: AudioConditioning = None, phases: Phases | None = None) -> Prepared:
    """Codes for every audio file in ``refs`` (AudioRef, duplicates allowed), from the cache or encoded;
    ``audio`` is data.audio (default: no conditioning); ``phases`` times the steps of a start-up."""
    phases = phases or Phases()
    t0 = time.perf_counter()
    audio = audio or AudioConditioning()
    # Every rank encodes a share into the cache and reads all of it back: one cache, seen by all.
    check_shared_directory(cache_dir, "data.cache_dir", env)
    shown = {}
    for r in refs:
        shown.setdefault(r.path, r.shown)
    paths = sorted(shown)
    hashes = FileHashes(cache_dir)
    keys, problems = {}, {}
    dealt = shares(paths, env.world_size)  # a tar shard's members all to one rank
    for rank, (k, p, new) in enumerate(all_gather_objects(_hash_share(dealt[env.rank], shown, hashes) + (hashes.new,))):
        keys.update((path, key) for path, key in zip(dealt[rank], k) if key is not None)
        problems.update(p)
        hashes.new.update(new)
    if env.is_main:
        hashes.save()
    phases.mark("file hashes")

    cache = CodeCache(cache_dir, cache_identity(codec_name, codec_revision, audio))
    phases.mark("code cache index")
    rep = {key: path for path, key in sorted(keys.items()) if key not in cache}  # one file per new content
    todo = sorted(rep.items())
    encoded_seconds, failed, t_enc = 0.0, {}, time.perf_counter()
    if todo:
        # by path, a shard's new members all to one rank (cold: shard i to rank i % world, as hashing dealt them)
        mine = shares(sorted(todo, key=lambda item: item[1]), env.world_size, lambda item: item[1])[env.rank]
        seconds, mine_failed = _encode(mine, shown, cache, codec_name, codec_revision, max_seconds, env,
                                       num_workers, quiet, len(todo), audio)
        for sec, f in all_gather_objects((seconds, mine_failed)):
            encoded_seconds += sec
            failed.update(f)
        barrier()  # every rank's shards are on disk
        cache.refresh()
        if env.is_main:
            cache.write_index()
    t_enc = time.perf_counter() - t_enc
    if todo:
        phases.mark("encode")
    out = _found(refs, paths, shown, keys, problems, cache, rep, failed, audio, max_seconds)
    out.stats.update({"encoded_hours": encoded_seconds / 3600, "encode_seconds": t_enc,
                      "seconds": time.perf_counter() - t0})
    phases.mark("code cache load")
    return out


def prepare_local(refs: list, cache: CodeCache, hashes: FileHashes, codec_name: str, codec_revision,
                  max_seconds: float, env: DistEnv, num_workers: int = 2, quiet: bool = False,
                  audio: AudioConditioning = None, get_codec=None) -> Prepared:
    """prepare_audio for one process and no collective: one piece of a manifest (piece_prepare.py), whose
    rank hashes its files and encodes what the cache lacks itself. Two ranks whose pieces share a recording
    new to the cache may both encode it."""
    t0 = time.perf_counter()
    audio = audio or AudioConditioning()
    shown = {}
    for r in refs:
        shown.setdefault(r.path, r.shown)
    paths = sorted(shown)
    k, problems = _hash_share(paths, shown, hashes)
    keys = {path: key for path, key in zip(paths, k) if key is not None}
    rep = {key: path for path, key in sorted(keys.items()) if key not in cache}
    todo = sorted(rep.items())
    encoded_seconds, failed, t_enc = 0.0, {}, time.perf_counter()
    if todo:
        encoded_seconds, failed = _encode(todo, shown, cache, codec_name, codec_revision, max_seconds,
                                          DistEnv(device=env.device), num_workers, quiet, len(todo), audio,
                                          get_codec)
        cache.refresh()
    out = _found(refs, paths, shown, keys, problems, cache, rep, failed, audio, max_seconds)
    out.stats.update({"encoded_hours": encoded_seconds / 3600, "encode_seconds": time.perf_counter() - t_enc,
                      "seconds": time.perf_counter() - t0})
    return out


def _found(refs: list, paths: list, shown: dict, keys: dict, problems: dict, cache: CodeCache, rep: dict,
           failed: dict, audio: AudioConditioning, max_seconds: float) -> Prepared:
    """The codes of every file that hashed (``keys``: path -> content) from the cache, once the new contents
    (``rep``: content -> the file encoded for it) are encoded or ``failed``; -> Prepared (stats in part)."""
    out = Prepared()
    for path, key in keys.items():
        if key in failed:  # reported for every file with that content, each under its own name
            reason, message = failed[key]
            problems[path] = (reason, message.replace(shown[rep[key]], shown[path]))
    usable = {path: key for path, key in keys.items() if path not in problems}
    encoded = DurationRule(0.0, audio.min_seconds, max_seconds, audio.trim_silence)  # (the codec's: when encoded)
    for path, key in usable.items():
        try:  # cached under looser limits
            encoded.check_encoded(cache.seconds(key), shown[path])
        except AudioProblem as e:
            problems[path] = (e.reason, str(e))
    usable = {p: k for p, k in usable.items() if p not in problems}
    loaded = cache.load(set(usable.values()))
    out.codes = {p: loaded[k] for p, k in usable.items()}
    out.seconds = {p: cache.seconds(k) for p, k in usable.items()}
    out.problems = problems
    out.content = keys
    out.new_contents, out.encoded_contents = set(rep), set(rep) - set(failed)
    out.stats = {
        "references": len(refs), "files": len(paths),
        "distinct": len(set(keys.values())) + len(problems.keys() - keys.keys()),
        "cached": len(set(keys.values()) - rep.keys()),  # recordings, as "encoded" counts them
        "encoded": len(rep) - len(failed), "failed": len(problems), "audio_hours": sum(out.seconds.values()) / 3600,
        "cache": str(cache.dir),
    }
    return out


def _encode(mine: list, shown: dict, cache: CodeCache, codec_name, codec_revision, max_seconds, env: DistEnv,
            num_workers: int, quiet: bool, total: int, audio: AudioConditioning = None, get_codec=None):
    """``get_codec``: -> the codec, kept by the caller (a rank encoding piece after piece loads it once)."""
    audio = audio or AudioConditioning()
    codec = get_codec() if get_codec else load_codec(codec_name, codec_revision, device=env.device)
    writer = cache.writer()
    items = [(path, shown[path]) for _, path in mine]
    rule = DurationRule(codec.min_seconds, audio.min_seconds, max_seconds, audio.trim_silence)
    loader = torch.utils.data.DataLoader(_Decode(items, rule, audio, codec.sample_rate),
                                         batch_size=None,
                                         num_workers=num_workers, prefetch_factor=4 if num_workers else None)
    problems, seconds = {}, 0.0
    # Rank 0 counts only its own share: say so, or "17 new files: 9/9" reads as finished early.
    share = f"{total} new files" if env.world_size == 1 else \
        f"rank 0's {len(items)} of {total} new files, {env.world_size} ranks"
    bar = tqdm(total=len(items), disable=quiet or not env.is_main, unit="file", dynamic_ncols=True,
               desc=f"encode ({share})")
    t0 = time.perf_counter()
    try:
        for i, wave, sr, problem in loader:
            key = mine[i][0]
            if problem is not None:
                problems[key] = problem
            else:
                dur = wave.numel() / sr
                wave = resample(wave.to(env.device, non_blocking=True), sr, codec.sample_rate)
                writer.add(key, codec.encode(wave), dur)
                seconds += dur
            bar.update(1)
            bar.set_postfix_str(f"{seconds / 3600 / max(time.perf_counter() - t0, 1e-9):.3g} audio-h/s")
    finally:
        writer.flush()  # whatever was encoded survives an interruption
        bar.close()
    del codec
    if env.device.type == "cuda" and not get_codec:
        torch.cuda.empty_cache()
    return seconds, problems


def summary_line(stats: dict) -> str:
    s = stats
    rate = (f"; encoded {s['encoded_hours']:.2f} h of audio in {s['encode_seconds']:.1f} s "
            f"({s['encoded_hours'] * 3600 / max(s['encode_seconds'], 1e-9):.0f}x real time)") if s["encoded"] else ""
    # References, files and recordings all counted: 80 lines naming 40 files of 40 recordings say so.
    return (f"prepare: {s['references']} audio references to {s['files']} files ({s['distinct']} distinct "
            f"recordings): {s['cached']} cached, {s['encoded']} encoded, {s['failed']} with problems; "
            f"{s['audio_hours']:.2f} h usable{rate}; cache {s['cache']}")
