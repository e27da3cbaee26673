"""Next-token loss for HiggsAudioModel's two output streams (text logits and audio-codebook logits).

Standalone: depends only on torch, so it can be dropped into any trainer.

HiggsAudioModel returns labels that are *not* shifted: ``expanded_labels[t] == expanded_input_ids[t]``
at every supervised position, and ``label_audio_ids`` equals ``audio_out_ids`` column for column.
Computing cross-entropy between ``logits[t]`` and ``labels[t]`` therefore teaches the model to copy
its input (near-zero loss, silent audio). The correct ("shifted") loss predicts position t+1 from t.
The "aligned" path exists for labels that were shifted already, and is refused for labels that equal
the inputs.

One selection of supervised targets serves every reduction: ``compute_dual_loss`` sums their negative
log-likelihoods over the batch (the supervised loss), ``sequence_logps`` sums their log-probabilities per
sample (a candidate's sequence log-probability, what preference losses such as DPO compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ALIGNMENTS = ("auto", "shifted", "aligned")


class AlignmentError(ValueError):
    """The labels do not fit the requested (or any) alignment convention."""


@dataclass
class DualLoss:
    loss: torch.Tensor  # text_weight * text_loss + audio_weight * audio_loss (differentiable)
    text_loss: torch.Tensor  # mean over supervised text targets (differentiable)
    audio_loss: torch.Tensor  # mean over supervised audio targets, all codebooks (differentiable)
    text_loss_sum: torch.Tensor  # differentiable sums: what a trainer normalises globally
    audio_loss_sum: torch.Tensor
    text_tokens: torch.Tensor  # 0-dim int64 counts of supervised targets
    audio_tokens: torch.Tensor
    per_codebook_loss: torch.Tensor  # (C,) mean loss per codebook, detached
    per_codebook_loss_sum: torch.Tensor  # (C,) detached sums, for token-weighted reductions
    per_codebook_tokens: torch.Tensor  # (C,)
    path: str  # "shifted" or "aligned"
    per_codebook_correct: Optional[torch.Tensor] = None  # (C,) top-1 hits, when asked for (accuracy=True)
    text_weight: float = 1.0
    audio_weight: float = 1.0

    def normalized(self, text_norm, audio_norm, scale: float = 1.0) -> torch.Tensor:
        """Loss normalised by externally supplied token counts, e.g. the global number of supervised
        targets over all ranks and micro-steps; ``scale`` undoes DDP's gradient averaging."""
        text = self.text_loss_sum / torch.clamp(torch.as_tensor(text_norm), min=1)
        audio = self.audio_loss_sum / torch.clamp(torch.as_tensor(audio_norm), min=1)
        return (self.text_weight * text + self.audio_weight * audio) * scale


def _segment_last_columns(n: int, starts: Optional[torch.Tensor], device) -> torch.Tensor:
    """Mask over audio positions marking the last column of every segment followed by another one.

    Audio segments of all samples are concatenated along one axis; the logits there must never be
    trained to predict the first column of the *next* segment.
    """
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if starts is not None and starts.numel() > 0:
        starts = starts.to(device)
        inner = starts[(starts > 0) & (starts <= n)]
        mask[inner - 1] = True
    return mask


def _fits(labels, inputs, ignore_index, shift: bool, boundary: Optional[torch.Tensor] = None) -> Optional[bool]:
    """Whether supervised labels equal the inputs at the same (shift=False) or next (shift=True)
    position along the last axis. None when nothing is supervised (no evidence either way)."""
    sup = labels != ignore_index
    if not bool(sup.any()):
        return None
    if not shift:
        return bool((labels[sup] == inputs[sup]).all())
    if bool(sup[..., -1].any()):
        return False  # a label at the last position cannot be the next input
    lab, nxt, s = labels[..., :-1], inputs[..., 1:], sup[..., :-1]
    if boundary is not None:
        s = s & ~boundary[:-1]
        if bool((sup[..., :-1] & boundary[:-1]).any()):
            return False
    return bool((lab[s] == nxt[s]).all())


