"""K candidates for one prompt, each generated through the path ``speak`` and the listening samples use
(generation.py ``speak_text``) with a seed of its own, and scored by the detectors and the scorers there are
(detectors.py, scoring.py). ``prefs build`` calls it per prompt; an online loop can call it as it is.

A candidate's seed depends only on the base seed, the prompt's id and the candidate's index
(``candidate_seed``), never on the rank, the order or what was generated before: the same build on 1 or 8
ranks, or resumed after a kill, generates the same candidates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Optional

import torch

from higgs_ddp.evaluation.detectors import check_clip
from higgs_ddp.evaluation.generation import Sampling, generation_state, speak_text
from higgs_ddp.evaluation.reward import rate_error

SEED_RANGE = 2 ** 31 - 1  # boson's generate and torch.manual_seed both take it


def candidate_seed(base: int, prompt_id: str, index: int) -> int:
    """A seed from (base seed, prompt id, candidate index) alone: sha256 of the three, as an int."""
    digest = hashlib.sha256(f"{base}\x00{prompt_id}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_RANGE


@dataclass
class Candidate:
    index: int
    seed: int
    codes: torch.Tensor  # (num_codebooks, frames) int16, no delay pattern, no BOS/EOS: the code cache's form
    scores: dict  # detectors and scorers; see ``candidate_scores``


def candidate_scores(wave, sample_rate: int, text: str, generated, scorer, prompt: dict,
                     speaking_rate: Optional[float]) -> dict:
    """Every number reward.py reads, for one decoded candidate: frames, seconds, stopped, invalid_codes,
    silence_fraction, chars_per_second, clipped_fraction, rate_error (against ``speaking_rate``, the
    speaker's chars/s, when known), and the scorer's transcript, wer, cer, speaker_sim where it has them
    (no speaker_sim for a prompt without a voice to compare with: reward.py then leaves the term out)."""
    checks = check_clip(wave, sample_rate, text, generated.hit_limit)
    scores = {"frames": int(generated.codes.shape[1]), "invalid_codes": generated.invalid_codes,
              **checks.as_dict()}
    if speaking_rate:
        scores["rate_error"] = rate_error(checks.chars_per_second, speaking_rate)
    if scorer is not None and scorer.enabled:
        from higgs_ddp.evaluation.scoring import UNMEASURED, speaker_reference

        scores.update(scorer.score(wave, sample_rate, prompt))
        if "speaker_sim" in scores and not speaker_reference(prompt):  # nothing to compare with: not a score
            del scores["speaker_sim"], scores[UNMEASURED]
    return scores


def generate_candidates(loaded, prompt: dict, count: int, sampling: Sampling, base_seed: int, scorer=None,
                        ref_codes: Optional[torch.Tensor] = None, what: str = "") -> list[Candidate]:
    """``count`` candidates for ``prompt`` ({id, text, reference_text?, speaker_audio?, reference_audio?,
    language?, speaking_rate?}: scoring.Scorer's keys) from ``loaded`` (tools.inference.Loaded), each in a
    generation state of its own seeded by its candidate seed, so that none depends on another."""
    codec, out = loaded.codec, []
    for index in range(count):
        seed = candidate_seed(base_seed, prompt["id"], index)
        with generation_state(loaded.model, seed):
            spoken = speak_text(loaded.model, loaded.tokenizer, codec, loaded.cfg, prompt["text"],
                                prompt.get("reference_text"), ref_codes, sampling=replace(sampling, seed=seed),
                                what=what)
        scores = candidate_scores(spoken.wave, codec.sample_rate, prompt["text"], spoken.generated, scorer, prompt,
                                  prompt.get("speaking_rate"))
        out.append(Candidate(index, seed, spoken.generated.codes.to(torch.int16).contiguous(), scores))
    return out
