"""Intelligibility: the generated audio transcribed by Whisper (transformers' classes) and scored against the
prompt text with Seed-TTS-eval's normalisation and jiwer.

Seed-TTS-eval (BytedanceSpeech/seed-tts-eval, ``run_wer.py``), which F5-TTS's eval and most TTS papers
follow, normalises both strings the same way before scoring:

* every punctuation mark of ``string.punctuation`` and of ``zhon.hanzi.punctuation`` (CJK marks) is
  removed, except the apostrophe (``don't`` stays one word); a double space becomes one;
* English is lower-cased; Chinese is scored per character (the characters joined by spaces, so the "WER"
  it reports for zh is a character error rate), and the Chinese transcript is first converted to
  simplified characters (``zhconv``).

It does not apply Whisper's English text normaliser (numbers and spellings are not rewritten), so neither
do we: the numbers stay comparable with published Seed-TTS-eval figures. Seed-TTS-eval transcribes
Chinese with Paraformer; here Whisper transcribes every language (``eval.asr_model``), so zh figures are
not strictly comparable. The error rate of a set of samples is the mean of the per-sample rates, as there.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Scored per character (no spaces between words): Seed-TTS-eval's zh, and the other languages written so.
CHARACTER_LANGUAGES = {"zh", "ja", "yue", "th", "lo", "km", "my", "bo"}
WHISPER_RATE = 16000


def _punctuation() -> str:
    from zhon.hanzi import punctuation
    return "".join(ch for ch in punctuation + string.punctuation if ch != "'")


def normalize(text: str, language: str) -> str:
    """Seed-TTS-eval's normalisation of a reference or a transcript (see the module docstring)."""
    if language == "zh":
        import zhconv
        text = zhconv.convert(text, "zh-cn")
    text = text.translate({ord(ch): None for ch in _punctuation()})
    text = text.replace("  ", " ")
    if language in CHARACTER_LANGUAGES:
        return " ".join(ch for ch in text if not ch.isspace())
    return text.lower()


@dataclass
class ErrorRate:
    rate: float  # (substitutions + deletions + insertions) / reference words (characters for zh, ja, ...)
    unit: str  # "word" or "character"
    reference: str  # normalised
    hypothesis: str  # normalised


def error_rate(reference: str, hypothesis: str, language: str) -> ErrorRate:
    """WER of ``hypothesis`` against ``reference`` (CER for languages written without spaces), both normalised.
    A reference with nothing left to say after normalisation is a ValueError."""
    import jiwer

    ref, hyp = normalize(reference, language), normalize(hypothesis, language)
    if not ref.split():
        raise ValueError(f"nothing to score in the reference text {reference!r} once punctuation is removed")
    unit = "character" if language in CHARACTER_LANGUAGES else "word"
    return ErrorRate(jiwer.wer(ref, " ".join(hyp.split())), unit, ref, hyp)


def character_error_rate(reference: str, hypothesis: str, language: str) -> float:
    """CER over the normalised strings, spaces left out (for every language: it moves before WER does)."""
    import jiwer

    ref = "".join(normalize(reference, language).split())
    hyp = "".join(normalize(hypothesis, language).split())
    if not ref:
        raise ValueError(f"nothing to score in the reference text {reference!r} once punctuation is removed")
    return float(jiwer.cer(ref, hyp))


def resample_to(wave: np.ndarray, sample_rate: int, target: int) -> np.ndarray:
    import torch

    from higgs_ddp.data.audio import resample
    out = resample(torch.as_tensor(np.asarray(wave, dtype=np.float32).reshape(-1)), sample_rate, target)
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


class Transcriber:
    """Whisper (``WhisperForConditionalGeneration`` + ``WhisperProcessor``) from a folder of weights; greedy,
    as Seed-TTS-eval decodes (``generate`` with the language and task forced)."""

    def __init__(self, folder: str, device="cpu"):
        import torch
        from higgs_ddp.runtime.lean_imports import trim_transformers

        trim_transformers()
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.device = torch.device(device)
        self.processor = WhisperProcessor.from_pretrained(folder, local_files_only=True)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = WhisperForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                     torch_dtype=dtype).to(self.device).eval()

    def transcribe(self, wave: np.ndarray, sample_rate: int, language: Optional[str]) -> str:
        import torch

        if not len(np.asarray(wave).reshape(-1)):
            return ""  # nothing was said (Whisper would still hallucinate something)
        wave16 = resample_to(wave, sample_rate, WHISPER_RATE)
        inputs = self.processor.feature_extractor(wave16, sampling_rate=WHISPER_RATE, return_tensors="pt",
                                                  return_attention_mask=True)
        features = inputs.input_features.to(self.device, self.model.dtype)
        limit = self.model.config.max_target_positions - 4  # the prompt: start, language, task, no timestamps
        with torch.inference_mode():
            ids = self.model.generate(features, attention_mask=inputs.attention_mask.to(self.device),
                                      language=language, task="transcribe", do_sample=False, num_beams=1,
                                      max_new_tokens=limit)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
