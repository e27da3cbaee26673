"""Corpora in the layouts other TTS tools use, read into our manifest rows (``data/manifest.py``'s simple form).

One small reader per layout, each yielding ``Clip``s (or ``Problem``s for what it cannot read); ``detect``
recognises a layout for ``--format auto``; ``import_corpus`` checks every clip the way the training data
check does (``audio.check_header``: the same reasons, but headers only, so 100k clips take seconds) and
gives the rows with paths relative to the manifest they go into. Writing them is ``write_manifest``.

Layouts (``SRC`` is a folder unless said otherwise):

- ``ljspeech``: ``metadata.csv`` (``id|text|normalized text``, no header, no quoting: a line of more fields is
  refused) + ``wavs/{id}.wav``
- ``libritts``: ``speaker/chapter/*.wav`` + ``*.normalized.txt`` (LibriTTS, LibriTTS-R; any folder above)
- ``vctk``: ``txt/{speaker}/{utt}.txt`` + an audio folder (``wav48_silence_trimmed/{speaker}/{utt}_mic1.flac``,
  ``wav48/{speaker}/{utt}.wav``, ...), or speaker folders holding each clip with its ``.txt`` beside it
- ``fish``: audio files with a ``.lab`` transcript beside each (Fish-Speech); the first folder is the speaker
- ``csv``: a CSV/TSV/pipe file (or a folder's ``metadata.csv``) whose header names the audio, text and (optional) speaker columns: F5-TTS's
  ``audio_file|text``, Coqui's ``audio_file|text|speaker_name``
- ``higgs-json``: ``metadata.json`` with ``samples`` (``audio_file``, ``transcript_file`` or ``text``,
  ``speaker_id``, ``scene``, ``ref_audio_file`` + ``ref_transcript``): JimmyMa99/train-higgs-audio, Mixomo's GUI
- ``swift``: an ms-swift JSONL file (``messages`` + ``audios``): one audio, its transcript the text turn
- ``audiofolder``: a Hugging Face ``audiofolder`` (``metadata.csv`` or ``metadata.jsonl`` with ``file_name`` and
  a text column, at the top or in split folders)
- ``webdataset``: WebDataset tar shards (a .tar, a folder of them, or a brace pattern ``s-{000000..000009}.tar``),
  each sample ``KEY.mp3|flac|wav`` + ``KEY.json`` (``text`` or ``transcript``, ``speaker``, ``id``): the Emilia
  layout. The one format that writes files: the rest of the pipeline reads audio by path, so each sample's
  audio is extracted beside the manifest, ``<shard stem>/<KEY>.<ext>`` (``tar_shards`` says how shards are read),
  or with ``extract=False`` (``--no-extract``) named in its shard, ``shards/s.tar#KEY.flac@OFFSET`` (``members``)
- ``hf``: a Hugging Face ``datasets`` folder (``save_to_disk``'s Arrow files, every split of a ``DatasetDict``; or
  Parquet files), one split's folder, or one .arrow/.parquet file: an ``Audio`` column + text (+ speaker, id).
  Audio held as bytes is extracted beside the manifest, ``<the file's path>/<row>.<ext>``; audio held as a path
  is read there (``hf_tables`` says how the files are read, and why not with ``datasets``); with
  ``extract=False`` a row holding bytes is named by its number, ``data/train-00000.parquet#17`` (``members``)
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from higgs_ddp.data.audio import AudioProblem, check_header
from higgs_ddp.data.hf_tables import FileDamage, TableError, columns, data_files, is_hf_folder, read_rows
from higgs_ddp.data.manifest import Problem
from higgs_ddp.data.members import member_of, member_ref
from higgs_ddp.data.tar_shards import Damage, Sample, ShardError, is_pattern, read_shard, shard_paths
from higgs_ddp.errors import HiggsError
from higgs_ddp.runtime.files import atomic_file

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")
AUDIO_COLUMNS = ("audio_file", "audio", "file_name", "audio_path", "audio_filepath", "path", "file", "filename",
                 "wav", "wav_path")
TEXT_COLUMNS = ("text", "transcript", "transcription", "normalized_text", "sentence", "raw_text")
SPEAKER_COLUMNS = ("speaker_name", "speaker", "speaker_id", "spk", "spk_id")
ID_COLUMNS = ("id", "utt_id", "utterance_id")


class LayoutError(HiggsError, ValueError):
    """The source as a whole cannot be read (no such folder, layout not recognised): one line, exit 2."""


@dataclass
class Clip:
    where: str  # the source line or file, for messages
    audio: Path
    text: str
    speaker: Optional[str] = None
    id: Optional[str] = None
    ref_audio: Optional[Path] = None
    ref_text: Optional[str] = None
    scene: Optional[str] = None


Item = Union[Clip, Problem]


def _shown(path: Path, src: Path) -> str:
    try:
        return str(path.relative_to(src))
    except ValueError:
        return str(path)


def _text_lines(path: Path, shown: str) -> Iterator[tuple]:
    """(line number, text | Problem) for each non-empty line; undecodable bytes are a problem of that line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield lineno, Problem(f"{shown}:{lineno}", "bad_utf8", f"not valid UTF-8 text (byte {e.start})")
                continue
            if text.strip():
                yield lineno, text


