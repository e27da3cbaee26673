"""load_data's ways in: from a valid prepared corpus index (corpus_index.py); else the index is prepared in
pieces (piece_prepare.py) and then mapped, or, where pieces do not apply, the data is loaded the full way,
after which rank 0 writes the index for the next start.

Every rank checks the index it sees; the ranks then agree (all of them use it, or none), because the full
way holds collectives (file hashes, encoding, tokenizing) that a rank alone would wait in forever. Whatever
stops the index from being used is printed in one line, with what happens instead.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from higgs_ddp.config import Config
from higgs_ddp.runtime.files import write_json_atomic
from higgs_ddp.data.corpus_index import (OWN_CODES, CorpusIndex, IndexedRecords, IndexInvalid,
                                         check_index, folder_signature, index_key, manifest_signature,
                                         record_columns, write_index)
from higgs_ddp.data.phases import Phases
from higgs_ddp.data.records import Data, fingerprint
from higgs_ddp.data.references import Pairing
from higgs_ddp.data.token_cache import tokenizer_key
from higgs_ddp.runtime.distributed import DistEnv, all_gather_objects
from higgs_ddp.runtime.shared_fs import check_shared_directory


def _summary(report: dict) -> dict:
    """The report without its per-sample lists (problems, reference pairs): what every rank keeps."""
    out = {k: v for k, v in report.items() if k != "problems"}
    out["references"] = {k: v for k, v in report.get("references", {}).items() if k != "pairs"}
    return out


FULL_REPORT_BYTES = 16 << 20


class IndexedStart:
    def __init__(self, cfg: Config, env: DistEnv, tokenizer, mc, quiet: bool, cache: str, report_path: Path):
        self.cfg, self.env, self.mc, self.quiet, self.report_path = cfg, env, mc, quiet, report_path
        self.cache = cache
        self.folders: set = set()  # the folders of every file the manifests name, filled by the full load
        tok = tokenizer_key(tokenizer)
        self.folder = Path(self.cache) / "index" / index_key(cfg, mc, tok, self.cache) if tok else None
        self.manifests = None

    def say(self, line: str) -> None:
        if self.env.is_main and not self.quiet:
            print(line, flush=True)

    def open(self):
        """-> Data from the index, or None (the reason printed) to load the full way."""
        phases = Phases()
        reason, header = None, None
        if self.folder is None:
            reason = "the tokenizer is a slow (Python) one, which no index can be keyed by"
        else:
            try:
                header = check_index(self.folder)
            except IndexInvalid as e:
                reason = str(e)
        reasons = all_gather_objects(reason)
        bad = next(((r, why) for r, why in enumerate(reasons) if why), None)
        if bad is not None:
            rank, why = bad
            self.say(f"data: {why}{f' (rank {rank})' if rank else ''}: loading the data from the manifests"
                     + ("; the index is written after" if self.folder is not None else ""))
            if self.folder is not None and self.env.is_main:  # signed before the load: a change during it shows
                try:
                    self.manifests = manifest_signature(list(self.cfg.data.manifest) + list(self.cfg.data.val_manifest))
                except OSError:  # a missing manifest: the load reports it, and no index is written
                    self.manifests = None
            return None
        check_shared_directory(self.cache, "data.cache_dir", self.env)  # as the full way checks it
        phases.mark("index check")
        index = CorpusIndex(self.folder, header)
        n_train, n = header["train_samples"], header["samples"]
        fp = header.get("fingerprint")
        # The whole report (every problem and reference pair) where it is small; past that, per-sample lists
        # would be what the index avoids holding: the summary, and where the whole report is.
        details = self.folder / "report.json"
        full = json.loads(details.read_text()) if self.env.is_main or details.stat().st_size <= FULL_REPORT_BYTES \
            else None
        report = full if full is not None and details.stat().st_size <= FULL_REPORT_BYTES \
            else {**header["summary"], "details": str(details)}
        data = Data(IndexedRecords(index, 0, n_train, fp), IndexedRecords(index, n_train, n, None), report)
        phases.mark("index map")
        this_start = {"startup_seconds": phases.seconds, "startup_cpu_seconds": phases.cpu_seconds,
                      "index": str(self.folder)}
        data.report.update(this_start)
        if self.env.is_main:
            full.update(this_start)
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.report_path, full)
        self._announce(data.report, n_train, n - n_train, phases)
        return data

    def _announce(self, report: dict, n_train: int, n_val: int, phases: Phases) -> None:
        refs = report.get("references", {})
        if self.cfg.data.reference != "given":
            self.say(Pairing(**{k: refs[k] for k in Pairing.__dataclass_fields__ if k in refs}).line())
        skipped = report.get("skipped", 0)
        counts = ", ".join(f"{c} {r}" for r, c in report.get("skipped_by_reason", {}).items())
        bad = f"; {skipped} bad sample(s) skipped when it was built ({counts}): list in {self.report_path}" \
            if skipped else ""
        self.say(f"data: ready in {phases.line()} from the prepared index {self.folder} ({n_train} training, "
                 f"{n_val} validation samples{bad})")

    def save(self, data) -> None:
        """Rank 0 writes the index of what the full way loaded; a failure to write costs only the next start.
        ``self.folders``: the full way's parse fills it (a second parse cost rank 0 alone 3.5 s at 100k clips)."""
        if self.folder is None or not self.env.is_main or self.manifests is None:
            return
        t0 = time.perf_counter()
        records = list(data.train) + list(data.val)
        try:
            with tempfile.TemporaryFile() as own:
                cols, files, speakers = record_columns(records, self.mc.audio_num_codebooks, own)

                def write_codes(folder: Path) -> None:
                    own.seek(0)
                    with open(folder / OWN_CODES, "wb") as out:
                        for block in iter(lambda: own.read(1 << 20), b""):
                            out.write(block)

                meta = {"samples": len(records), "train_samples": len(data.train), "code_files": files,
                        "speakers": speakers, "num_codebooks": self.mc.audio_num_codebooks,
                        "manifests": self.manifests, "folders": folder_signature(self.folders),
                        "fingerprint": fingerprint(data.train), "summary": _summary(data.report)}
                write_index(self.folder, cols, meta, data.report, write_codes if OWN_CODES in files else None)
        except OSError as e:
            self.say(f"data: could not write the prepared index {self.folder} ({e}); the next start loads the "
                     f"data from the manifests again")
            return
        self.say(f"data: wrote the prepared index {self.folder} in {time.perf_counter() - t0:.1f} s")
