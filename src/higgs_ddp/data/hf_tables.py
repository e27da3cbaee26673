"""Hugging Face ``datasets`` folders (Arrow or Parquet files with an ``Audio`` column), read with ``pyarrow``.

What a ``datasets`` folder is on disk:

- ``Dataset.save_to_disk``: ``state.json`` (its ``_data_files``) + ``dataset_info.json`` + ``data-*.arrow``, Arrow
  IPC *streams*; ``DatasetDict.save_to_disk``: ``dataset_dict.json`` naming the splits, a folder per split.
- the Hub's layout (``push_to_hub``, ``to_parquet``): ``data/train-00000-of-00003.parquet``, ... or any Parquet files.

An ``Audio`` column is stored as a struct of ``bytes`` (the encoded file, or null) and ``path`` (its original
name, or the file to read when ``bytes`` is null); the schema's ``huggingface`` metadata names the feature type.

Why not the ``datasets`` library (5.2, probed in a scratch install, 2026-12): ``Dataset.from_dict`` failed there
(dill could not pickle pyarrow's MonthDayNano type), and decoding its ``Audio`` column needs torchcodec and an
FFmpeg install; it also pulls in a dozen packages (multiprocess, xxhash, dill, pandas, ...) beside our pins. The
files are plain Arrow and Parquet, the audio plain bytes that soundfile decodes like any other file: ``pyarrow``
(one wheel, no dependencies) reads both, a record batch at a time, without holding a table in memory.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from higgs_ddp.errors import HiggsError

BATCH_ROWS = 256  # rows decoded into Python at a time: a few MB of audio bytes


class TableError(HiggsError, ValueError):
    """The folder as a whole cannot be read as a ``datasets`` folder: one line."""


@dataclass
class FileDamage:
    """A data file (or the rest of it, from ``row``) that cannot be read."""

    row: Optional[int]
    reason: str
    message: str


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise TableError(f"{path}: not a JSON object")
    return obj


def _saved_split(folder: Path) -> list:
    """The Arrow files ``state.json`` lists, in its order (a folder may also hold cache files of ``.map``)."""
    files = _json(folder / "state.json").get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                              for f in files):
        raise TableError(f"{folder / 'state.json'}: no \"_data_files\" list of {{\"filename\": ...}}")
    out = [folder / f["filename"] for f in files]
    missing = [p for p in out if not p.is_file()]
    if missing:
        raise TableError(f"{folder / 'state.json'}: lists {missing[0].name}, which is not there")
    return out


def is_hf_folder(src: Path) -> bool:
    """Cheap marks: a ``save_to_disk`` folder, or Parquet files at the top or one or two folders down."""
    if src.is_file():
        return src.suffix.lower() in (".parquet", ".arrow")
    return ((src / "dataset_dict.json").is_file() or (src / "state.json").is_file()
            or any(next(src.glob(p), None) is not None for p in ("*.parquet", "*/*.parquet", "*/*/*.parquet")))


def data_files(src: Path) -> list:
    """The Arrow/Parquet files of ``src`` (a ``datasets`` folder, a split's folder, or one file), in order:
    every split of a ``DatasetDict`` (in ``dataset_dict.json``'s order), Parquet files by path."""
    if src.is_file():
        if src.suffix.lower() not in (".parquet", ".arrow"):
            raise TableError(f"{src}: neither a .parquet nor an .arrow file")
        return [src]
    if (src / "dataset_dict.json").is_file():
        splits = _json(src / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise TableError(f"{src / 'dataset_dict.json'}: no \"splits\" list")
        return [f for s in splits for f in _saved_split(src / s)]
    if (src / "state.json").is_file():
        return _saved_split(src)
    found = sorted(p for p in src.rglob("*.parquet") if p.is_file())
    if not found:
        raise TableError(f"{src}: no dataset_dict.json, state.json or .parquet files (not a datasets folder)")
    return found


def _hf_features(schema) -> dict:
    """The ``datasets`` feature types the file's schema metadata records (column -> its ``_type``)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return {k: v.get("_type") for k, v in features.items() if isinstance(v, dict)} if isinstance(features, dict) \
        else {}


@dataclass
class Columns:
    audio: str
    text: str
    speaker: Optional[str]
    id: Optional[str]


def columns(schema, where: str, audio_names: tuple, text_names: tuple, speaker_names: tuple, id_names: tuple,
            text_column: Optional[str] = None) -> Columns:
    """Which columns hold the audio (the ``Audio`` feature; else a struct with ``bytes``/``path``; else a string
    column with an audio name), the text, the speaker and the id."""
    import pyarrow as pa

    names = list(schema.names)
    lower = {n.lower(): n for n in names}
    features = _hf_features(schema)
    audio = next((n for n in names if features.get(n) == "Audio"), None)
    audio = audio or next((n for n in names if pa.types.is_struct(schema.field(n).type)
                           and {"bytes", "path"} & {f.name for f in schema.field(n).type}), None)
    audio = audio or next((lower[n] for n in audio_names if n in lower
                           and pa.types.is_string(schema.field(lower[n]).type)), None)
    if text_column:
        text = text_column if text_column in names else None
    else:
        text = next((lower[n] for n in text_names if n in lower), None)
    if audio is None or text is None:
        what = "Audio column (a struct of bytes and path, or a string column of paths)" if audio is None else \
            f"column {text_column!r} (--text-column)" if text_column else \
            f"text column (one of {', '.join(text_names)}; or name it with --text-column)"
        raise TableError(f"{where}: the columns {names} have no {what}")
    speaker = next((lower[n] for n in speaker_names if n in lower), None)
    sid = next((lower[n] for n in id_names if n in lower), None)
    return Columns(audio, text, speaker, sid)


def _batches(path: Path):
    """-> (schema, iterator of record batches) of an Arrow stream/file or a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        f = pq.ParquetFile(path)
        return f.schema_arrow, f.iter_batches(batch_size=BATCH_ROWS)
    source = pa.memory_map(str(path))  # save_to_disk writes IPC streams; an IPC file is read too
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


Row = Union[tuple, FileDamage]


def read_rows(path: Path, where: str, pick) -> Iterator[Row]:
    """(row number, {column: value}) for each row of one data file, ``pick(schema) -> Columns`` choosing the
    columns read; a FileDamage for a file (or the rest of one) that cannot be read."""
    import pyarrow as pa

    row = 0
    try:
        schema, batches = _batches(path)
        cols = pick(schema)
        wanted = [c for c in (cols.audio, cols.text, cols.speaker, cols.id) if c]
        for batch in batches:
            values = {c: batch.column(batch.schema.get_field_index(c)).to_pylist() for c in wanted}
            for i in range(batch.num_rows):
                yield row, cols, {c: values[c][i] for c in wanted}
                row += 1
    except (pa.ArrowException, OSError) as e:  # not Arrow/Parquet, cut short, a damaged page
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        yield FileDamage(row or None, "file_unreadable", "not readable as Arrow or Parquet"
                         + (" from this row on" if row else "") + f" ({text})")


# ----------------------------------------------------------------------------------- one row, for prepare

_TABLES: OrderedDict = OrderedDict()  # (path, size, mtime) -> an open file's rows (below), a few per process
OPEN_TABLES = 4


class _Rows:
    """Random access to one file's Audio column. Arrow: the file mapped, its batches views of the mapping (no
    copy); Parquet: one row group decoded at a time (the last one kept: a rank reads a file's rows in order)."""

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        try:
            if path.suffix.lower() == ".parquet":
                self.parquet = pq.ParquetFile(path)
                schema = self.parquet.schema_arrow
                meta = self.parquet.metadata
                counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            else:
                self.parquet = None
                schema, batches = _batches(path)
                self.batches = list(batches)
                counts = [b.num_rows for b in self.batches]
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise TableError(f"{path.name} is not readable as Arrow or Parquet ({str(e).strip() or type(e).__name__})") \
                from None
        self.audio = audio_column(schema, path.name)
        self.starts = [0]
        for n in counts:
            self.starts.append(self.starts[-1] + n)
        self.group, self.group_values = None, None

    def value(self, row: int):
        import bisect

        if not 0 <= row < self.starts[-1]:
            raise TableError(f"{self.path.name} has no row {row} (it has {self.starts[-1]})")
        g = bisect.bisect_right(self.starts, row) - 1
        if self.parquet is None:
            batch = self.batches[g]
            return batch.column(batch.schema.get_field_index(self.audio))[row - self.starts[g]].as_py()
        if self.group != g:
            self.group_values = self.parquet.read_row_group(g, columns=[self.audio]).column(0)
            self.group = g
        return self.group_values[row - self.starts[g]].as_py()


def audio_column(schema, where: str) -> str:
    """The Audio column alone (what ``columns`` finds first), for reading rows by number."""
    import pyarrow as pa

    features = _hf_features(schema)
    found = next((n for n in schema.names if features.get(n) == "Audio"), None) or next(
        (n for n in schema.names if pa.types.is_struct(schema.field(n).type)
         and {"bytes", "path"} & {f.name for f in schema.field(n).type}), None)
    if found is None:
        raise TableError(f"{where} has no Audio column (a struct of bytes and path)")
    return found


def row_audio(path: Path, row: int) -> tuple:
    """-> (audio bytes or None, path or None) of row ``row`` of a datasets file (its Audio value)."""
    import os

    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _TABLES:
        _TABLES[key] = _Rows(path)
        while len(_TABLES) > OPEN_TABLES:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(key)
    value = _TABLES[key].value(row)
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    return None, value
