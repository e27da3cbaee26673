"""Random TTS samples of an exact length, for the benchmark: no download, no audio, no manifest.

Each sample is the real training prompt (system, user text, assistant audio) built by our prompt code
with random words and uniformly random audio codes, sized so that the model sees exactly ``seq_len``
positions, ``audio_fraction`` of them audio (speech is ~25 audio frames/s against a few text tokens/s).
"""

from __future__ import annotations

import random

import numpy as np

from higgs_ddp.data.dataset import Data, Record, positions
from higgs_ddp.data.prompt import tokenize_sample

WORDS = "the a voice speaks slowly then quickly about rivers mountains numbers music and weather".split()


def synthetic_records(tokenizer, model_config, num_samples: int, seq_len: int, audio_fraction: float,
                      seed: int = 0) -> list:
    mc = model_config
    C, K = mc.audio_num_codebooks, mc.audio_codebook_size
    ids = (mc.audio_in_token_idx, mc.audio_out_token_idx, C, mc.use_delay_pattern, mc.encode_audio_in_tokens)
    extra = 2 + (C - 1 if mc.use_delay_pattern else 0)  # stream BOS/EOS and the delay pattern
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    records = []
    for i in range(num_samples):
        words, text_positions = [], 0
        target_text = max(1, round(seq_len * (1 - audio_fraction)))
        while True:  # grow the text until the prompt (less the audio) reaches its share
            words.append(rng.choice(WORDS))
            probe = tokenize_sample(tokenizer, " ".join(words), np.zeros((C, 1), dtype=np.int64))
            text_positions = positions(probe, *ids) - 1 - extra  # without the one probe frame
            if text_positions >= target_text:
                break
        frames = seq_len - text_positions - extra
        if frames < 1:
            raise ValueError(f"bench.seq_len={seq_len} leaves no room for audio after {text_positions} text positions")
        codes = gen.integers(0, K, size=(C, frames), dtype=np.int64)
        sample = tokenize_sample(tokenizer, " ".join(words), codes, sample_id=f"synthetic-{i}")
        n = positions(sample, *ids)
        assert n == seq_len, (n, seq_len)
        records.append(Record(where=f"synthetic:{i + 1}", id=sample.sample_id,
                              input_ids=sample.input_ids.numpy().astype(np.int32),
                              label_ids=sample.label_ids.numpy().astype(np.int32),
                              codes=[codes.astype(np.int16)], positions=n, seconds=frames / 25.0))
    return records


def synthetic_data(tokenizer, model_config, num_samples: int, seq_len: int, audio_fraction: float,
                   seed: int = 0) -> Data:
    train = synthetic_records(tokenizer, model_config, num_samples, seq_len, audio_fraction, seed)
    hours = sum(r.seconds for r in train) / 3600
    return Data(train, [], {"train_audio_hours": hours, "synthetic": True})
