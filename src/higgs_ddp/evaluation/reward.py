"""One number per generated candidate from its scores, the hard rules a chosen candidate must pass, and the
choice of a preference pair among a prompt's candidates. No model here: the scores come from the detectors
(detectors.py) and the scorers (scoring.py), so ``prefs build`` and a later online loop share it.

    reward = - cer_weight · CER - wer_weight · WER + sim_weight · speaker similarity
             - stop_weight · [hit the length limit] - silence_weight · silence fraction
             - rate_weight · |ln(chars per second / the speaker's rate)| - clip_weight · clipped fraction

A term whose score was not measured for the prompt (no ASR model, no reference voice, no speaker rate) is
left out for all its candidates. A speaker similarity that could not be measured for one candidate (a clip
too short or silent to embed) counts as -1, the lowest cosine.

A chosen candidate must pass every filter (``Filters``): it stopped by itself, holds no codes outside the
codebook, is not silent, and, where measured, has CER <= ``max_cer`` and speaker similarity >= ``min_sim``.
The pair is the best candidate that passes against the worst candidate of all that holds audio (NeMo
Magpie-TTS's DPO recipe: the chosen under a CER threshold, the rejected the worst), when the chosen's reward is above the
rejected's by more than ``min_margin``; otherwise the prompt has no pair, and the reason says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from higgs_ddp.errors import InputError


@dataclass(frozen=True)
class Weights:
    cer: float = 1.0
    wer: float = 0.0  # CER moves before WER does, and counts every character: it is the default measure
    sim: float = 1.0
    stop: float = 1.0  # a candidate that hit the length limit loses this much
    silence: float = 0.5
    rate: float = 0.5
    clip: float = 1.0


@dataclass(frozen=True)
class Filters:
    max_cer: Optional[float] = 0.01  # NeMo Magpie-TTS's chosen threshold; None: no CER rule
    min_sim: Optional[float] = None
    must_stop: bool = True  # the chosen ended its audio itself, within the length limit
    max_silence: float = 0.9  # detectors.SILENT_CLIP: a clip this silent speaks nothing
    min_margin: float = 0.0  # the chosen's reward must exceed the rejected's by more than this


@dataclass(frozen=True)
class RewardConfig:
    weights: Weights = Weights()
    filters: Filters = Filters()

    def check(self) -> None:
        """InputError (one line) for a weight or threshold that makes no sense."""
        for name, value in asdict(self.weights).items():
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"--{name}-weight must be a finite number >= 0, got {value}")
        f = self.filters
        if f.max_cer is not None and not f.max_cer >= 0:
            raise InputError(f"--max-cer must be >= 0, got {f.max_cer}")
        if f.min_sim is not None and not -1 <= f.min_sim <= 1:
            raise InputError(f"--min-sim must be in [-1, 1], got {f.min_sim}")
        if not 0 < f.max_silence <= 1:
            raise InputError(f"--max-silence must be in (0, 1], got {f.max_silence}")
        if not (math.isfinite(f.min_margin) and f.min_margin >= 0):
            raise InputError(f"--min-margin must be >= 0, got {f.min_margin}")

    def as_dict(self) -> dict:
        return {"weights": asdict(self.weights), "filters": asdict(self.filters)}


def rate_error(chars_per_second: Optional[float], target: Optional[float]) -> Optional[float]:
    """|ln(rate / target)|: as far off at half the speaker's rate as at twice it; None where not measurable.
    An empty clip (no rate) is as far off as a clip at a tenth of the rate would be."""
    if not target:
        return None
    if not chars_per_second:
        return math.log(10.0)
    return abs(math.log(chars_per_second / target))


def reward(scores: dict, weights: Weights) -> float:
    """The reward of one candidate from its scores (the keys ``candidate_scores`` writes)."""
    total = -weights.stop * (not scores["stopped"]) - weights.silence * scores["silence_fraction"] \
        - weights.clip * scores["clipped_fraction"]
    if scores.get("cer") is not None:
        total -= weights.cer * scores["cer"]
    if scores.get("wer") is not None:
        total -= weights.wer * scores["wer"]
    if "speaker_sim" in scores:  # measured for this prompt; None for this clip: the lowest cosine
        total += weights.sim * (scores["speaker_sim"] if scores["speaker_sim"] is not None else -1.0)
    if scores.get("rate_error") is not None:
        total -= weights.rate * scores["rate_error"]
    return total


def rejections(scores: dict, filters: Filters) -> list[str]:
    """Why a candidate cannot be the chosen one ([] when it can), in words for candidates.jsonl."""
    out = []
    if filters.must_stop and not scores["stopped"]:
        out.append("hit the length limit")
    if scores["invalid_codes"]:
        out.append(f"{scores['invalid_codes']} codes outside the codebook")
    if scores["frames"] == 0:
        out.append("empty (the model ended the audio at once)")
    elif scores["silence_fraction"] >= filters.max_silence:
        out.append(f"silent (silence fraction {scores['silence_fraction']:.2f} >= {filters.max_silence:g})")
    if filters.max_cer is not None and scores.get("cer") is not None and scores["cer"] > filters.max_cer:
        out.append(f"CER {scores['cer']:.3f} > {filters.max_cer:g}")
    if filters.min_sim is not None and "speaker_sim" in scores:
        sim = scores["speaker_sim"]
        if sim is None:
            out.append("speaker similarity unmeasured")
        elif sim < filters.min_sim:
            out.append(f"speaker similarity {sim:.3f} < {filters.min_sim:g}")
    return out


@dataclass
class Choice:
    chosen: Optional[int]  # candidate indices; None: no pair
    rejected: Optional[int]
    why: str = ""  # why there is no pair ("" when there is one)


def choose_pair(candidates: list[dict], filters: Filters) -> Choice:
    """``candidates``: each with "reward", "rejections" (the lists above) and "frames", in candidate order.
    The best valid candidate against the worst of all that hold at least one frame (a pair's codes are never
    empty: a model that ends its audio at once shows in the rewards and counts, not as a candidate to
    train against). Ties go to the lower index, so the choice is deterministic."""
    if len(candidates) < 2:
        return Choice(None, None, "fewer than 2 candidates")
    valid = [i for i, c in enumerate(candidates) if not c["rejections"]]
    if not valid:
        return Choice(None, None, "no candidate passes the filters for a chosen one")
    chosen = max(valid, key=lambda i: (candidates[i]["reward"], -i))
    spoken = [i for i, c in enumerate(candidates) if c["frames"] > 0]
    rejected = min(spoken, key=lambda i: (candidates[i]["reward"], i))
    margin = candidates[chosen]["reward"] - candidates[rejected]["reward"]
    if chosen == rejected or not margin > filters.min_margin:
        return Choice(None, None, f"no candidate is worse than the best valid one by more than "
                                  f"{filters.min_margin:g} (margin {margin:.4g})")
    return Choice(chosen, rejected)
