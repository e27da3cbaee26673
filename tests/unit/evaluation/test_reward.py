"""The reward of a candidate, the filters of a chosen one and the pair chosen, on hand-made scores.

evaluation/reward.py has no model in it: each number here is worked out by hand from the documented formula,
and each rule is shown to bite (a candidate that breaks it is not chosen) and to let through one that keeps it."""

import math

import pytest

from higgs_ddp.errors import InputError
from higgs_ddp.evaluation.reward import Filters, RewardConfig, Weights, choose_pair, rate_error, rejections, reward


def scores(**kw):
    """A clean candidate: stopped, 10 frames, no silence, no clipping, nothing measured by a model."""
    return {"frames": 10, "invalid_codes": 0, "seconds": 0.4, "stopped": True, "silence_fraction": 0.0,
            "chars_per_second": 12.0, "clipped_fraction": 0.0, **kw}


def test_the_reward_is_the_documented_weighted_sum():
    w = Weights(cer=2.0, wer=0.5, sim=3.0, stop=1.5, silence=0.25, rate=0.5, clip=4.0)
    s = scores(stopped=False, silence_fraction=0.2, clipped_fraction=0.01, cer=0.1, wer=0.3, speaker_sim=0.6,
               rate_error=abs(math.log(6.0 / 12.0)))
    want = -1.5 - 0.25 * 0.2 - 4.0 * 0.01 - 2.0 * 0.1 - 0.5 * 0.3 + 3.0 * 0.6 - 0.5 * math.log(2.0)
    assert reward(s, w) == pytest.approx(want)
    # an unmeasured term is left out; an unmeasurable similarity for this clip is the lowest cosine
    assert reward(scores(), w) == 0.0
    assert reward(scores(speaker_sim=None), w) == -3.0


def test_the_speaking_rate_error_is_symmetric_in_ratio():
    assert rate_error(24.0, 12.0) == pytest.approx(rate_error(6.0, 12.0)) == pytest.approx(math.log(2))
    assert rate_error(12.0, None) is None and rate_error(None, 12.0) == pytest.approx(math.log(10))


def test_each_filter_bites_and_lets_a_clean_candidate_through():
    f = Filters(max_cer=0.01, min_sim=0.5)
    assert rejections(scores(cer=0.0, speaker_sim=0.9), f) == []
    assert rejections(scores(stopped=False), f) == ["hit the length limit"]
    assert rejections(scores(stopped=False), Filters(must_stop=False)) == []
    assert rejections(scores(invalid_codes=2), f) == ["2 codes outside the codebook"]
    assert rejections(scores(frames=0, silence_fraction=1.0), f) == ["empty (the model ended the audio at once)"]
    assert rejections(scores(silence_fraction=0.95), f)[0].startswith("silent")
    assert rejections(scores(cer=0.02), f) == ["CER 0.020 > 0.01"]
    assert rejections(scores(cer=0.02), Filters(max_cer=None)) == []
    assert rejections(scores(speaker_sim=0.4), f) == ["speaker similarity 0.400 < 0.5"]
    assert rejections(scores(speaker_sim=None), f) == ["speaker similarity unmeasured"]


def candidate(r, rejected=(), frames=10):
    return {"reward": r, "rejections": list(rejected), "frames": frames}


def test_the_pair_is_the_best_valid_candidate_against_the_worst():
    f = Filters()
    got = choose_pair([candidate(0.9, ["hit the length limit"]), candidate(0.5), candidate(-1.0), candidate(0.7)], f)
    assert (got.chosen, got.rejected, got.why) == (3, 2, "")  # the best of all (0) may not be chosen
    # ties: the lower index, both ends
    assert (lambda c: (c.chosen, c.rejected))(choose_pair([candidate(0), candidate(1), candidate(1), candidate(0)],
                                                          f)) == (1, 0)
    # an empty candidate is never the rejected one (a pair's codes hold at least one frame)
    got = choose_pair([candidate(-5.0, ["empty"], frames=0), candidate(0.0), candidate(-1.0)], f)
    assert (got.chosen, got.rejected) == (1, 2)


@pytest.mark.parametrize("cands, why", [
    ([candidate(0.0)], "fewer than 2 candidates"),
    ([candidate(0.0, ["x"]), candidate(1.0, ["y"])], "no candidate passes the filters for a chosen one"),
    ([candidate(0.5), candidate(0.5)], "no candidate is worse than the best valid one by more than 0"),
])
def test_a_prompt_without_a_valid_pair_says_why(cands, why):
    got = choose_pair(cands, Filters())
    assert (got.chosen, got.rejected) == (None, None) and got.why.startswith(why)
    assert choose_pair([candidate(0.5), candidate(0.4)], Filters(min_margin=0.2)).chosen is None
    assert choose_pair([candidate(0.5), candidate(0.2)], Filters(min_margin=0.2)).chosen == 0


def test_settings_that_make_no_sense_are_one_line():
    RewardConfig().check()
    for config, flag in [(RewardConfig(Weights(cer=-1)), "--cer-weight"), (RewardConfig(Weights(sim=math.nan)),
                                                                            "--sim-weight"),
                         (RewardConfig(filters=Filters(max_cer=-0.1)), "--max-cer"),
                         (RewardConfig(filters=Filters(min_sim=2)), "--min-sim"),
                         (RewardConfig(filters=Filters(max_silence=0)), "--max-silence"),
                         (RewardConfig(filters=Filters(min_margin=-1)), "--min-margin")]:
        with pytest.raises(InputError, match=flag):
            config.check()