def _json_lines(path: Path, shown: str) -> Iterator[tuple]:
    """(where, object | Problem) for each non-empty line of a JSONL file."""
    for lineno, line in _text_lines(path, shown):
        where = f"{shown}:{lineno}"
        if isinstance(line, Problem):
            yield where, line
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, Problem(where, "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        yield where, obj if isinstance(obj, dict) else Problem(where, "not_an_object", "each line must be a "
                                                                "JSON object")


def _transcript(path: Path, shown: str) -> Union[str, Problem]:
    if not path.is_file():
        return Problem(shown, "transcript_missing", f"transcript {shown} not found")
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        return Problem(shown, "bad_utf8", f"transcript {shown} is not valid UTF-8 text (byte {e.start})")


def _audio_beside(stem_path: Path) -> Optional[Path]:
    for suffix in AUDIO_SUFFIXES:
        if stem_path.with_name(stem_path.name + suffix).is_file():
            return stem_path.with_name(stem_path.name + suffix)
    return None


# ---------------------------------------------------------------------------------------------- readers


def read_ljspeech(src: Path, speaker: Optional[str]) -> Iterator[Item]:
    folder, meta = (src.parent, src) if src.is_file() else (src, src / "metadata.csv")
    if not meta.is_file():
        raise LayoutError(f"{meta}: not found (an LJSpeech folder holds metadata.csv and wavs/)")
    shown = _shown(meta, folder)
    for lineno, line in _text_lines(meta, shown):
        if isinstance(line, Problem):
            yield line
            continue
        fields = line.split("|")  # no quoting: LJSpeech texts start with quotation marks
        if not 2 <= len(fields) <= 3:  # more: a '|' inside a transcript, which no rule tells from a separator
            yield Problem(f"{shown}:{lineno}", "bad_row", "expected id|text|normalized text (2 or 3 fields "
                          f"separated by '|'), got {len(fields)} field{'s' * (len(fields) > 1)}"
                          + (" (a '|' inside a transcript cannot be told from a separator: replace it)"
                             if len(fields) > 3 else ""))
            continue
        text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
        yield Clip(f"{shown}:{lineno}", folder / "wavs" / f"{fields[0]}.wav", text.strip(), speaker, fields[0])


def _pick(header: list, names: tuple, given: Optional[str]) -> Optional[str]:
    if given:
        return given if given in header else None
    lower = {h.lower().strip(): h for h in header}
    return next((lower[n] for n in names if n in lower), None)


def _columns(header: list, where: str, text_column: Optional[str], needs_audio: tuple = AUDIO_COLUMNS) -> dict:
    cols = {"audio": _pick(header, needs_audio, None), "text": _pick(header, TEXT_COLUMNS, text_column),
            "speaker": _pick(header, SPEAKER_COLUMNS, None), "id": _pick(header, ID_COLUMNS, None),
            "ref_audio": _pick(header, ("ref_audio", "ref_audio_file"), None),
            "ref_text": _pick(header, ("ref_text", "ref_transcript"), None)}
    if cols["audio"] is None or cols["text"] is None:
        missing = f"audio column (one of {', '.join(needs_audio)})" if cols["audio"] is None else \
            f"column {text_column!r} (--text-column)" if text_column else \
            f"text column (one of {', '.join(TEXT_COLUMNS)}; or name it with --text-column)"
        raise LayoutError(f"{where}: the header {header} has no {missing}")
    return cols


def _row_clip(row: dict, cols: dict, base: Path, where: str, speaker: Optional[str]) -> Item:
    def get(key):
        return (row.get(cols[key]) or "").strip() if cols[key] else ""

    audio = get("audio")
    if not audio:
        return Problem(where, "empty_path", f"column {cols['audio']!r} is empty")
    ref = get("ref_audio")
    if bool(ref) != bool(get("ref_text")):
        return Problem(where, "ref_without_text", "a reference needs both its audio and its transcript")
    return Clip(where, base / audio, get("text"), get("speaker") or speaker, get("id") or None,
                base / ref if ref else None, get("ref_text") or None)


def _delimiter(first_line: str, suffix: str) -> str:
    if suffix == ".tsv" or "\t" in first_line:
        return "\t"
    return "|" if "|" in first_line else ","


