"""higgs-ddp manifest import|stats: a corpus in another tool's layout into our manifest, and what a manifest holds.

    higgs-ddp manifest import --format ljspeech LJSpeech-1.1 --out data/train.jsonl
    higgs-ddp manifest import SRC --out data/train.jsonl              # --format auto: recognised from SRC
    higgs-ddp manifest import 'shards/emilia-{000000..000009}.tar' --out data/train.jsonl   # webdataset
    higgs-ddp manifest stats data/train.jsonl [--config configs/higgs_v2_3b_lora.yaml]

(also ``python -m higgs_ddp manifest ...`` and ``python -m higgs_ddp.manifest ...``)

import reads the audio headers only (duration, rate), so 100k clips take seconds; every clip the training
data check would refuse (missing or unreadable audio, empty text, repeated id, ...) is one line
``file:line: what``. With ``--on-error error`` (the default) nothing is written if there is any; with
``--on-error skip`` the rest is written and the skipped clips counted by reason. The manifest appears all
at once (written beside, then renamed), its paths relative to itself. webdataset shards and hf folders are the
sources whose audio is written out: each sample's audio member goes to ``<manifest folder>/<shard stem>/<KEY>.<ext>``
as it is read (a brace pattern in quotes, or the shell expands it first); an hf row's audio bytes to
``<manifest folder>/<data file's path>/<row>.<ext>``. With ``--no-extract`` the audio stays where it is: each
line names its tar member, ``shards/s-000001.tar#KEY.flac@OFFSET``, or its row of an hf data file,
``data/train-00000.parquet#17``, and prepare reads it from there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from higgs_ddp.config import ConfigError, DataConfig, load_config
from higgs_ddp.data.importers import FORMATS, LayoutError, import_corpus, reason_counts, write_manifest
from higgs_ddp.data.manifest_stats import as_json, manifest_stats, render, run_duration_rule
from higgs_ddp.runtime.shared_fs import unwritable

MAX_LISTED = 50


def _formats_help() -> str:
    return "formats (--format):\n" + "\n".join(f"  {name:<12} {f.summary}" for name, f in FORMATS.items())


def _fail(message: str) -> int:
    print(f"higgs-ddp: error: {message}", file=sys.stderr, flush=True)
    return 2


def run_import(a) -> int:
    options = {"text_column": a.text_column} if a.text_column else {}
    why = unwritable(Path(a.out).parent)  # before reading the corpus: 100k headers take a while
    if why:
        return _fail(f"--out {a.out}: {Path(a.out).parent} cannot be written ({why})")
    try:
        got = import_corpus(a.src, a.format, a.out, a.speaker, a.max_audio_seconds, not a.no_extract, **options)
    except LayoutError as e:
        return _fail(str(e))
    if got.problems and a.on_error == "error":
        shown = [str(p) for p in got.problems[:MAX_LISTED]]
        if len(got.problems) > MAX_LISTED:
            shown.append(f"... and {len(got.problems) - MAX_LISTED} more")
        return _fail(f"{len(got.problems)} problem(s) in {a.src} ({reason_counts(got.problems)}); nothing written "
                     f"(--on-error skip writes the rest):\n" + "\n".join(shown))
    if not got.rows:
        return _fail(f"{a.src}: no usable clips found as {got.format}"
                     + (f" ({len(got.problems)} skipped: {reason_counts(got.problems)})" if got.problems else ""))
    try:
        write_manifest(got.rows, a.out)
    except OSError as e:  # (the folder was writable a moment ago; a full disk)
        return _fail(f"--out {a.out} cannot be written ({e.strerror or e})")
    speakers = len({r.get("speaker") for r in got.rows if r.get("speaker")})
    print(f"manifest import: {len(got.rows)} clips ({got.seconds / 3600:.2f} h, {speakers} speaker(s)) from "
          f"{a.src} as {got.format} -> {a.out}")
    if got.problems:
        print(f"manifest import: skipped {len(got.problems)} ({reason_counts(got.problems)}):")
        for p in got.problems[:MAX_LISTED]:
            print(f"  {p}")
        if len(got.problems) > MAX_LISTED:
            print(f"  ... and {len(got.problems) - MAX_LISTED} more")
    return 0


def run_stats(a) -> int:
    limits = DataConfig()
    if a.config:
        try:
            limits = load_config(a.config, a.overrides).data
        except ConfigError as e:
            return _fail(str(e))
    if not Path(a.manifest).is_file():
        return _fail(f"{a.manifest}: manifest not found")
    seconds = limits.max_audio_seconds if a.max_audio_seconds is None else a.max_audio_seconds
    tokens = limits.max_tokens_per_batch if a.max_tokens is None else a.max_tokens
    rule, unknown = run_duration_rule(limits)
    st = manifest_stats(a.manifest, seconds, tokens, rule, unknown)
    print(json.dumps(as_json(st)) if a.json else render(st))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=_formats_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    i = sub.add_parser("import", help="write a manifest from a corpus in another tool's layout",
                       description="Write a manifest from a corpus in another tool's layout.\n\n"
                       "    higgs-ddp manifest import --format ljspeech LJSpeech-1.1 --out data/train.jsonl\n"
                       "    higgs-ddp manifest import 'shards/emilia-{000000..000009}.tar' --out data/train.jsonl\n\n"
                       "webdataset: each sample's audio is extracted to <--out's folder>/<shard stem>/<KEY>.<ext>; "
                       "quote a brace pattern.\nhf: audio held as bytes is extracted to <--out's folder>/<the data "
                       "file's path>/<row>.<ext>.",
                       epilog=_formats_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("src", help="the corpus: a folder, or a file for csv and swift; for webdataset a .tar shard, "
                   "a folder of them, or a brace pattern ('s-{000000..000009}.tar', quoted); for hf a datasets "
                   "folder (save_to_disk, or Parquet files), one split's folder, or one .arrow/.parquet file")
    i.add_argument("--out", required=True, help="the manifest to write (JSONL)")
    i.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="the layout (default: auto)")
    i.add_argument("--on-error", default="error", choices=["error", "skip"],
                   help="error: list every problem and write nothing | skip: write the rest, count the skipped")
    i.add_argument("--speaker", help="the speaker of clips whose layout names none (an LJSpeech folder)")
    i.add_argument("--max-audio-seconds", type=float, default=0.0,
                   help="also refuse clips longer than this, as data.max_audio_seconds does (default: no limit)")
    i.add_argument("--no-extract", action="store_true",
                   help="webdataset, hf: leave the audio where it is; each line names its tar member "
                   "(shards/s-000001.tar#KEY.flac@OFFSET) or its row (data/train-00000.parquet#17), which prepare "
                   "reads from there")
    i.add_argument("--text-column", help="csv / audiofolder / hf: the column holding the transcript")
    s = sub.add_parser("stats", help="clips, hours, speakers, durations, rates, and warnings",
                       description="What a manifest holds, from the audio headers only.\n\n"
                       "    higgs-ddp manifest stats data/train.jsonl --config configs/higgs_v2_3b_lora.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("manifest", help="the manifest (JSONL) to describe")
    s.add_argument("--config", help="take data.max_audio_seconds and data.max_tokens_per_batch from this config")
    s.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
    s.add_argument("--max-audio-seconds", type=float, help="default: the config's (30)")
    s.add_argument("--max-tokens", type=int, help="the token budget of a sample (default: data.max_tokens_per_batch)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = p.parse_args(argv)
    return run_import(a) if a.action == "import" else run_stats(a)
