"""The DPO loss on both streams equals a hand computation from the tiny HiggsAudioModel's logits and normalises globally.

A candidate's sequence log-probability (dual_loss.sequence_logps) is the sum over exactly the targets the
supervised loss trains on: text tokens (position t predicts t+1), every codebook of every audio segment of
that sample with the delay pattern and its stream EOS, nothing across a segment boundary. The batches are
built by the real collator (two audio-out segments per sample: two spoken turns, or a voice reference and
the target) and scored by the real model; the hand computation below is written out with log_softmax and
gather, sample by sample and segment by segment, without dual_loss's masks.
"""

import math

import pytest
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
from helpers import TINY

from higgs_ddp.dpo_loss import dpo_loss
from higgs_ddp.dual_loss import compute_dual_loss, count_sample_targets, sequence_logps

BETA = 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(policy, reference, tokenizer, collator): two tiny random models (different seeds)."""
    from higgs_ddp.config import load_config
    from higgs_ddp.data.collator import HiggsCollator
    from higgs_ddp.model import HiggsForward, build_model, load_tokenizer

    out = tmp_path_factory.mktemp("dpo")
    models = []
    for seed in (1, 2):
        cfg = load_config(str(TINY), [f"output_dir={out}", f"train.seed={seed}"])
        tokenizer = load_tokenizer(cfg)
        models.append(HiggsForward(build_model(cfg, tokenizer)))
    return models[0], models[1], tokenizer, HiggsCollator.for_model(models[0].model.config)


def two_turns(tokenizer, seed, frames):
    """Two spoken assistant turns, both learned: two trained audio-out segments."""
    from higgs_ddp.data.prompt import tokenize_chatml

    g = torch.Generator().manual_seed(seed)
    chatml = ChatMLSample(messages=[
        Message("system", "Generate audio following instruction."),
        Message("user", "one"), Message("assistant", AudioContent(audio_url="a")),
        Message("user", "two"), Message("assistant", AudioContent(audio_url="b")),
    ], start_index=1)
    return tokenize_chatml(tokenizer, chatml, [torch.randint(0, 64, (4, f), generator=g) for f in frames])


def cloned(tokenizer, seed, frames):
    """A voice reference (context: an audio-out segment without targets) and the learned target."""
    from higgs_ddp.data.prompt import tokenize_sample

    g = torch.Generator().manual_seed(seed)
    return tokenize_sample(tokenizer, "hello there", torch.randint(0, 64, (4, frames), generator=g),
                           ref_text="ref", ref_codes=torch.randint(0, 64, (4, 5), generator=g))


def candidates(tokenizer):
    """Two pairs, TRL's concatenated layout: rows [chosen 0, chosen 1, rejected 0, rejected 1]; each
    rejected candidate has the same prompt as its chosen one and a different length."""
    return [two_turns(tokenizer, 0, (6, 4)), cloned(tokenizer, 1, 7),
            two_turns(tokenizer, 2, (3, 9)), cloned(tokenizer, 3, 4)]


def forward(model, batch):
    return model(**batch.model_inputs())


def logps(out, batch, group_loc=None):
    return sequence_logps(
        out["logits"], out["expanded_labels"], out["audio_logits"], batch.label_audio_ids,
        audio_out_ids_start=batch.audio_out_ids_start,
        audio_out_ids_start_group_loc=batch.audio_out_ids_start_group_loc if group_loc is None else group_loc,
        expanded_input_ids=out["expanded_input_ids"], audio_out_ids=batch.audio_out_ids)


def hand_logps(out, batch, samples, audio_out_id):
    """Per sample: log_softmax + gather over its text row and each of its own audio segments (the collator
    concatenates the samples' segments in order, so sample i owns its count of <|AUDIO_OUT|> segments)."""
    logits, labels, alog, alab = out["logits"], out["expanded_labels"], out["audio_logits"], batch.label_audio_ids
    owners = [i for i, s in enumerate(samples) for _ in range(int((s.input_ids == audio_out_id).sum()))]
    bounds = batch.audio_out_ids_start.tolist() + [alab.shape[1]]
    assert len(owners) == len(bounds) - 1
    totals, counts, eos = [], [], 0
    for i in range(len(samples)):
        target = labels[i, 1:]
        keep = target != -100
        lp = torch.log_softmax(logits[i, :-1].float(), dim=-1)[keep]
        total, count = lp.gather(1, target[keep][:, None]).sum(), int(keep.sum())
        for (a, b), owner in zip(zip(bounds[:-1], bounds[1:]), owners):
            if owner != i:
                continue
            target = alab[:, a + 1:b].T  # (frames - 1, C): column j predicts j + 1 of its own segment
            keep = target != -100
            lp = torch.log_softmax(alog[a:b - 1].float(), dim=-1)[keep]  # (targets, K)
            total = total + lp.gather(1, target[keep][:, None]).sum()
            count += int(keep.sum())
            eos += int((target[keep] == alog.shape[-1] - 1).sum())
        totals.append(total)
        counts.append(count)
    assert eos > 0, "the stream EOS must be among the targets"
    return torch.stack(totals), torch.tensor(counts)


def hand_dpo(pc, pr, rc, rr, nc, nr, length_normalized, sft_weight):
    sft = -pc.sum() / nc.sum()  # the chosen candidates' mean -log p per target
    if length_normalized:
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    z = BETA * ((pc - rc) - (pr - rr))
    return torch.log(1 + torch.exp(-z)).mean() + sft_weight * sft  # -logsigmoid(z), written out


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(setup):
    policy, _, tokenizer, collator = setup
    batch = collator(candidates(tokenizer))
    pol = logps(forward(policy, batch), batch)
    with torch.no_grad():  # the reference pass, as a trainer makes it
        ref = logps(forward(policy, batch), batch)
    for length_normalized in (False, True):
        out = dpo_loss(pol.logps[:2], pol.logps[2:], ref.logps[:2], ref.logps[2:], beta=BETA,
                       chosen_tokens=pol.tokens[:2], rejected_tokens=pol.tokens[2:],
                       length_normalized=length_normalized)
        assert torch.equal(out.losses, torch.full((2,), math.log(2)))
        assert torch.equal(out.loss, torch.tensor(math.log(2)))
        assert not out.chosen_rewards.any() and not out.rejected_rewards.any() and not out.margins.any()
        assert not out.accuracies.any()  # a tie is not a preference
        assert out.loss.requires_grad  # and the first step moves: -β/2 (∇π_c - ∇π_r) per pair


@pytest.mark.parametrize("length_normalized,sft_weight", [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)])
def test_loss_and_gradient_equal_a_hand_computation(setup, length_normalized, sft_weight):
    policy, reference, tokenizer, collator = setup
    samples = candidates(tokenizer)
    batch = collator(samples)
    out = forward(policy, batch)
    with torch.no_grad():
        ref_out = forward(reference, batch)
    pol, ref = logps(out, batch), logps(ref_out, batch)
    audio_out = policy.model.config.audio_out_token_idx
    hand, counts = hand_logps(out, batch, samples, audio_out)
    torch.testing.assert_close(pol.logps, hand)
    assert torch.equal(pol.tokens, counts) and (pol.text_tokens > 0).all() and (pol.audio_tokens > 0).all()
    # Exactly the supervised loss's targets: same sum, same counts as the collator's.
    dl = compute_dual_loss(out["logits"], out["expanded_labels"], out["audio_logits"], batch.label_audio_ids,
                           audio_out_ids_start=batch.audio_out_ids_start, alignment="shifted")
    torch.testing.assert_close(-pol.logps.sum(), dl.text_loss_sum + dl.audio_loss_sum)
    assert int(pol.tokens.sum()) == batch.text_targets + batch.audio_targets
    assert torch.equal(count_sample_targets(batch.label_ids, batch.label_audio_ids, batch.audio_out_ids_start,
                                            batch.audio_out_ids_start_group_loc), pol.tokens)

    got = dpo_loss(pol.logps[:2], pol.logps[2:], ref.logps[:2], ref.logps[2:], beta=BETA,
                   chosen_tokens=pol.tokens[:2], rejected_tokens=pol.tokens[2:],
                   length_normalized=length_normalized, sft_weight=sft_weight)
    ref_hand = hand_logps(ref_out, batch, samples, audio_out)[0]
    want = hand_dpo(hand[:2], hand[2:], ref_hand[:2], ref_hand[2:], counts[:2], counts[2:],
                    length_normalized, sft_weight)
    torch.testing.assert_close(got.loss, want)
    z = BETA * ((hand[:2] - ref_hand[:2]) - (hand[2:] - ref_hand[2:]))
    if not length_normalized:  # differences of sums of hundreds of float32 log-probabilities
        torch.testing.assert_close(got.chosen_rewards, BETA * (hand[:2] - ref_hand[:2]).detach(), rtol=0, atol=1e-3)
        torch.testing.assert_close(got.margins, z.detach(), rtol=0, atol=1e-3)
    assert torch.equal(got.accuracies, (got.margins > 0).float())
    leaves = [out["logits"], out["audio_logits"]]
    for g_got, g_want in zip(torch.autograd.grad(got.loss, leaves, retain_graph=True),
                             torch.autograd.grad(want, leaves)):
        assert g_want.abs().sum() > 0
        torch.testing.assert_close(g_got, g_want)