def read_csv(src: Path, speaker: Optional[str], text_column: Optional[str] = None) -> Iterator[Item]:
    if src.is_dir():  # F5-TTS and Coqui keep theirs as metadata.csv in the corpus folder
        src = src / "metadata.csv"
    if not src.is_file():
        raise LayoutError(f"{src}: the csv format reads one file (CSV, TSV or '|'-separated, with a header)")
    shown = src.name
    lines = _text_lines(src, shown)
    first = next(lines, None)
    if first is None or isinstance(first[1], Problem):
        raise LayoutError(f"{src}: empty, or its header is not UTF-8 text")
    delim = _delimiter(first[1], src.suffix.lower())
    header = first[1].split(delim) if delim != "," else next(csv.reader([first[1]]))
    header = [h.strip() for h in header]
    cols = _columns(header, f"{src}:1", text_column)
    for lineno, line in lines:
        if isinstance(line, Problem):
            yield line
            continue
        fields = line.split(delim) if delim != "," else next(csv.reader([line]))
        if len(fields) != len(header):
            yield Problem(f"{shown}:{lineno}", "bad_row", f"{len(fields)} fields, the header has {len(header)}")
            continue
        yield _row_clip(dict(zip(header, fields)), cols, src.parent, f"{shown}:{lineno}", speaker)


def _audiofolder_metadata(src: Path) -> list:
    found = [src / n for n in ("metadata.csv", "metadata.jsonl") if (src / n).is_file()]
    if not found and src.is_dir():
        found = sorted(p for n in ("metadata.csv", "metadata.jsonl") for p in src.glob(f"*/{n}"))
    return found


def read_audiofolder(src: Path, speaker: Optional[str], text_column: Optional[str] = None) -> Iterator[Item]:
    metas = [src] if src.is_file() else _audiofolder_metadata(src)
    if not metas:
        raise LayoutError(f"{src}: no metadata.csv or metadata.jsonl (an audiofolder names its clips in one)")
    root = src.parent if src.is_file() else src
    for meta in metas:
        shown = _shown(meta, root)
        if meta.suffix == ".jsonl":
            cols = None
            for where, row in _json_lines(meta, shown):
                if isinstance(row, Problem):
                    yield row
                    continue
                cols = cols or _columns(list(row), where, text_column, ("file_name",))
                yield _row_clip({k: str(v) for k, v in row.items() if isinstance(v, (str, int, float))}, cols,
                                meta.parent, where, speaker)
        else:
            with meta.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                cols = _columns(reader.fieldnames or [], f"{shown}:1", text_column, ("file_name",))
                try:
                    for row in reader:
                        yield _row_clip(row, cols, meta.parent, f"{shown}:{reader.line_num}", speaker)
                except (csv.Error, UnicodeDecodeError) as e:
                    yield Problem(f"{shown}:{reader.line_num + 1}", "bad_row", f"unreadable CSV ({e})")


def read_libritts(src: Path, speaker: Optional[str]) -> Iterator[Item]:
    for txt in sorted(src.rglob("*.normalized.txt")):
        shown = _shown(txt, src)
        stem = txt.with_name(txt.name[: -len(".normalized.txt")])
        text = _transcript(txt, shown)
        if isinstance(text, Problem):
            yield text
            continue
        audio = _audio_beside(stem) or stem.with_name(stem.name + ".wav")
        # speaker/chapter/utterance: the speaker is the folder two above the clip
        yield Clip(shown, audio, text, speaker or txt.parent.parent.name, stem.name)


VCTK_AUDIO_DIRS = ("wav48_silence_trimmed", "wav48", "wav24", "wav22", "wav16", "wav", "audio")


def read_vctk(src: Path, speaker: Optional[str], mic: str = "mic1") -> Iterator[Item]:
    txt_root = src / "txt"
    audio_root = next((src / d for d in VCTK_AUDIO_DIRS if (src / d).is_dir()), None)
    if txt_root.is_dir() and audio_root is not None:
        for txt in sorted(txt_root.glob("*/*.txt")):
            shown = _shown(txt, src)
            text = _transcript(txt, shown)
            if isinstance(text, Problem):
                yield text
                continue
            spk, utt = txt.parent.name, txt.stem
            folder = audio_root / spk
            audio = _audio_beside(folder / utt) or _audio_beside(folder / f"{utt}_{mic}") or folder / f"{utt}.wav"
            yield Clip(shown, audio, text, speaker or spk, utt)
        return
    # speaker folders with each clip's .txt beside it
    for audio in sorted(p for p in src.glob("*/*") if p.suffix.lower() in AUDIO_SUFFIXES):
        shown = _shown(audio, src)
        text = _transcript(audio.with_suffix(".txt"), _shown(audio.with_suffix(".txt"), src))
        if isinstance(text, Problem):
            yield text
            continue
        yield Clip(shown, audio, text, speaker or audio.parent.name)  # id: speaker/stem (stems repeat)


