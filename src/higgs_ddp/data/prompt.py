"""Training prompts built exactly as boson_multimodal builds them for inference.

The official voice-clone / TTS prompt is a ChatML conversation: a system message ("Generate audio
following instruction." plus an optional scene description), optionally a reference turn (user: the
reference transcript, assistant: the reference audio), then user: the text to speak, assistant: the
audio. Training runs the same conversation through boson_multimodal's own `prepare_chatml_sample`;
only the final assistant turn is supervised (``start_index``), so the reference stays context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

SYSTEM_PROMPT = "Generate audio following instruction."


def system_message(scene: Optional[str]) -> str:
    if not scene:
        return SYSTEM_PROMPT
    return f"{SYSTEM_PROMPT}\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"


def build_chatml(text: str, scene: Optional[str] = None, ref_text: Optional[str] = None,
                 with_reference: bool = False, with_target: bool = True) -> ChatMLSample:
    """The conversation for one TTS sample; without the target it is the inference prompt."""
    messages = [Message(role="system", content=system_message(scene))]
    if with_reference:
        messages += [
            Message(role="user", content=ref_text or ""),
            Message(role="assistant", content=AudioContent(audio_url="reference")),
        ]
    messages.append(Message(role="user", content=text))
    if with_target:
        messages.append(Message(role="assistant", content=AudioContent(audio_url="target")))
    return ChatMLSample(messages=messages, start_index=len(messages) - 1)


@dataclass
class Sample:
    """One tokenised training sample, in the form our collator (and the official one) consumes."""

    input_ids: torch.Tensor  # (L,) int64
    label_ids: torch.Tensor  # (L,) int64, -100 where not supervised
    audio_codes: list = field(default_factory=list)  # (C, T) int64 per <|AUDIO|>/<|AUDIO_OUT|>, in order
    sample_id: str = ""
    # False: the last audio-out segment was cut (a candidate that hit the generation limit), so it is not
    # taught to end there: no stream EOS target, no text target after it (the collator leaves them out).
    stopped: bool = True


def chatml_ids(tokenizer, chatml: ChatMLSample, sample_id: str = "") -> tuple[list, list, int]:
    """-> (input ids, label ids, number of audio contents): the prompt's tokens, as boson_multimodal
    builds them; each audio content is one <|AUDIO|> / <|AUDIO_OUT|> token."""
    input_tokens, label_tokens, audio_contents, _ = prepare_chatml_sample(chatml, tokenizer)
    if input_tokens is None:  # prepare_chatml_sample prints and returns None on failure
        raise ValueError(f"sample {sample_id}: boson_multimodal could not build the ChatML prompt")
    return input_tokens, label_tokens, len(audio_contents)


def tokenize_chatml(tokenizer, chatml: ChatMLSample, codes: list, sample_id: str = "") -> Sample:
    """Any ChatML conversation; ``codes`` holds one (C, T) array per audio content, in order."""
    input_tokens, label_tokens, n_audio = chatml_ids(tokenizer, chatml, sample_id)
    check_audio_count(n_audio, len(codes), sample_id)
    return Sample(
        input_ids=torch.tensor(input_tokens, dtype=torch.long),
        label_ids=torch.tensor(label_tokens, dtype=torch.long),
        audio_codes=[torch.as_tensor(c).long() for c in codes],
        sample_id=sample_id,
    )


def check_audio_count(n_audio: int, n_codes: int, sample_id: str) -> None:
    if n_codes != n_audio:
        raise ValueError(f"sample {sample_id}: {n_audio} audio contents, {n_codes} code arrays")


def tokenize_sample(tokenizer, text: str, target_codes: torch.Tensor, scene: Optional[str] = None,
                    ref_text: Optional[str] = None, ref_codes: Optional[torch.Tensor] = None,
                    sample_id: str = "") -> Sample:
    chatml = build_chatml(text, scene, ref_text, with_reference=ref_codes is not None)
    codes = ([ref_codes] if ref_codes is not None else []) + [target_codes]
    return tokenize_chatml(tokenizer, chatml, codes, sample_id)
