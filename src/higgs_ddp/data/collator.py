"""Our collator: the batch boson_multimodal's HiggsAudioSampleCollator builds (codebook-delay pattern,
stream BOS/EOS, right padding to a multiple of 8), built directly on the requested device, plus the
target counts the trainer needs before the forward.

``tests/unit/data/test_collator.py`` checks field-for-field parity with the official collator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from higgs_ddp.data.prompt import Sample
from higgs_ddp.dual_loss import count_targets

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    label_ids: torch.Tensor  # (B, L)
    audio_in_ids: Optional[torch.Tensor]  # (C, N_in) or None when the model doesn't embed audio-in codes
    audio_in_ids_start: Optional[torch.Tensor]  # (num_audio_in,)
    audio_out_ids: torch.Tensor  # (C, N_out)
    audio_out_ids_start: torch.Tensor  # (num_audio_out,)
    audio_out_ids_start_group_loc: torch.Tensor  # (num_audio_out,) sample index of each segment
    label_audio_ids: torch.Tensor  # (C, N_out)
    text_targets: int = 0  # supervised next-token targets, known before the forward
    audio_targets: int = 0
    num_positions: int = 0  # sequence positions after audio expansion (text + audio), for tokens/s
    padded_positions: int = 0  # batch size x the longest sample's positions: what the model computes
    num_samples: int = 0

    # Exactly what HiggsAudioModel.forward receives; `label_ids` only so that it returns
    # `expanded_labels` aligned with the expanded sequence. The loss is computed outside the model.
    MODEL_INPUTS = ("input_ids", "attention_mask", "audio_in_ids", "audio_in_ids_start", "audio_out_ids",
                    "audio_out_ids_start", "label_ids")

    def model_inputs(self) -> dict:
        return {k: getattr(self, k) for k in self.MODEL_INPUTS}

    def _map(self, fn) -> "Batch":
        return dataclasses.replace(self, **{
            f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        })

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def delay_pattern(codes: torch.Tensor, bos: int, pad: int) -> torch.Tensor:
    """(C, T) -> (C, T + C - 1): codebook k starts k steps late, BOS before it and `pad` after."""
    c, t = codes.shape
    out = torch.full((c, t + c - 1), pad, dtype=codes.dtype, device=codes.device)
    for k in range(c):
        out[k, :k] = bos
        out[k, k:k + t] = codes[k]
    return out


class HiggsCollator:
    def __init__(self, audio_in_token_id: int, audio_out_token_id: int, pad_token_id: int,
                 audio_stream_bos_id: int, audio_stream_eos_id: int, num_codebooks: int,
                 use_delay_pattern: bool = True, encode_audio_in_tokens: bool = True, round_to: int = 8,
                 device: torch.device | str = "cpu"):
        self.audio_in, self.audio_out, self.pad = audio_in_token_id, audio_out_token_id, pad_token_id
        self.bos, self.eos, self.num_codebooks = audio_stream_bos_id, audio_stream_eos_id, num_codebooks
        self.use_delay, self.encode_audio_in = use_delay_pattern, encode_audio_in_tokens
        self.round_to, self.device = round_to, torch.device(device)

    @classmethod
    def for_model(cls, config, device="cpu") -> "HiggsCollator":
        return cls(config.audio_in_token_idx, config.audio_out_token_idx, config.pad_token_id,
                   config.audio_stream_bos_id, config.audio_stream_eos_id, config.audio_num_codebooks,
                   config.use_delay_pattern, config.encode_audio_in_tokens, device=device)

    def _stream(self, codes: torch.Tensor, first: int, last: int, delay_bos: int, delay_pad: int) -> torch.Tensor:
        c = codes.shape[0]
        col = lambda v: torch.full((c, 1), v, dtype=torch.long, device=self.device)  # noqa: E731
        seq = torch.cat([col(first), codes, col(last)], dim=1)
        return delay_pattern(seq, delay_bos, delay_pad) if self.use_delay else seq

    def __call__(self, samples: list[Sample]) -> Batch:
        dev, C = self.device, self.num_codebooks
        longest = max(len(s.input_ids) for s in samples)
        length = (longest + self.round_to - 1) // self.round_to * self.round_to
        B = len(samples)
        input_ids = torch.full((B, length), self.pad, dtype=torch.long, device=dev)
        label_ids = torch.full((B, length), IGNORE, dtype=torch.long, device=dev)
        attention_mask = torch.zeros((B, length), dtype=torch.long, device=dev)
        ins, outs, out_labels, out_group, sample_positions = [], [], [], [], []
        for i, s in enumerate(samples):
            ids, labels = s.input_ids.to(dev), s.label_ids.to(dev).clone()
            n = len(ids)
            audio_slots = ids[(ids == self.audio_in) | (ids == self.audio_out)].tolist()
            if len(audio_slots) != len(s.audio_codes):
                raise ValueError(f"sample {s.sample_id}: {len(audio_slots)} audio placeholders, "
                                 f"{len(s.audio_codes)} code arrays")
            out_mask = ids == self.audio_out
            train_flags = (labels[out_mask] >= 0).tolist()  # read before the placeholder labels are masked
            labels[out_mask] = IGNORE
            last_out = len(train_flags) - 1
            if not s.stopped and last_out >= 0:
                # A cut segment: what follows it (<|audio_eos|>, <|eot_id|>) says the audio ended there; it did not
                labels[int(out_mask.nonzero()[-1]) + 1:] = IGNORE
            out_k, pos = 0, n - len(audio_slots)
            for slot, codes in zip(audio_slots, s.audio_codes):
                codes = codes[:C].to(dev, dtype=torch.long)
                if slot == self.audio_in:
                    if self.encode_audio_in:
                        ins.append(self._stream(codes, self.bos, self.eos, self.bos, self.eos))
                        pos += ins[-1].shape[1]
                    continue
                outs.append(self._stream(codes, self.bos, self.eos, self.bos, self.eos))
                pos += outs[-1].shape[1]
                # the stream EOS is a target only where the audio ended by itself
                end = IGNORE if not s.stopped and out_k == last_out else self.eos
                lab = self._stream(codes, IGNORE, end, IGNORE, IGNORE)
                if not train_flags[out_k]:
                    lab = torch.full_like(lab, IGNORE)  # context audio (e.g. a voice reference)
                out_labels.append(lab)
                out_group.append(i)
                out_k += 1
            input_ids[i, :n], label_ids[i, :n], attention_mask[i, :n] = ids, labels, 1
            sample_positions.append(pos)

        def concat(segments):
            if not segments:
                return (torch.zeros((0, 0), dtype=torch.long, device=dev),
                        torch.zeros(0, dtype=torch.long, device=dev))
            lengths = torch.tensor([0] + [seg.shape[1] for seg in segments[:-1]], device=dev)
            return torch.cat(segments, dim=1), torch.cumsum(lengths, 0)

        audio_out_ids, audio_out_start = concat(outs)
        label_audio_ids, _ = concat(out_labels)
        audio_in_ids, audio_in_start = concat(ins) if self.encode_audio_in else (None, None)
        text_targets, audio_targets = count_targets(label_ids, label_audio_ids, audio_out_start)
        return Batch(
            input_ids=input_ids, attention_mask=attention_mask, label_ids=label_ids,
            audio_in_ids=audio_in_ids, audio_in_ids_start=audio_in_start,
            audio_out_ids=audio_out_ids, audio_out_ids_start=audio_out_start,
            audio_out_ids_start_group_loc=torch.tensor(out_group, dtype=torch.long, device=dev),
            label_audio_ids=label_audio_ids, text_targets=text_targets, audio_targets=audio_targets,
            num_positions=sum(sample_positions), padded_positions=B * max(sample_positions), num_samples=B,
        )
