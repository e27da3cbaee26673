"""Tiny random evaluation models built from configs, saved as the folders eval.asr_model and
eval.speaker_model name: transformers' real Whisper and WavLM classes, at toy sizes (their output is
gibberish; the plumbing is real)."""

import json
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
           "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def tiny_whisper(folder: Path) -> Path:
    """WhisperForConditionalGeneration (1 encoder and 1 decoder layer, 16 wide) with a byte-level tokenizer
    (256 bytes + Whisper's special tokens), its feature extractor and a multilingual generation config."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    ids = {tok: len(vocab) + k for k, tok in enumerate(SPECIAL)}
    vocab.update(ids)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                 additional_special_tokens=SPECIAL[1:])
    features = WhisperFeatureExtractor(feature_size=80)
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=24, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], max_length=24, begin_suppress_tokens=[eot],
        suppress_tokens=[ids["<|startoflm|>"], ids["<|startofprev|>"], ids["<|nocaptions|>"]])
    model.save_pretrained(str(folder))
    WhisperProcessor(features, tokenizer).save_pretrained(str(folder))
    return folder


def tiny_wavlm(folder: Path, seed: int = 0) -> Path:
    """WavLMForXVector (2 layers, 32 wide, a 16-dim x-vector) and its feature extractor."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    folder = Path(folder)
    config = WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=64,
        tdnn_dim=(32, 32, 64), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1), xvector_output_dim=16)
    torch.manual_seed(seed)
    WavLMForXVector(config).save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(folder))
    return folder