def read_fish(src: Path, speaker: Optional[str]) -> Iterator[Item]:
    for audio in sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        rel = audio.relative_to(src)
        lab = audio.with_suffix(".lab")
        text = _transcript(lab, _shown(lab, src))
        if isinstance(text, Problem):
            yield text
            continue
        spk = speaker or (rel.parts[0] if len(rel.parts) > 1 else None)
        yield Clip(str(rel), audio, text, spk, str(rel.with_suffix("")))


def read_higgs_json(src: Path, speaker: Optional[str]) -> Iterator[Item]:
    folder, meta = (src.parent, src) if src.is_file() else (src, src / "metadata.json")
    if not meta.is_file():
        raise LayoutError(f"{meta}: not found (the Higgs trainers' layout is metadata.json + wav/txt files)")
    try:
        samples = json.loads(meta.read_bytes().decode("utf-8-sig")).get("samples")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise LayoutError(f"{meta}: not a JSON object with \"samples\" ({type(e).__name__}: {e})") from None
    if not isinstance(samples, list):
        raise LayoutError(f"{meta}: \"samples\" must be a list")
    for i, s in enumerate(samples):
        where = f"{meta.name}:samples[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("audio_file"), str):
            yield Problem(where, "missing_field", "each sample needs \"audio_file\"")
            continue
        if "ref_speakers" in s:
            yield Problem(where, "unsupported", "multi-speaker \"ref_speakers\" samples: write them as ChatML "
                          "manifest lines (docs/data.md: ChatML form)")
            continue
        if isinstance(s.get("transcript_file"), str):
            text = _transcript(folder / s["transcript_file"], s["transcript_file"])
            if isinstance(text, Problem):
                yield Problem(where, text.reason, text.message)
                continue
        else:
            text = str(s.get("text") or s.get("transcript") or "").strip()
        ref_audio, ref_text = s.get("ref_audio_file"), s.get("ref_transcript")
        if ref_text is None and isinstance(s.get("ref_transcript_file"), str):
            ref_text = _transcript(folder / s["ref_transcript_file"], s["ref_transcript_file"])
            if isinstance(ref_text, Problem):
                yield Problem(where, ref_text.reason, ref_text.message)
                continue
        if bool(ref_audio) != bool(ref_text):
            yield Problem(where, "ref_without_text", "a reference needs both \"ref_audio_file\" and its "
                          "transcript (\"ref_transcript\")")
            continue
        spk = s.get("speaker_id") or s.get("speaker_name") or speaker
        yield Clip(where, folder / s["audio_file"], text, str(spk) if spk else None,
                   str(s["id"]) if s.get("id") is not None else None,
                   folder / ref_audio if ref_audio else None, ref_text or None,
                   s["scene"] if isinstance(s.get("scene"), str) and s["scene"].strip() else None)


def _turn_text(content) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return " ".join(c.get("text", "") for c in content if isinstance(c, dict))
    return content if isinstance(content, str) else ""


def read_swift(src: Path, speaker: Optional[str]) -> Iterator[Item]:
    if not src.is_file():
        raise LayoutError(f"{src}: the swift format reads one JSONL file ({{\"messages\": ..., \"audios\": ...}})")
    shown = src.name
    for where, obj in _json_lines(src, shown):
        if isinstance(obj, Problem):
            yield obj
            continue
        if not isinstance(obj.get("messages"), list) or not isinstance(obj.get("audios"), list):
            yield Problem(where, "missing_field", "each line needs \"messages\" (a list) and \"audios\" (a list)")
            continue
        if len(obj["audios"]) != 1 or not isinstance(obj["audios"][0], str):
            yield Problem(where, "unsupported", f"{len(obj['audios'])} audios; a TTS sample has exactly one (path)")
            continue
        turns = [(m.get("role"), _turn_text(m.get("content"))) for m in obj["messages"] if isinstance(m, dict)]
        answer = next((t for r, t in reversed(turns) if r == "assistant"), None)
        question = next((t for r, t in reversed(turns) if r == "user"), None)
        if answer is None or question is None:
            yield Problem(where, "bad_messages", "no user and assistant turn to take the transcript from")
            continue
        # ASR style (user: "<audio>...", assistant: transcript), or TTS style (user: text, assistant: "<audio>")
        text = question if "<audio>" in answer else answer
        spk = obj.get("speaker") if isinstance(obj.get("speaker"), str) else speaker
        yield Clip(where, src.parent / obj["audios"][0], text.replace("<audio>", "").strip(), spk,
                   str(obj["id"]) if obj.get("id") is not None else None)


def _json_text(obj: dict) -> Union[str, tuple]:
    """The transcript of a sample's JSON (``text``, or ``transcript``), or (reason, message)."""
    text = obj.get("text", obj.get("transcript"))
    if text is None:
        return "missing_field", "no \"text\" (or \"transcript\")"
    if not isinstance(text, str):
        return "wrong_type", f"\"text\" must be a string, got {type(text).__name__}"
    return text if text.strip() else ("empty_text", "the transcript is empty")