def _decide(name, labels, inputs, ignore_index, boundary=None) -> Optional[str]:
    same = _fits(labels, inputs, ignore_index, shift=False)
    if same is None:
        return None
    nxt = _fits(labels, inputs, ignore_index, shift=True, boundary=boundary)
    if same:
        return "shifted"  # the model's own convention; also wins the degenerate case where both fit
    if nxt:
        return "aligned"
    raise AlignmentError(
        f"{name}: labels match neither convention - not equal to the inputs at the same position "
        f"(unshifted, use alignment='shifted') nor at the next position (pre-shifted, 'aligned')"
    )


def _check(name, what, labels, ignore_index):
    if labels is None:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= what))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"{name}: label {value} outside [0, {what}) (and not ignore_index={ignore_index})")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row. Only supervised rows reach here, so the float32 upcast costs (targets, V),
    not (B*T, V)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _head_nll(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _nll(head(hidden), targets)


def head_cross_entropy(head: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int = 0) -> torch.Tensor:
    """CE(head(hidden), targets) per row (n,), ``chunk_rows`` rows at a time (0: all at once).

    With several chunks each one is checkpointed: its (rows, V) logits and softmax are recomputed in
    backward instead of kept, so at most one chunk's logits is alive at any time."""
    n = hidden.shape[0]
    if not chunk_rows or n <= chunk_rows:  # (n == 0 gives (0,), still connected to the head's weights)
        return _head_nll(head, hidden, targets)
    parts = []
    for i in range(0, n, chunk_rows):
        h, y = hidden[i:i + chunk_rows], targets[i:i + chunk_rows]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_nll, head, h, y, use_reentrant=False))
        else:
            parts.append(_head_nll(head, h, y))
    return torch.cat(parts)


def head_cross_entropy_sum(head: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                           chunk_rows: int = 0) -> torch.Tensor:
    """sum CE(head(hidden), targets) over rows, chunked as ``head_cross_entropy`` does."""
    return head_cross_entropy(head, hidden, targets, chunk_rows).sum()


@dataclass
class _Streams:
    """Both streams checked, with the label convention decided: what every reduction here starts from."""
    scored: torch.Tensor  # (B, T, V) logits, or (B, T, H) final hidden states when text_head is set
    labels: torch.Tensor  # (B, T) expanded_labels
    text_head: Optional[Callable]
    chunk_rows: int
    audio_logits: Optional[torch.Tensor]  # (N, C, K)
    label_audio_ids: Optional[torch.Tensor]  # (C, N)
    boundary: Optional[torch.Tensor]  # (N,) segment ends followed by another segment; None: no audio
    num_cb: int
    path: str  # "shifted" or "aligned"
    ignore_index: int


@dataclass
class _Targets:
    """One stream's supervised targets, in one order: -log p of each and where it sits."""
    nll: torch.Tensor  # (M,) float32, differentiable
    row: torch.Tensor  # (M,) text: the batch row; audio: the column of the audio concatenation
    codebook: Optional[torch.Tensor] = None  # (M,) audio only
    supervised: Optional[torch.Tensor] = None  # (C, N') audio only: the mask the targets were taken from
    logits: Optional[torch.Tensor] = None  # (N', C, K) audio only: the scored positions (for accuracy)
    labels: Optional[torch.Tensor] = None  # (C, N') audio only


