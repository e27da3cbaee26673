"""A byte-level tokenizer with Higgs Audio's special tokens, built offline.

The demo and the tests need a real `PreTrainedTokenizerFast` that `prepare_chatml_sample` can drive,
without downloading Llama-3's tokenizer: every byte is a token and each special token has an id.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|recipient|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|audio_out_bos|>", "<|AUDIO|>", "<|AUDIO_OUT|>", "<|scene_desc_start|>", "<|scene_desc_end|>",
]


def build_tiny_tokenizer(save_dir: str | Path | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|begin_of_text|>", "<|end_of_text|>")],
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
