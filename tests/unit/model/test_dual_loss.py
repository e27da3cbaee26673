"""dual_loss.py: the next-token loss on both streams, its alignment guard rails, and its counts."""

import pytest
import torch
import torch.nn.functional as F

from higgs_ddp.dual_loss import AlignmentError, compute_dual_loss, count_targets

V, C, K = 50, 3, 10  # text vocab, codebooks, codebook_size + 2 (BOS = 8, EOS = 9)
BOS, EOS = K - 2, K - 1


def model_like_batch(seed=0, segments=(6, 4)):
    """Inputs and labels in HiggsAudioModel's convention: labels equal inputs where supervised,
    each audio segment starts with a BOS column whose labels are ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 10:] = -100  # padding
    cols, lab_cols = [], []
    for n in segments:
        seg = torch.randint(0, BOS, (C, n), generator=g)
        seg[:, 0] = BOS
        seg[:, -1] = EOS
        lab = seg.clone()
        lab[:, 0] = -100
        cols.append(seg)
        lab_cols.append(lab)
    audio_ids = torch.cat(cols, 1)
    audio_labels = torch.cat(lab_cols, 1)
    logits = torch.randn(2, 12, V, generator=g, requires_grad=True)
    audio_logits = torch.randn(audio_ids.shape[1], C, K, generator=g, requires_grad=True)
    starts = torch.tensor([0] + list(torch.cumsum(torch.tensor(segments[:-1]), 0)))
    return logits, ids, labels, audio_logits, audio_ids, audio_labels, starts


def manual_shifted(logits, labels, audio_logits, audio_labels, starts):
    text = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    n_text = (labels[:, 1:] != -100).sum()
    total, n_audio = 0.0, 0
    bounds = list(starts.tolist()) + [audio_labels.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):  # each segment on its own: nothing crosses a boundary
        for k in range(C):
            tgt = audio_labels[k, a + 1:b]
            total = total + F.cross_entropy(audio_logits[a:b - 1, k], tgt, reduction="sum")
            n_audio += int((tgt != -100).sum())
    return text / n_text, total / n_audio, int(n_text), n_audio


def test_shifted_matches_a_per_segment_reference():
    logits, ids, labels, alog, aids, alab, starts = model_like_batch()
    out = compute_dual_loss(logits, labels, alog, alab, expanded_input_ids=ids, audio_out_ids=aids)
    text, audio, nt, na = manual_shifted(logits, labels, alog, alab, starts)
    assert out.path == "shifted"
    torch.testing.assert_close(out.text_loss, text)
    torch.testing.assert_close(out.audio_loss, audio)
    assert (int(out.text_tokens), int(out.audio_tokens)) == (nt, na)
    torch.testing.assert_close(out.loss, text + audio)


def test_aligned_on_preshifted_labels_equals_shifted():
    logits, ids, labels, alog, aids, alab, starts = model_like_batch()
    ref = compute_dual_loss(logits, labels, alog, alab, expanded_input_ids=ids, audio_out_ids=aids)
    pre_text = torch.full_like(labels, -100)
    pre_text[:, :-1] = labels[:, 1:]
    pre_audio = torch.full_like(alab, -100)
    pre_audio[:, :-1] = alab[:, 1:]
    pre_audio[:, starts[1:] - 1] = -100  # pre-shifted labels end each segment with ignore
    out = compute_dual_loss(logits, pre_text, alog, pre_audio, expanded_input_ids=ids, audio_out_ids=aids)
    assert out.path == "aligned"  # auto recognised the pre-shifted convention
    torch.testing.assert_close(out.loss, ref.loss)
    assert int(out.audio_tokens) == int(ref.audio_tokens)


def test_aligned_on_unshifted_labels_is_the_copy_bug_and_refused():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    with pytest.raises(AlignmentError, match="copy its input"):
        compute_dual_loss(logits, labels, alog, alab, expanded_input_ids=ids, audio_out_ids=aids,
                          alignment="aligned")
    with pytest.raises(AlignmentError, match="copy"):  # the audio stream alone is enough evidence
        compute_dual_loss(logits, torch.full_like(labels, -100), alog, alab, audio_out_ids=aids,
                          alignment="aligned")


def test_aligned_without_evidence_is_refused():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    pre = torch.full_like(labels, -100)
    pre[:, :-1] = labels[:, 1:]
    with pytest.raises(AlignmentError, match="verify"):
        compute_dual_loss(logits, pre, alog, None, alignment="aligned")
    out = compute_dual_loss(logits, pre, alog, None, expanded_input_ids=ids, alignment="aligned")
    assert out.path == "aligned"


def test_shifting_preshifted_labels_again_is_refused():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    pre = torch.full_like(labels, -100)
    pre[:, :-1] = labels[:, 1:]
    with pytest.raises(AlignmentError, match="t\\+2"):
        compute_dual_loss(logits, pre, alog, None, expanded_input_ids=ids, alignment="shifted")


def test_labels_fitting_neither_convention_raise():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    wrong = labels.clone()
    wrong[wrong != -100] = (wrong[wrong != -100] + 1) % V
    with pytest.raises(AlignmentError, match="neither convention"):
        compute_dual_loss(logits, wrong, alog, alab, expanded_input_ids=ids, audio_out_ids=aids)


def test_auto_needs_inputs_and_shifted_fallback_works_without():
    logits, ids, labels, alog, aids, alab, starts = model_like_batch()
    with pytest.raises(AlignmentError, match="needs"):
        compute_dual_loss(logits, labels, alog, alab)
    out = compute_dual_loss(logits, labels, alog, alab, alignment="shifted")
    text, audio, _, _ = manual_shifted(logits, labels, alog, alab, starts)
    torch.testing.assert_close(out.loss, text + audio)


def test_stream_eos_is_a_target():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    out = compute_dual_loss(logits, labels, alog, alab, expanded_input_ids=ids, audio_out_ids=aids)
    eos_targets = int((alab[:, 1:] == EOS).sum())
    assert eos_targets > 0
    masked = alab.clone()
    masked[masked == EOS] = -100
    without = compute_dual_loss(logits, labels, alog, masked, alignment="shifted")
    assert int(out.audio_tokens) - int(without.audio_tokens) == eos_targets
    # and the EOS logit gets gradient
    out.audio_loss.backward()
    assert alog.grad[:, :, EOS].abs().sum() > 0


def test_segments_do_not_leak_across_the_concatenation():
    logits, ids, labels, alog, aids, alab, starts = model_like_batch()
    leaky = alab.clone()
    leaky[:, starts[1]] = aids[:, starts[1]]  # a collator that forgot the ignore column at a segment start
    out = compute_dual_loss(logits, labels, alog, leaky, audio_out_ids=aids, alignment="shifted")
    out.audio_loss_sum.backward()
    last_of_first = starts[1] - 1
    assert alog.grad[last_of_first].abs().sum() == 0, "the last frame of segment 1 was trained on segment 2"
    assert alog.grad[last_of_first - 1].abs().sum() > 0
    # Same result when the starts are given explicitly instead of being read off audio_out_ids.
    out2 = compute_dual_loss(logits, labels, alog, leaky, audio_out_ids_start=starts, alignment="shifted")
    torch.testing.assert_close(out2.audio_loss, out.audio_loss)


def test_out_of_range_labels_are_reported_not_clamped():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    bad = alab.clone()
    bad[0, 3] = K
    with pytest.raises(ValueError, match="outside"):
        compute_dual_loss(logits, labels, alog, bad, alignment="shifted")
    bad_text = labels.clone()
    bad_text[0, 6] = V + 5
    with pytest.raises(ValueError, match="outside"):
        compute_dual_loss(logits, bad_text, alog, alab, alignment="shifted")


def test_weights_and_per_codebook():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    out = compute_dual_loss(logits, labels, alog, alab, alignment="shifted", text_weight=0.5, audio_weight=2.0)
    torch.testing.assert_close(out.loss, 0.5 * out.text_loss + 2.0 * out.audio_loss)
    assert out.per_codebook_loss.shape == (C,)
    torch.testing.assert_close(out.per_codebook_loss_sum.sum(), out.audio_loss_sum.detach())
    assert int(out.per_codebook_tokens.sum()) == int(out.audio_tokens)


def test_count_targets_matches_the_loss():
    logits, ids, labels, alog, aids, alab, starts = model_like_batch()
    out = compute_dual_loss(logits, labels, alog, alab, expanded_input_ids=ids, audio_out_ids=aids)
    assert count_targets(labels, alab, starts) == (int(out.text_tokens), int(out.audio_tokens))


def test_global_normalisation_makes_split_batches_equal_the_whole():
    """Summing micro-batch losses normalised by the global token count gives the whole-batch mean."""
    logits, ids, labels, alog, aids, alab, starts = model_like_batch(segments=(5,))
    whole = compute_dual_loss(logits, labels, alog, alab, alignment="shifted")
    parts = [compute_dual_loss(logits[i:i + 1], labels[i:i + 1], alog, alab if i == 0 else alab[:, :0],
                               alignment="shifted") for i in range(2)]
    nt = sum(int(p.text_tokens) for p in parts)
    na = sum(int(p.audio_tokens) for p in parts)
    total = sum(p.normalized(nt, na) for p in parts)
    torch.testing.assert_close(total, whole.loss)


def test_no_audio_keeps_the_graph_connected():
    logits, ids, labels, alog, aids, alab, _ = model_like_batch()
    empty = alog[:0]
    out = compute_dual_loss(logits, labels, empty, alab[:, :0], alignment="shifted")
    assert int(out.audio_tokens) == 0 and out.audio_loss.item() == 0.0
    assert out.audio_loss_sum.requires_grad