def _prepare(logits, expanded_labels, audio_logits, label_audio_ids, expanded_input_ids, audio_out_ids,
             alignment, ignore_index, audio_out_ids_start, validate, text_hidden, text_head, text_vocab_size,
             chunk_rows) -> _Streams:
    """The inputs checked and the label convention decided (or verified)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    text_vocab_size = _text_vocab_size(logits, text_hidden, text_head, text_vocab_size)
    scored = logits if logits is not None else text_hidden  # (B, T, V) logits or (B, T, H) states
    has_audio = audio_logits is not None and label_audio_ids is not None and label_audio_ids.numel() > 0
    n_audio = label_audio_ids.shape[-1] if has_audio else 0
    if has_audio and audio_logits.shape[0] != n_audio:
        raise ValueError(f"audio_logits has {audio_logits.shape[0]} positions, label_audio_ids {n_audio}")
    if audio_out_ids_start is None and audio_out_ids is not None and has_audio:
        audio_out_ids_start = torch.nonzero(audio_out_ids[0] == audio_logits.shape[-1] - 2).flatten()
    boundary = _segment_last_columns(n_audio, audio_out_ids_start, scored.device) if has_audio else None

    if validate:
        _check("expanded_labels", text_vocab_size, expanded_labels, ignore_index)
        if has_audio:
            _check("label_audio_ids", audio_logits.shape[-1], label_audio_ids, ignore_index)

    path = _alignment_path(alignment, expanded_labels, expanded_input_ids,
                           label_audio_ids if has_audio else None, audio_out_ids, ignore_index, boundary)
    # The codebook count comes from the model's audio head, which has it whether or not this batch holds
    # audio: a text-only batch reports C zeros, so per-codebook sums add up across batches.
    num_cb = (audio_logits.shape[1] if audio_logits is not None and audio_logits.dim() == 3
              else label_audio_ids.shape[0] if label_audio_ids is not None and label_audio_ids.dim() == 2 else 0)
    return _Streams(scored, expanded_labels, text_head, chunk_rows, audio_logits,
                    label_audio_ids if has_audio else None, boundary, num_cb, path, ignore_index)


def compute_dual_loss(
    logits: Optional[torch.Tensor],
    expanded_labels: torch.Tensor,
    audio_logits: Optional[torch.Tensor],
    label_audio_ids: Optional[torch.Tensor],
    *,
    expanded_input_ids: Optional[torch.Tensor] = None,
    audio_out_ids: Optional[torch.Tensor] = None,
    alignment: str = "auto",
    text_weight: float = 1.0,
    audio_weight: float = 1.0,
    ignore_index: int = -100,
    audio_out_ids_start: Optional[torch.Tensor] = None,
    validate: bool = True,
    text_hidden: Optional[torch.Tensor] = None,
    text_head: Optional[Callable] = None,
    text_vocab_size: Optional[int] = None,
    chunk_rows: int = 0,
    accuracy: bool = False,
) -> DualLoss:
    """Text + audio next-token loss.

    logits (B, T, V), expanded_labels (B, T), audio_logits (N, C, K), label_audio_ids (C, N), as
    HiggsAudioModel returns / takes them. ``audio_out_ids_start`` (segment starts in the audio
    concatenation) is optional: without it, segment starts are found in ``audio_out_ids`` (codebook 0
    holds the stream BOS, id K-2, only in a segment's first column) or, failing that, rely on every
    segment's first label column being ignore_index, as the official collator builds it.

    Instead of ``logits`` a caller may pass the final hidden states ``text_hidden`` (B, T, H) and the
    ``text_head`` (hidden -> vocabulary logits, e.g. the model's ``text_lm_head``): the head is then
    applied only to the rows that have a supervised target, ``chunk_rows`` at a time. The loss is the
    same; the (B, T, V) logits are never built.

    Four steps: the inputs checked, the label convention decided (or verified), each stream's summed loss,
    and the sums assembled into means.
    """
    st = _prepare(logits, expanded_labels, audio_logits, label_audio_ids, expanded_input_ids, audio_out_ids,
                  alignment, ignore_index, audio_out_ids_start, validate, text_hidden, text_head, text_vocab_size,
                  chunk_rows)
    text, text_tokens = _text_targets(st)
    device, num_cb = st.scored.device, st.num_cb
    if st.boundary is not None:
        audio_sum, per_cb_sum, per_cb_tokens, per_cb_correct = _audio_sums(_audio_targets(st), num_cb, accuracy)
    else:
        audio_sum = _no_audio(st)
        per_cb_sum = torch.zeros(num_cb, device=device)
        per_cb_tokens = torch.zeros(num_cb, dtype=torch.long, device=device)
        per_cb_correct = torch.zeros(num_cb, dtype=torch.long, device=device)
    return _assemble(text.nll.sum(), text_tokens, audio_sum, per_cb_sum, per_cb_tokens,
                     per_cb_correct if accuracy else None, st.path, text_weight, audio_weight)


def _no_audio(st: _Streams) -> torch.Tensor:
    """0 for a batch without audio targets, still connected to the graph so that every rank's backward
    touches the audio head (DDP needs it)."""
    return st.audio_logits.sum() * 0.0 if st.audio_logits is not None else st.scored.new_zeros(())


def _text_vocab_size(logits, text_hidden, text_head, text_vocab_size) -> int:
    """The text vocabulary: the logits' width, or the head's output size when the head is applied here."""
    if (logits is None) == (text_head is None):
        raise ValueError("pass either logits, or text_hidden with text_head")
    if text_head is None:
        return logits.shape[-1]
    if text_hidden is None:
        raise ValueError("text_head needs text_hidden (the final hidden states)")
    text_vocab_size = text_vocab_size or getattr(text_head, "out_features", None)
    if text_vocab_size is None:
        raise ValueError("text_vocab_size is required when text_head has no out_features")
    return text_vocab_size


def _alignment_path(alignment, expanded_labels, expanded_input_ids, label_audio_ids, audio_out_ids,
                    ignore_index, boundary) -> str:
    """"shifted" or "aligned": decided (auto) or verified (explicit) wherever the inputs are available."""
    text_path = audio_path = None
    if expanded_input_ids is not None:
        text_path = _decide("text", expanded_labels, expanded_input_ids, ignore_index)
    if label_audio_ids is not None and audio_out_ids is not None:
        audio_path = _decide("audio", label_audio_ids, audio_out_ids.to(label_audio_ids.device), ignore_index,
                             boundary)
    evidence = {p for p in (text_path, audio_path) if p is not None}
    if len(evidence) > 1:
        raise AlignmentError(f"text labels look {text_path} but audio labels look {audio_path}")
    found = evidence.pop() if evidence else None
    if alignment == "auto":
        if expanded_input_ids is None and audio_out_ids is None:
            raise AlignmentError("alignment='auto' needs expanded_input_ids and/or audio_out_ids to decide")
        return found or "shifted"
    if alignment == "aligned" and found == "shifted":
        raise AlignmentError(
            "alignment='aligned' but the labels equal the inputs at the same positions: that trains "
            "the model to copy its input (the classic Higgs fine-tuning bug). Use 'shifted' or 'auto'."
        )
    if alignment == "aligned" and found is None:
        raise AlignmentError(
            "alignment='aligned' needs expanded_input_ids and/or audio_out_ids (with supervised "
            "labels) to verify the labels really are pre-shifted; without them use 'shifted'")
    if alignment == "shifted" and found == "aligned":
        raise AlignmentError(
            "alignment='shifted' but the labels are already shifted (label t equals input t+1): "
            "shifting again trains position t to predict t+2. Use 'aligned' or 'auto'."
        )
    return alignment


def _text_labels(labels: torch.Tensor, path: str) -> torch.Tensor:
    """The label each scored text position t is trained on: t+1's (shifted) or its own (aligned)."""
    return labels[:, 1:] if path == "shifted" else labels


def _audio_mask(label_audio_ids: torch.Tensor, boundary: torch.Tensor, path: str,
                ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, supervised), both (C, N'): the label each scored audio position is trained on and whether
    it is a target, i.e. supervised and inside the position's own segment. Every codebook is its own
    target; the stream EOS (K - 1) is an ordinary one: without it the model never learns to stop."""
    keep = ~boundary  # positions whose prediction stays inside their own segment
    if path == "shifted":
        a_labels, keep = label_audio_ids[:, 1:], keep[:-1]
    else:
        a_labels = label_audio_ids
    return a_labels, (a_labels != ignore_index) & keep.unsqueeze(0)


def _text_targets(st: _Streams) -> tuple[_Targets, torch.Tensor]:
    """The text stream's supervised targets (row = batch row) and their count."""
    t_labels = _text_labels(st.labels, st.path)
    t_scored = st.scored[:, :t_labels.shape[1]]
    t_sup = t_labels != st.ignore_index
    rows, targets = t_sup.nonzero()[:, 0], t_labels[t_sup]
    if st.text_head is None:
        nll = _nll(t_scored[t_sup], targets)
    else:
        nll = head_cross_entropy(st.text_head, t_scored[t_sup], targets, st.chunk_rows)
    return _Targets(nll, rows), t_sup.sum()


def _audio_targets(st: _Streams) -> _Targets:
    """The audio stream's supervised targets, codebook-major (row = column of the audio concatenation)."""
    a_labels, a_sup = _audio_mask(st.label_audio_ids, st.boundary, st.path, st.ignore_index)
    a_logits = st.audio_logits[:a_labels.shape[1]]
    codebook, column = a_sup.nonzero(as_tuple=True)
    nll = _nll(a_logits[column, codebook], a_labels[codebook, column])
    return _Targets(nll, column, codebook, a_sup, a_logits, a_labels)


def _audio_sums(audio: _Targets, num_cb: int, accuracy: bool):
    """The audio stream's summed CE, per-codebook sums (detached) and counts, and (accuracy) top-1 hits."""
    per_cb_sum = audio.nll.new_zeros(num_cb).index_add(0, audio.codebook, audio.nll.detach())
    per_cb_correct = None
    if accuracy:  # top-1 hits where a target is supervised, per codebook
        hits = (audio.logits.detach().argmax(-1).transpose(0, 1) == audio.labels) & audio.supervised  # (C, N')
        per_cb_correct = hits.sum(dim=1)
    return audio.nll.sum(), per_cb_sum, audio.supervised.sum(dim=1), per_cb_correct


def _assemble(text_sum, text_tokens, audio_sum, per_cb_sum, per_cb_tokens, per_cb_correct, path,
              text_weight, audio_weight) -> DualLoss:
    """The sums as means (a batch without targets gives 0, not NaN) and their weighted total."""
    audio_tokens = per_cb_tokens.sum()
    text_loss = text_sum / text_tokens.clamp(min=1)
    audio_loss = audio_sum / audio_tokens.clamp(min=1)
    per_cb_sum = per_cb_sum.detach()
    return DualLoss(
        loss=text_weight * text_loss + audio_weight * audio_loss,
        text_loss=text_loss,
        audio_loss=audio_loss,
        text_loss_sum=text_sum,
        audio_loss_sum=audio_sum,
        text_tokens=text_tokens,
        audio_tokens=audio_tokens,
        per_codebook_loss=per_cb_sum / per_cb_tokens.clamp(min=1),
        per_codebook_loss_sum=per_cb_sum,
        per_codebook_tokens=per_cb_tokens,
        path=path,
        per_codebook_correct=per_cb_correct,
        text_weight=text_weight,
        audio_weight=audio_weight,
    )


def count_targets(label_ids: torch.Tensor, label_audio_ids: Optional[torch.Tensor], audio_out_ids_start,
                  ignore_index: int = -100, path: str = "shifted") -> tuple[int, int]:
    """Supervised (text, audio) targets a batch will contribute, computed from the collated batch
    before the forward: the trainer needs the global counts to normalise before the first backward."""
    text = int((_text_labels(label_ids, path) != ignore_index).sum())
    if label_audio_ids is None or label_audio_ids.numel() == 0:
        return text, 0
    boundary = _segment_last_columns(label_audio_ids.shape[-1], audio_out_ids_start, label_audio_ids.device)
    return text, int(_audio_mask(label_audio_ids, boundary, path, ignore_index)[1].sum())


# ---- Per-sample sums: a candidate's sequence log-probability (what DPO compares) ----


@dataclass
class SequenceLogps:
    """Per sample of the batch: sum of log p(target) over its supervised targets, and their count."""
    logps: torch.Tensor  # (B,) float32, text + audio, differentiable
    tokens: torch.Tensor  # (B,) int64: targets in that sum (for the length-normalised variant)
    text_logps: torch.Tensor  # (B,) the text stream's part
    audio_logps: torch.Tensor  # (B,) the audio stream's part (every codebook)
    text_tokens: torch.Tensor  # (B,)
    audio_tokens: torch.Tensor  # (B,)
    path: str


def audio_column_samples(n: int, audio_out_ids_start: Optional[torch.Tensor],
                         audio_out_ids_start_group_loc: Optional[torch.Tensor], batch_size: int,
                         device=None) -> torch.Tensor:
    """(n,) the batch row of every column of the audio-out concatenation (C, n).

    Segment s spans columns starts[s] .. starts[s+1] - 1 and belongs to batch row group_loc[s], one entry
    per audio-out segment (as our collator builds ``audio_out_ids_start_group_loc``)."""
    starts, group = audio_out_ids_start, audio_out_ids_start_group_loc
    if starts is None or group is None:
        raise ValueError("per-sample sums need audio_out_ids_start and audio_out_ids_start_group_loc "
                         "(the batch row of every audio-out segment)")
    device = device if device is not None else starts.device
    starts, group = starts.to(device).long(), group.to(device).long()
    if starts.shape != group.shape:
        raise ValueError(f"{starts.numel()} audio-out segment starts but {group.numel()} group locations: "
                         f"audio_out_ids_start_group_loc needs one batch row per segment")
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if starts.numel() == 0 or int(starts[0]) != 0 or bool((starts[1:] <= starts[:-1]).any()) or int(starts[-1]) >= n:
        raise ValueError(f"audio_out_ids_start must rise from 0 within the {n} audio columns, got {starts.tolist()}")
    if bool(((group < 0) | (group >= batch_size)).any()):
        raise ValueError(f"audio_out_ids_start_group_loc names rows outside the batch of {batch_size}: "
                         f"{group.tolist()}")
    segment = torch.searchsorted(starts, torch.arange(n, device=device), right=True) - 1
    return group[segment]


def sequence_logps(
    logits: Optional[torch.Tensor],
    expanded_labels: torch.Tensor,
    audio_logits: Optional[torch.Tensor],
    label_audio_ids: Optional[torch.Tensor],
    *,
    audio_out_ids_start: Optional[torch.Tensor],
    audio_out_ids_start_group_loc: Optional[torch.Tensor],
    expanded_input_ids: Optional[torch.Tensor] = None,
    audio_out_ids: Optional[torch.Tensor] = None,
    alignment: str = "auto",
    ignore_index: int = -100,
    validate: bool = True,
    text_hidden: Optional[torch.Tensor] = None,
    text_head: Optional[Callable] = None,
    text_vocab_size: Optional[int] = None,
    chunk_rows: int = 0,
) -> SequenceLogps:
    """Each sample's sequence log-probability: the sum of log p(target) over exactly the targets
    ``compute_dual_loss`` trains on (same inputs, same checks, same alignment), per batch row.

    Text targets belong to their row of ``expanded_labels``; audio targets to the sample of their segment
    (``audio_out_ids_start_group_loc``, one batch row per segment of the concatenation). Unweighted:
    a candidate's log-probability counts every target once, whatever the supervised loss weights are.
    ``-logps.sum()`` equals ``text_loss_sum + audio_loss_sum`` of the same batch."""
    st = _prepare(logits, expanded_labels, audio_logits, label_audio_ids, expanded_input_ids, audio_out_ids,
                  alignment, ignore_index, audio_out_ids_start, validate, text_hidden, text_head, text_vocab_size,
                  chunk_rows)
    batch = st.labels.shape[0]
    text, _ = _text_targets(st)
    text_logps, text_tokens = _per_sample(text.nll, text.row, batch)
    if st.boundary is not None:
        audio = _audio_targets(st)
        rows = audio_column_samples(st.label_audio_ids.shape[-1], audio_out_ids_start,
                                    audio_out_ids_start_group_loc, batch, st.scored.device)
        audio_logps, audio_tokens = _per_sample(audio.nll, rows[audio.row], batch)
    else:
        audio_logps = text_logps.new_zeros(batch) + _no_audio(st)
        audio_tokens = torch.zeros(batch, dtype=torch.long, device=st.scored.device)
    return SequenceLogps(text_logps + audio_logps, text_tokens + audio_tokens, text_logps, audio_logps,
                         text_tokens, audio_tokens, st.path)


def _per_sample(nll: torch.Tensor, rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) sums of log p = -nll by batch row, and (B,) counts."""
    return nll.new_zeros(batch).index_add(0, rows, -nll), torch.bincount(rows, minlength=batch)


def count_sample_targets(label_ids: torch.Tensor, label_audio_ids: Optional[torch.Tensor], audio_out_ids_start,
                         audio_out_ids_start_group_loc, ignore_index: int = -100,
                         path: str = "shifted") -> torch.Tensor:
    """(B,) supervised targets per sample, from the collated batch before the forward (``count_targets``
    per sample): e.g. the chosen candidates' token count that normalises a supervised term globally."""
    batch = label_ids.shape[0]
    counts = (_text_labels(label_ids, path) != ignore_index).sum(dim=1)
    if label_audio_ids is None or label_audio_ids.numel() == 0:
        return counts
    n = label_audio_ids.shape[-1]
    boundary = _segment_last_columns(n, audio_out_ids_start, label_audio_ids.device)
    _, sup = _audio_mask(label_audio_ids, boundary, path, ignore_index)
    rows = audio_column_samples(n, audio_out_ids_start, audio_out_ids_start_group_loc, batch,
                                label_audio_ids.device)[:sup.shape[1]]
    return counts.index_add(0, rows, sup.sum(dim=0))