def test_each_samples_log_probability_is_the_same_in_a_batch_and_alone(setup):
    policy, _, tokenizer, collator = setup
    samples = candidates(tokenizer)[:2]
    with torch.no_grad():
        batch = collator(samples)
        together = logps(forward(policy, batch), batch)
        for i, sample in enumerate(samples):
            alone = collator([sample])
            one = logps(forward(policy, alone), alone)
            torch.testing.assert_close(one.logps, together.logps[i:i + 1], rtol=1e-5, atol=1e-4)
            assert torch.equal(one.tokens, together.tokens[i:i + 1])
            assert torch.equal(one.audio_tokens, together.audio_tokens[i:i + 1])


def test_the_deferred_text_head_and_a_batch_without_audio_give_the_same_log_probabilities(setup):
    """train.text_logits=supervised: the head applied to the scored rows only (in chunks) changes nothing; a
    text-only batch has zero audio log-probability but stays connected to the audio head (DDP needs it)."""
    from higgs_ddp.model import HiggsForward, text_head

    policy, _, tokenizer, collator = setup
    batch = collator(candidates(tokenizer))
    plain = forward(policy, batch)
    want = logps(plain, batch)
    out = HiggsForward(policy.model, defer_text_head=True)(**batch.model_inputs())
    got = sequence_logps(None, out["expanded_labels"], out["audio_logits"], batch.label_audio_ids,
                         audio_out_ids_start=batch.audio_out_ids_start,
                         audio_out_ids_start_group_loc=batch.audio_out_ids_start_group_loc, alignment="shifted",
                         text_hidden=out["text_hidden"], text_head=text_head(policy.model), chunk_rows=2)
    torch.testing.assert_close(got.logps, want.logps)
    assert torch.equal(got.tokens, want.tokens)

    no_audio = sequence_logps(plain["logits"], plain["expanded_labels"], plain["audio_logits"][:0],
                              batch.label_audio_ids[:, :0], audio_out_ids_start=batch.audio_out_ids_start[:0],
                              audio_out_ids_start_group_loc=batch.audio_out_ids_start_group_loc[:0],
                              alignment="shifted")
    torch.testing.assert_close(no_audio.logps, want.text_logps)
    assert not no_audio.audio_logps.any() and not no_audio.audio_tokens.any()
    assert no_audio.audio_logps.requires_grad


