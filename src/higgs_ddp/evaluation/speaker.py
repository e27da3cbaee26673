"""Speaker similarity: the cosine between speaker embeddings of a generated clip and of a recording of the
voice it should have (the prompt's reference audio, or a held-out clip of the target speaker).

The embeddings come from a WavLM speaker-verification model through transformers (``WavLMForXVector``,
e.g. ``microsoft/wavlm-base-plus-sv``; ``eval.speaker_model``). Seed-TTS-eval uses a WavLM-large fine-tuned
for verification with an ECAPA-TDNN head (UniSpeech), which transformers does not provide: the numbers
are on a similar scale (same speaker high, different speakers low) but not directly comparable.

``eval.speaker_model: resemblyzer`` uses Resemblyzer's GE2E voice encoder instead (PyPI ``resemblyzer``,
``pip install 'higgs-ddp[voice]'``), whose weights ship inside the wheel: the metric then works on a machine
that has never reached a model hub. It is a different, smaller encoder (256-dim d-vectors, trained on
speaker identification): its values run higher than WavLM's (two clips of one espeak-ng voice ~0.92,
of two voices ~0.70), so compare runs scored by the same encoder only.
"""

from __future__ import annotations

import numpy as np

WAVLM_RATE = 16000
MIN_SAMPLES = WAVLM_RATE // 10  # 100 ms: the shortest clip either encoder embeds
# Why a clip gives no embedding: what the SIM column and ``speaker_sim_unmeasured`` say in place of a number.
# Fixed words (no per-clip numbers; the clip's length is in its record), so a step's reasons can be counted.
TOO_SHORT = f"too short for the speaker encoder (under {MIN_SAMPLES * 1000 // WAVLM_RATE} ms)"
TOO_LITTLE_VOICE = (f"too little voice for the speaker encoder (under {MIN_SAMPLES * 1000 // WAVLM_RATE} ms once "
                    f"silences are cut)")
SILENT = "silent (no voice to embed)"


def cosine(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a).float().reshape(-1), torch.as_tensor(b).float().reshape(-1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


RESEMBLYZER = "resemblyzer"


class SpeakerEncoder:
    """``WavLMForXVector`` and its feature extractor from a folder of weights."""

    def __init__(self, folder: str, device="cpu"):
        import torch
        from higgs_ddp.runtime.lean_imports import trim_transformers

        trim_transformers()
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self.device = torch.device(device)
        self.features = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
        self.model = WavLMForXVector.from_pretrained(folder, local_files_only=True).to(self.device).eval()

    def embed(self, wave: np.ndarray, sample_rate: int):
        """-> the speaker embedding (1-D tensor) of a mono clip; None for a clip too short to embed."""
        return self.embedding(wave, sample_rate)[0]

    def embedding(self, wave: np.ndarray, sample_rate: int) -> tuple:
        """-> (the speaker embedding, "") or (None, why the clip cannot be embedded: what scores report in
        place of a similarity, so a missing number is never left unexplained)."""
        import torch

        from higgs_ddp.evaluation.asr import resample_to

        wave16 = resample_to(wave, sample_rate, WAVLM_RATE)
        if len(wave16) < MIN_SAMPLES:  # the convolutional front end needs a few hundred samples
            return None, TOO_SHORT
        inputs = self.features(wave16, sampling_rate=WAVLM_RATE, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.embeddings[0].float().cpu(), ""

    def similarity(self, wave: np.ndarray, sample_rate: int, reference: np.ndarray, reference_rate: int):
        """Cosine of the two clips' embeddings; None when either is too short to embed."""
        a, b = self.embed(wave, sample_rate), self.embed(reference, reference_rate)
        return None if a is None or b is None else cosine(a, b)


class ResemblyzerEncoder(SpeakerEncoder):
    """Resemblyzer's voice encoder, its weights from the installed package (never downloaded)."""

    def __init__(self, device="cpu"):
        from resemblyzer import VoiceEncoder

        self.encoder = VoiceEncoder(device=str(device), verbose=False)

    def embedding(self, wave: np.ndarray, sample_rate: int) -> tuple:
        import torch
        from resemblyzer import preprocess_wav

        from higgs_ddp.evaluation.asr import resample_to

        if not np.isfinite(wave).all() or not np.abs(wave).max(initial=0.0) > 1e-6:
            return None, SILENT  # silence is nobody (and Resemblyzer's volume normalisation would divide by zero)
        # its own preprocessing at 16 kHz: volume normalised, long silences cut (webrtcvad)
        voiced = preprocess_wav(resample_to(wave, sample_rate, WAVLM_RATE))
        if len(voiced) < MIN_SAMPLES:  # silence, or too little voice to embed
            return None, TOO_LITTLE_VOICE
        return torch.from_numpy(self.encoder.embed_utterance(voiced)), ""
