"""Reading manifests: JSONL, one sample per line, in either of two forms.

Simple (one TTS sample; paths relative to the manifest)::

    {"text": "...", "audio": "clips/a.wav", "ref_audio": "clips/r.wav", "ref_text": "...",
     "scene": "...", "speaker": "...", "id": "..."}

``audio_codes`` / ``ref_audio_codes`` (.npy arrays of codes) may replace ``audio`` / ``ref_audio``. An audio path
may name a member of a WebDataset tar shard, ``shards/s-000001.tar#KEY.flac`` (``members.py``).

ChatML (boson_multimodal's ChatMLSample: multi-turn, multi-speaker)::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": {"type": "audio", "audio_url": "clips/a.wav"}}],
     "start_index": 3, "speaker": "...", "id": "..."}

Content is a string, ``{"type": "text", "text": ...}``, ``{"type": "audio", "audio_url": ...}`` or a list
of those; an ``audio_url`` ending in ``.npy`` names codes instead of audio. Assistant turns from
``start_index`` on are learned (all of them when it is absent); everything else is context.

Parsing checks structure only; audio is checked when it is decoded (prepare), codes when loaded.
Every problem is a ``Problem`` naming ``file:line``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent

from higgs_ddp.data.members import member_ref, split_ref
from higgs_ddp.data.prompt import build_chatml
from higgs_ddp.errors import HiggsError

SIMPLE_FIELDS = {"text": str, "audio": str, "audio_codes": str, "ref_audio": str, "ref_audio_codes": str,
                 "ref_text": str, "scene": str, "speaker": str, "id": str}
CHATML_FIELDS = {"messages": list, "start_index": int, "speaker": str, "misc": dict, "id": str}
ROLES = ("system", "user", "assistant")


@dataclass
class Problem:
    where: str  # manifest:line
    reason: str  # stable key, counted in the data report
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class LineProblem(HiggsError, ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class AudioRef:
    path: Path  # resolved
    shown: str  # as the manifest wrote it, for messages
    is_codes: bool  # a .npy of codes rather than audio to encode
    frames: Optional[int] = None  # only its first frames (a same-speaker reference cut to data.reference_seconds)


@dataclass
class Entry:
    where: str
    chatml: ChatMLSample
    audio: list  # AudioRef per audio content, in prompt order
    id: str
    speaker: Optional[str] = None
    learned: tuple = ()  # the AudioRefs of ``audio`` the sample learns to speak (not its context)
    id_given: bool = True  # False: ``id`` is the default, the manifest's file name and line
    text: Optional[str] = None  # a simple line's text and scene (None for ChatML lines): data.reference
    scene: Optional[str] = None  # rebuilds its prompt with another reference, or none


def _typed(obj: dict, fields: dict) -> None:
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise LineProblem("unknown_field", f"unknown field(s) {unknown}; allowed: {sorted(fields)}")
    for name, typ in fields.items():
        value = obj.get(name)
        if name in obj and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
            raise LineProblem("wrong_type", f"field {name!r} must be a {typ.__name__}, got {type(value).__name__}")


class _Resolver:
    def __init__(self, base: Path, root: Optional[Path]):
        self.base, self.root = base, root
        self.folders: dict = {}  # folder as written -> resolved: a corpus has many files in few folders

    def resolve(self, rel: str) -> Path:
        """``(base / rel).resolve()``, resolving each folder once: a file that is no link resolves to its
        resolved folder / its name (one lstat instead of one per path component)."""
        shard, member = split_ref(rel)
        if member is not None:  # a member of a tar shard (members.py): the shard's path resolved, the name kept
            return Path(member_ref(str(self.resolve(shard)), member))
        folder, _, name = rel.rpartition("/")
        if name in ("", ".", ".."):
            return (self.base / rel).resolve()
        if folder not in self.folders:
            self.folders[folder] = (self.base / folder).resolve()
        path = self.folders[folder] / name
        return path.resolve() if path.is_symlink() else path

    def __call__(self, rel: str, what: str, is_codes: bool) -> AudioRef:
        if not rel.strip():
            raise LineProblem("empty_path", f"{what} path is empty")
        path = self.resolve(rel)
        if self.root is not None and not path.is_relative_to(self.root):
            raise LineProblem("path_outside_root", f"{what} {rel} is outside the dataset root {self.root} "
                              f"(data.allow_outside_root=false)")
        return AudioRef(path, rel, is_codes)


def reference_problem(has_audio: bool, text: Optional[str], audio_name: str, text_name: str):
    """The one rule for a voice-clone reference, wherever one is given (a manifest line, speak's options):
    its audio and its transcript together, the transcript not empty. The prompt puts the reference as
    audio answering its words (``build_chatml``); audio with no words is a prompt training never showed.
    -> None, or (reason, message) with the names the user wrote."""
    if has_audio != (text is not None):
        return "ref_without_text", f"a reference needs both its audio ({audio_name}) and its transcript ({text_name})"
    if has_audio and not text.strip():
        return "empty_text", f"the reference transcript {text_name} is empty"
    return None


def _parse_simple(obj: dict, resolve: _Resolver, default_id: str) -> tuple:
    _typed(obj, SIMPLE_FIELDS)
    if "text" not in obj:
        raise LineProblem("missing_field", "missing field 'text'")
    if not obj["text"].strip():
        raise LineProblem("empty_text", "field 'text' is empty")
    if ("audio" in obj) == ("audio_codes" in obj):
        raise LineProblem("missing_field", "missing field 'audio' (or 'audio_codes'): one of them, not both"
                          if "audio" not in obj else "give 'audio' or 'audio_codes', not both")
    if "ref_audio" in obj and "ref_audio_codes" in obj:
        raise LineProblem("wrong_type", "give 'ref_audio' or 'ref_audio_codes', not both")
    has_ref = "ref_audio" in obj or "ref_audio_codes" in obj
    problem = reference_problem(has_ref, obj.get("ref_text"), "'ref_audio' or 'ref_audio_codes'", "'ref_text'")
    if problem:
        raise LineProblem(*problem)
    audio = []
    if has_ref:
        is_codes = "ref_audio_codes" in obj
        audio.append(resolve(obj["ref_audio_codes" if is_codes else "ref_audio"], "reference", is_codes))
    is_codes = "audio_codes" in obj
    audio.append(resolve(obj["audio_codes" if is_codes else "audio"], "codes file" if is_codes else "audio",
                         is_codes))
    chatml = build_chatml(obj["text"], obj.get("scene"), obj.get("ref_text"), with_reference=has_ref)
    return chatml, audio, audio[-1:], obj.get("id", default_id), obj.get("speaker")


def _content(item, where: str, resolve: _Resolver, audio: list):
    if isinstance(item, str):
        return TextContent(text=item)
    if not isinstance(item, dict) or item.get("type") not in ("text", "audio"):
        raise LineProblem("bad_messages", f"{where}: content must be a string or an object with "
                          f"\"type\": \"text\" or \"audio\"")
    if item["type"] == "text":
        if set(item) != {"type", "text"} or not isinstance(item["text"], str):
            raise LineProblem("bad_messages", f"{where}: text content is {{\"type\": \"text\", \"text\": str}}")
        return TextContent(text=item["text"])
    if set(item) != {"type", "audio_url"} or not isinstance(item["audio_url"], str):
        raise LineProblem("bad_messages", f"{where}: audio content is {{\"type\": \"audio\", \"audio_url\": "
                          f"path}} (base64 raw_audio is not supported: write it to a file)")
    url = item["audio_url"]
    audio.append(resolve(url, "audio", url.endswith(".npy")))
    return AudioContent(audio_url=url)


def _parse_chatml(obj: dict, resolve: _Resolver, default_id: str) -> tuple:
    _typed(obj, CHATML_FIELDS)
    messages, audio, learned = [], [], []
    start = obj.get("start_index")
    if not obj["messages"]:
        raise LineProblem("bad_messages", "'messages' is empty")
    for i, m in enumerate(obj["messages"]):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise LineProblem("bad_messages", f"{where} must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LineProblem("bad_messages", f"{where}: role {m['role']!r} is not one of {list(ROLES)}")
        items = m["content"] if isinstance(m["content"], list) else [m["content"]]
        if not items:
            raise LineProblem("bad_messages", f"{where}: content is empty")
        before = len(audio)
        content = [_content(c, where, resolve, audio) for c in items]
        if m["role"] == "assistant" and i >= (start or 0):
            learned += audio[before:]
        messages.append(Message(role=m["role"], content=content if isinstance(m["content"], list) else content[0]))
    if start is not None and not 0 <= start < len(messages):
        raise LineProblem("bad_messages", f"start_index {start} is outside the {len(messages)} messages")
    if not any(m.role == "assistant" for m in messages[start or 0:]):
        raise LineProblem("bad_messages", "no assistant turn to learn from"
                          + (f" at or after start_index {start}" if start is not None else ""))
    chatml = ChatMLSample(messages=messages, start_index=start, speaker=obj.get("speaker"), misc=obj.get("misc"))
    return chatml, audio, learned, obj.get("id", default_id), obj.get("speaker")


def read_manifest(path: str, root: Optional[str] = None, allow_outside_root: bool = True, start: int = 0,
                  stop: Optional[int] = None, first_line: int = 1):
    """-> (entries, problems). ``root`` defaults to the manifest's folder. ``start``, ``stop``, ``first_line``:
    only the lines from byte ``start`` (a line's first byte; that line is number ``first_line``) to byte
    ``stop`` (a piece of the manifest, piece_prepare.py)."""
    manifest = Path(path)
    if not manifest.is_file():
        return [], [Problem(f"{path}", "manifest_missing", "manifest not found")]
    limit = None if allow_outside_root else Path(root or manifest.parent).resolve()
    resolve = _Resolver(manifest.parent, limit)
    entries, problems = [], []
    with manifest.open("rb") as f:
        f.seek(start)
        lines = f if stop is None else _until(f, stop - start)
        for lineno, raw_bytes in enumerate(lines, start=first_line):
            where = f"{path}:{lineno}"
            try:
                try:
                    # "utf-8-sig" on line 1: a byte-order mark that Windows tools put at the file's start
                    # is not part of the first line's JSON.
                    raw = raw_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise LineProblem("bad_utf8", f"not valid UTF-8 text (byte {e.start})") from None
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.rstrip())  # without the newline an unclosed object ends on this line
                except json.JSONDecodeError as e:
                    raise LineProblem("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise LineProblem("not_an_object", "each line must be a JSON object")
                parse = _parse_chatml if "messages" in obj else _parse_simple
                chatml, audio, learned, sid, speaker = parse(obj, resolve, f"{manifest.stem}:{lineno}")
                entries.append(Entry(where, chatml, audio, sid, speaker, tuple(learned), "id" in obj))
                if parse is _parse_simple:
                    entries[-1].text, entries[-1].scene = obj["text"], obj.get("scene")
            except LineProblem as e:
                problems.append(Problem(where, e.reason, str(e)))
    return entries, problems


def _until(f, size: int):
    """The lines of ``f`` from where it stands, ``size`` bytes of them."""
    for line in f:
        if size <= 0:
            return
        size -= len(line)
        yield line