def _json_name(obj: dict, key: str) -> Optional[str]:
    value = obj.get(key)
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) else None


def _extract(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:  # a full disk: the import as a whole cannot go on
        raise LayoutError(f"{path}: cannot be written ({e.strerror or e})") from None


def _sample_clip(sample: Sample, shard: Path, shown: str, dest: Optional[Path], speaker: Optional[str],
                 seen: dict) -> Item:
    """One shard sample as a Clip whose audio is extracted to ``dest/<shard stem>/<KEY>.<ext>`` (``dest`` None:
    named in its shard, ``members.py``), or its Problem (named ``shard:member``). ``seen``: key -> the shard it
    was first read in."""
    audio = [ext for ext in sample.members if "." + ext.lower() in AUDIO_SUFFIXES]
    json_ext = next((ext for ext in sample.members if ext.lower() == "json"), None)
    first = audio[0] if audio else json_ext or next(iter(sample.members))
    where = f"{shown}:{sample.name(first)}"
    if sample.key in seen:
        return Problem(where, "duplicate_key", f"key {sample.key!r} is already a sample of {seen[sample.key]}")
    seen[sample.key] = shown
    if dest is not None and (sample.key.startswith("/") or ".." in sample.key.split("/")):  # where it is written
        return Problem(where, "unsafe_name", f"key {sample.key!r} would be extracted outside {shard.stem}/")
    if not audio:
        return Problem(where, "no_audio", f"no audio member ({sample.name('mp3')}, .flac, .wav, ...)")
    if len(audio) > 1:
        return Problem(where, "several_audio", f"{len(audio)} audio members ("
                       f"{', '.join(sample.name(e) for e in audio)}); a sample has one")
    if json_ext is None:
        return Problem(where, "no_json", f"no {sample.name('json')} member (the transcript)")
    json_where = f"{shown}:{sample.name(json_ext)}"
    try:
        obj = json.loads(sample.members[json_ext].decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        return Problem(json_where, "bad_utf8", f"not valid UTF-8 text (byte {e.start})")
    except json.JSONDecodeError as e:
        return Problem(json_where, "invalid_json", f"invalid JSON ({e.msg}: line {e.lineno} column {e.colno})")
    if not isinstance(obj, dict):
        return Problem(json_where, "not_an_object", "the JSON must be an object")
    text = _json_text(obj)
    if isinstance(text, tuple):
        return Problem(json_where, *text)
    if dest is None:
        target = Path(member_ref(str(shard.absolute()), sample.name(audio[0]), sample.offsets.get(audio[0])))
    else:
        target = dest / shard.stem / sample.name(audio[0])
        _extract(sample.members[audio[0]], target)
    # Language and duration are not kept: a manifest line has no field for the one, the header gives the other.
    return Clip(where, target, text, _json_name(obj, "speaker") or speaker,
                _json_name(obj, "id") or f"{shard.stem}/{sample.key}")


def read_webdataset(src: Path, speaker: Optional[str], dest: Optional[Path], root: Optional[Path] = None) -> Iterator[Item]:
    """``root``: the folder the shards are named from (default: the source's own; data/sources.py reads a larger
    source's shards one at a time, named as the whole source names them)."""
    try:
        shards, own_root = shard_paths(str(src))
    except ShardError as e:
        raise LayoutError(str(e)) from None
    root = root or own_root
    seen: dict = {}
    for shard in shards:
        shown = _shown(shard, root)
        for item in read_shard(shard):
            if isinstance(item, Damage):
                yield Problem(f"{shown}:{item.member}" if item.member else shown, item.reason, item.message)
            else:
                yield _sample_clip(item, shard, shown, dest, speaker, seen)


def _sniffed_suffix(data: bytes) -> Optional[str]:
    """The audio container the first bytes announce (an HF ``Audio`` value's ``path`` may be missing or say
    nothing: ``None``, ``"audio"``)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return ".wav"
    if data[:4] == b"fLaC":
        return ".flac"
    if data[:4] == b"OggS":
        return ".ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return ".mp3"
    if data[:4] == b"FORM":
        return ".aiff"
    return None


def _hf_clip(row: int, cols, values: dict, file: Path, shown: str, dest: Optional[Path],
             speaker: Optional[str]) -> Item:
    """One row of a datasets file as a Clip; its audio bytes (if the row holds them) extracted to
    ``dest/<the file's path without suffix>/<row>.<ext>``, or (``dest`` None) named by the row,
    ``<file>#<row>``."""
    where = f"{shown}:row {row}"
    value, text = values[cols.audio], values[cols.text]
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    else:
        data, name = None, value
    if text is None:
        return Problem(where, "empty_text", f"column {cols.text!r} is null")
    if not isinstance(text, str):
        return Problem(where, "wrong_type", f"column {cols.text!r} must be a string, got {type(text).__name__}")
    spk = values.get(cols.speaker) if cols.speaker else None
    spk = str(spk) if isinstance(spk, (str, int)) and not isinstance(spk, bool) and str(spk) else speaker
    sid = values.get(cols.id) if cols.id else None
    sid = str(sid) if isinstance(sid, (str, int)) and not isinstance(sid, bool) and str(sid) else \
        f"{Path(shown).with_suffix('').as_posix()}/{row}"
    if data:
        suffix = Path(name).suffix.lower() if isinstance(name, str) else ""
        suffix = suffix if suffix in AUDIO_SUFFIXES else _sniffed_suffix(data)
        if suffix is None:
            return Problem(where, "audio_unreadable", f"column {cols.audio!r}: the bytes are not a known audio "
                           f"format (WAV, FLAC, MP3, Ogg, AIFF)")
        if dest is None:  # named in its file, by row (members.py)
            return Clip(where, Path(member_ref(str(file.absolute()), str(row))), text, spk, sid)
        target = dest / Path(shown).with_suffix("") / f"{row:08d}{suffix}"
        _extract(data, target)
        return Clip(where, target, text, spk, sid)
    if not isinstance(name, str) or not name.strip():
        return Problem(where, "no_audio", f"column {cols.audio!r} holds neither bytes nor a path")
    return Clip(where, file.parent / name, text, spk, sid)  # an absolute path stays as it is


def read_hf(src: Path, speaker: Optional[str], dest: Optional[Path], text_column: Optional[str] = None,
            root: Optional[Path] = None) -> Iterator[Item]:
    """``root``: as read_webdataset's (a row's default id is its file's path from it)."""
    try:
        files = data_files(src)
    except TableError as e:
        raise LayoutError(str(e)) from None
    root = root or (src if src.is_dir() else src.parent)

    def pick(where):
        def chosen(schema):
            try:
                return columns(schema, where, AUDIO_COLUMNS, TEXT_COLUMNS, SPEAKER_COLUMNS, ID_COLUMNS, text_column)
            except TableError as e:
                raise LayoutError(str(e)) from None
        return chosen

    for file in files:
        shown = _shown(file, root)
        for item in read_rows(file, shown, pick(shown)):
            if isinstance(item, FileDamage):
                yield Problem(shown if item.row is None else f"{shown}:row {item.row}", item.reason, item.message)
            else:
                yield _hf_clip(*item, file, shown, dest, speaker)


@dataclass(frozen=True)
class Format:
    read: Callable  # (src, speaker, **options) -> Iterator[Item]
    summary: str
    extracts: bool = False  # reads archives: also takes ``dest``, the folder to write their audio into


FORMATS = {
    "ljspeech": Format(read_ljspeech, "metadata.csv (id|text|normalized) + wavs/"),
    "libritts": Format(read_libritts, "speaker/chapter/*.wav + *.normalized.txt (LibriTTS, LibriTTS-R)"),
    "vctk": Format(read_vctk, "txt/SPEAKER/*.txt + wav48*/SPEAKER/ audio, or speaker folders with .txt beside"),
    "fish": Format(read_fish, "audio + .lab transcript beside it (Fish-Speech); speaker = first folder"),
    "csv": Format(read_csv, "a CSV/TSV/'|' file with a header: audio, text, optional speaker columns"),
    "higgs-json": Format(read_higgs_json, "metadata.json samples (train-higgs-audio, Mixomo's GUI)"),
    "swift": Format(read_swift, "ms-swift JSONL: messages + audios"),
    "audiofolder": Format(read_audiofolder, "Hugging Face audiofolder: metadata.csv/.jsonl with file_name"),
    "webdataset": Format(read_webdataset, "WebDataset .tar shards (a file, a folder, 's-{000..009}.tar'): "
                         "KEY.mp3|flac|wav + KEY.json (Emilia)", extracts=True),
    "hf": Format(read_hf, "Hugging Face datasets folder (save_to_disk Arrow, or Parquet files): an Audio column "
                 "+ text", extracts=True),
}
COLUMN_FORMATS = ("csv", "audiofolder", "hf")  # the formats that take text_column
NAMES_MEMBERS = ("webdataset", "hf")  # the formats whose audio can stay where it is, named in its archive (--no-extract)


# -------------------------------------------------------------------------------------------- detection


def _first_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.readline(65536).decode("utf-8-sig", errors="replace").strip()
    except OSError:
        return ""


def _has_header_column(line: str, names: tuple, suffix: str = "") -> bool:
    fields = line.split(_delimiter(line, suffix))
    return any(f.strip().strip('"').lower() in names for f in fields)


def _any(folder: Path, *patterns: str) -> bool:
    return any(next(folder.glob(p), None) is not None for p in patterns)


def _looks_vctk(src: Path) -> bool:
    """txt/ beside an audio folder, or speaker folders holding a clip with its .txt beside it."""
    return ((src / "txt").is_dir() and any((src / d).is_dir() for d in VCTK_AUDIO_DIRS)) or any(
        _audio_beside(t.with_suffix("")) for t in src.glob("*/*.txt") if not t.name.endswith(".normalized.txt"))


def _looks_ljspeech(src: Path) -> bool:
    """metadata.csv without a header naming an audio column (that is csv's), and wavs/ beside it."""
    meta = src if src.is_file() else src / "metadata.csv"
    return meta.is_file() and (meta.parent / "wavs").is_dir() and \
        not _has_header_column(_first_line(meta), AUDIO_COLUMNS, ".csv")


def _looks_swift(src: Path) -> bool:
    """A first line that is not JSON is left to the reader, which names it; one that is must be a sample."""
    try:
        first = json.loads(_first_line(src))
    except json.JSONDecodeError:
        return True
    return isinstance(first, dict) and bool({"messages", "audios"} & set(first))


# What marks each layout whose reader would otherwise walk a wrong folder clip by clip (a VCTK import of an
# LJSpeech folder: one "transcript not found" per clip). The other readers refuse a wrong source as a whole.
LAYOUT_MARKS = {
    "ljspeech": _looks_ljspeech,
    "libritts": lambda src: src.is_dir() and next(src.rglob("*.normalized.txt"), None) is not None,
    "vctk": lambda src: src.is_dir() and _looks_vctk(src),
    "fish": lambda src: src.is_dir() and next(src.rglob("*.lab"), None) is not None,
    "swift": lambda src: not src.is_file() or _looks_swift(src),
}


def check_layout(src: Path, fmt: str) -> None:
    """A LayoutError, before any clip is read, when ``src`` shows none of the marks of the layout ``fmt``
    given with --format; it names the layouts it does look like."""
    marks = LAYOUT_MARKS.get(fmt)
    if marks is None or marks(src):
        return
    others = [f for f in _looks(src) if f != fmt]
    hint = (f"; it looks like {' or '.join(others)} (--format {others[0]})" if others
            else "; --format auto names the layouts it recognises")
    raise LayoutError(f"{src}: this does not look like {fmt} ({FORMATS[fmt].summary}){hint}")


def _looks(src: Path) -> list:
    """The formats ``src`` could be, by the files that mark each layout (cheap: a few globs, first lines)."""
    if not src.exists():
        return ["webdataset"] if is_pattern(str(src)) else []
    if src.is_file():
        name, suffix = src.name.lower(), src.suffix.lower()
        if suffix == ".tar":
            return ["webdataset"]
        if suffix in (".parquet", ".arrow"):
            return ["hf"]
        first = _first_line(src)
        if suffix == ".jsonl":
            try:
                obj = json.loads(first)
            except json.JSONDecodeError:
                return []
            keys = set(obj) if isinstance(obj, dict) else set()
            return ["swift"] if {"messages", "audios"} <= keys else ["audiofolder"] if "file_name" in keys else []
        if name == "metadata.json":
            return ["higgs-json"]
        if _has_header_column(first, AUDIO_COLUMNS, suffix):
            return ["csv"]
        if name == "metadata.csv" and "|" in first and (src.parent / "wavs").is_dir():
            return ["ljspeech"]
        return []
    found = []
    meta_csv = src / "metadata.csv"
    if meta_csv.is_file():
        first = _first_line(meta_csv)
        if _has_header_column(first, ("file_name",), ".csv"):
            found.append("audiofolder")
        elif _has_header_column(first, AUDIO_COLUMNS, ".csv"):  # F5-TTS's audio_file|text, Coqui's
            found.append("csv")
        elif "|" in first and (src / "wavs").is_dir():
            found.append("ljspeech")
    elif (src / "metadata.jsonl").is_file() or _any(src, "*/metadata.csv", "*/metadata.jsonl"):
        found.append("audiofolder")
    if (src / "metadata.json").is_file():
        found.append("higgs-json")
    if _any(src, "*/*/*.normalized.txt", "*/*/*/*.normalized.txt"):
        found.append("libritts")
    if _looks_vctk(src):
        found.append("vctk")
    if _any(src, "*.lab", "*/*.lab"):
        found.append("fish")
    if _any(src, "*.tar", "*/*.tar"):  # Emilia: a folder per language (EN/EN-B000000.tar)
        found.append("webdataset")
    if is_hf_folder(src):
        found.append("hf")
    return found


def _exists(src: Path) -> bool:
    return src.exists() or is_pattern(str(src))  # a brace pattern's shards are listed (and checked) by its reader


def detect(src: Path) -> str:
    if not _exists(src):
        raise LayoutError(f"{src}: not found")
    found = _looks(src)
    if len(found) == 1:
        return found[0]
    if found:
        raise LayoutError(f"{src}: could be {' or '.join(found)}; choose with --format")
    raise LayoutError(f"{src}: not a layout --format auto recognises ({', '.join(FORMATS)}); choose with "
                       f"--format (higgs-ddp manifest import --help lists what each expects)")


# ------------------------------------------------------------------------------------------ the import


@dataclass
class Imported:
    rows: list  # manifest rows (dicts), paths relative to the manifest's folder
    problems: list  # Problem per clip left out
    format: str
    seconds: float = 0.0


def _rel(path: Path, base: str) -> str:
    """``path`` relative to the manifest's folder ``base`` (absolute). Symbolic links are kept as named. A member
    of a shard: its shard's path, the member's name as it is."""
    m = member_of(path)
    if m is not None:
        return member_ref(_rel(m.shard, base), m.name, m.offset)
    return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()


def import_corpus(src, fmt: str, out, speaker: Optional[str] = None, max_seconds: float = 0.0,
                  extract: bool = True, shown_root: Optional[Path] = None, **options) -> Imported:
    """Read ``src`` in layout ``fmt`` ("auto": ``detect``) into rows for a manifest at ``out``; every clip's
    audio (and reference) header checked, empty texts and repeated ids reported. Nothing is written, except the
    audio a format that reads archives extracts into the manifest's folder (``extract``; False: webdataset rows
    name each member in its shard instead, ``members.py``). ``shown_root``: (webdataset, hf) the folder problems
    and default ids name the files from, where ``src`` is one file of a larger source."""
    src, base = Path(src), os.path.abspath(Path(out).parent)
    if not _exists(src):
        raise LayoutError(f"{src}: not found")
    fmt = detect(src) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise LayoutError(f"unknown format {fmt!r}; formats: auto, {', '.join(FORMATS)}")
    check_layout(src, fmt)
    if options and fmt not in COLUMN_FORMATS:
        raise LayoutError(f"{', '.join('--' + k.replace('_', '-') for k in options)} applies to the "
                          f"{' and '.join(COLUMN_FORMATS)} formats, not {fmt}")
    root = Path(base) if FORMATS[fmt].extracts else src if src.is_dir() else src.parent  # what paths are shown from
    if not extract and fmt not in NAMES_MEMBERS:
        raise LayoutError(f"--no-extract applies to the {' and '.join(NAMES_MEMBERS)} formats, not {fmt}")
    if FORMATS[fmt].extracts:
        options["dest"] = Path(base) if extract else None
    if shown_root is not None:  # one file of a larger source (data/sources.py): named as the whole source names it
        options["root"] = Path(shown_root)
    checked: dict = {}  # path -> seconds, or the AudioProblem: a shared reference is read once

    def audio_seconds(path: Path):
        if path not in checked:
            try:
                info = check_header(path, _shown(path, root), max_seconds)
                checked[path] = info.frames / info.samplerate
            except AudioProblem as e:
                checked[path] = e
        return checked[path]

    rows, problems, ids, seconds = [], [], {}, 0.0
    for item in FORMATS[fmt].read(src, speaker, **options):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        if not item.text.strip():
            problems.append(Problem(item.where, "empty_text", "the transcript is empty"))
            continue
        if item.ref_text is not None and not item.ref_text.strip():
            problems.append(Problem(item.where, "empty_text", "the reference transcript is empty"))
            continue
        results = [audio_seconds(p) for p in (item.ref_audio, item.audio) if p is not None]
        bad = next((r for r in results if isinstance(r, AudioProblem)), None)
        if bad is not None:
            problems.append(Problem(item.where, bad.reason, str(bad)))
            continue
        # Without an id of its own, a clip is named by its path: stable when lines are added or reordered,
        # so the validation split (chosen by id hash) does not move.
        sid = item.id if item.id is not None else Path(_shown(item.audio, root)).with_suffix("").as_posix()
        if sid in ids:
            problems.append(Problem(item.where, "duplicate_id", f"id {sid!r} is already the id of {ids[sid]}"))
            continue
        ids[sid] = item.where
        row = {"id": sid, "text": item.text.strip(), "audio": _rel(item.audio, base), "speaker": item.speaker}
        if item.ref_audio is not None:
            row.update(ref_audio=_rel(item.ref_audio, base), ref_text=item.ref_text.strip())
        row["scene"] = item.scene
        rows.append({k: v for k, v in row.items() if v is not None})
        seconds += results[-1]
    return Imported(rows, problems, fmt, seconds)


def write_manifest(rows: list, out) -> Path:
    """The rows as JSONL, all at once: a temporary file beside ``out``, then renamed over it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return out


def reason_counts(problems: list) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(Counter(p.reason for p in problems).items()))
