"""Each speaker's speaking rate in a corpus: what ``prefs build --rates-from MANIFEST`` holds a prompt's
candidates to where the prompt gives no ``speaking_rate`` of its own.

The rate is the detector's (detectors.py): the letters and digits of what a clip says
(``spoken_characters`` of the user turn before its learned audio) over the clip's seconds, read from the audio
header (nothing is decoded). A speaker's rate is the median over their clips, as the listening samples'
summary takes it: a few clips with long pauses or a wrong transcript move it little. Clips given as codes
(.npy) have no header to read a length from and are counted, not used; so are lines without a speaker.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from higgs_ddp.errors import HiggsError


class RateError(HiggsError, ValueError):
    """A manifest the rates cannot be read from; the line names the file (and line)."""


@dataclass
class CorpusRates:
    manifest: str
    rates: dict = field(default_factory=dict)  # speaker -> median characters per second of their clips
    clips: dict = field(default_factory=dict)  # speaker -> clips measured
    unmeasured: int = 0  # lines with no speaker, only codes, or no spoken characters

    def describe(self) -> str:
        return (f"{len(self.rates)} speaker(s) from {sum(self.clips.values())} clip(s) of {self.manifest}"
                + (f" ({self.unmeasured} line(s) without a speaker, audio or text to measure)" if self.unmeasured
                   else ""))


def corpus_rates(manifest) -> CorpusRates:
    """The speaking rate of every speaker of ``manifest`` (read by the training reader: a line it refuses, or
    a clip whose header training would refuse, is a RateError naming its line)."""
    from higgs_ddp.data.audio import AudioProblem, check_header
    from higgs_ddp.data.manifest import read_manifest
    from higgs_ddp.data.manifest_stats import _spoken_text
    from higgs_ddp.evaluation.detectors import spoken_characters

    path = Path(manifest)
    if not path.is_file():
        raise RateError(f"--rates-from {manifest}: manifest not found")
    entries, problems = read_manifest(str(path))
    if problems:
        raise RateError(f"--rates-from {problems[0]}" + (f" ({len(problems) - 1} more problem(s) in the file)"
                                                        if len(problems) > 1 else ""))
    per_speaker, out = defaultdict(list), CorpusRates(str(manifest))
    for e in entries:
        audio = [ref for ref in e.learned if not ref.is_codes]
        chars = spoken_characters(_spoken_text(e)) if e.learned else 0
        if not e.speaker or not audio or len(audio) != len(e.learned) or not chars:
            out.unmeasured += 1
            continue
        try:
            seconds = sum(info.frames / info.samplerate for info in (check_header(r.path, r.shown) for r in audio))
        except AudioProblem as err:
            raise RateError(f"--rates-from {e.where}: {err}") from None
        if seconds > 0:
            per_speaker[e.speaker].append(chars / seconds)
    for speaker, rates in sorted(per_speaker.items()):
        out.rates[speaker] = float(np.median(rates))
        out.clips[speaker] = len(rates)
    if not out.rates:
        raise RateError(f"--rates-from {manifest}: no clip to measure (a rate needs lines with a \"speaker\", "
                        f"audio and text)")
    return out


def fill_rates(prompts: list, rates: CorpusRates) -> tuple[int, list]:
    """Give each prompt that names a speaker of ``rates`` and has no ``speaking_rate`` its speaker's rate (in
    place) -> (prompts given one, the speakers named by prompts without a rate that ``rates`` does not know)."""
    given, unknown = 0, []
    for p in prompts:
        if p.get("speaking_rate") is None and p.get("speaker"):
            if p["speaker"] in rates.rates:
                p["speaking_rate"] = rates.rates[p["speaker"]]
                given += 1
            elif p["speaker"] not in unknown:
                unknown.append(p["speaker"])
    return given, unknown