def test_micro_batches_over_the_global_pair_count_equal_the_full_batch(setup):
    """What the trainer relies on: each micro-batch's sums divided by the global pair (and chosen-target)
    counts, added up, give the full batch's mean loss and gradient, however the pairs are split."""
    policy, reference, tokenizer, collator = setup
    c0, c1, r0, r1 = candidates(tokenizer)
    params = [p for p in policy.parameters() if p.requires_grad]

    def step(rows_per_micro):
        batches = [collator(rows) for rows in rows_per_micro]
        pairs = sum(len(rows) // 2 for rows in rows_per_micro)
        sft_tokens = sum(int(count_sample_targets(b.label_ids, b.label_audio_ids, b.audio_out_ids_start,
                                                  b.audio_out_ids_start_group_loc)[:len(r) // 2].sum())
                         for b, r in zip(batches, rows_per_micro))
        policy.zero_grad(set_to_none=True)
        total, local = 0.0, []
        for b, rows in zip(batches, rows_per_micro):
            p = len(rows) // 2
            pol = logps(forward(policy, b), b)
            with torch.no_grad():
                ref = logps(forward(reference, b), b)
            out = dpo_loss(pol.logps[:p], pol.logps[p:], ref.logps[:p], ref.logps[p:], beta=BETA,
                           chosen_tokens=pol.tokens[:p], sft_weight=0.3)
            loss = out.normalized(pairs, sft_tokens)
            loss.backward()
            total += loss.detach()
            local.append(out.loss.detach())
        return total, [p.grad.clone() for p in params], sum(local) / len(local)

    full, full_grads, _ = step([[c0, c1, r0, r1]])
    split, split_grads, mean_of_local_means = step([[c0, r0], [c1, r1]])
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(split_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # What it guards against: each micro-batch's own mean weighs a chosen target of a short candidate
    # more than one of a long candidate.
    assert abs(float(mean_of_local_means - full)) > 1e-4


def test_negative_control_an_audio_segment_given_to_the_wrong_sample(setup):
    """The segment -> sample map matters: the same targets credited to the other sample move its
    log-probability (the total stays), and the DPO loss with it."""
    policy, reference, tokenizer, collator = setup
    samples = candidates(tokenizer)
    batch = collator(samples)
    with torch.no_grad():
        out, ref_out = forward(policy, batch), forward(reference, batch)
    right, ref = logps(out, batch), logps(ref_out, batch)
    wrong_map = batch.audio_out_ids_start_group_loc.clone()
    assert wrong_map.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    wrong_map[1] = 2  # chosen 0's second spoken turn, credited to rejected 0
    wrong = logps(out, batch, group_loc=wrong_map)
    torch.testing.assert_close(wrong.logps.sum(), right.logps.sum())
    assert not torch.allclose(wrong.logps[[0, 2]], right.logps[[0, 2]])
    assert torch.equal(wrong.logps[[1, 3]], right.logps[[1, 3]])

    def loss(x):
        return dpo_loss(x.logps[:2], x.logps[2:], ref.logps[:2], ref.logps[2:], beta=BETA).loss

    assert not torch.allclose(loss(wrong), loss(right))
    with pytest.raises(ValueError, match="one batch row per segment"):
        logps(out, batch, group_loc=wrong_map[:-1])
    with pytest.raises(ValueError, match="outside the batch"):
        logps(out, batch, group_loc=wrong_map + 4)


def test_bad_arguments_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="one value per pair"):
        dpo_loss(x, x[:1], x, x, beta=0.1)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(x, x, x, x, beta=0.1, sft_weight=1.0)
    with pytest.raises(ValueError, match="no supervised targets"):
        dpo_loss(x, x, x, x, beta=0.1, length_normalized=True, chosen_tokens=torch.tensor([3, 0]),
                 rejected_tokens=torch.tensor([2, 2]))
