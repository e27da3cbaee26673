"""A byte-level tokenizer with Higgs Audio's special tokens, built offline.

The demo and the tests need a real `PreTrainedTokenizerFast` that `prepare_chatml_sample` can drive,
without downloading Llama-3's tokenizer: every byte is a token and each special token has an id.

A model's text head may be wider than these 270 tokens (the demo's 272, the benchmark's 128,256). The
tokenizer is then padded with reserved tokens up to the head's width, as Llama-3 pads its 128,000 tokens
with 256 reserved ones: every id the model can sample is a token (the inference engine refuses one that
is not), and nothing the text encodes to changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|recipient|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|audio_out_bos|>", "<|AUDIO|>", "<|AUDIO_OUT|>", "<|scene_desc_start|>", "<|scene_desc_end|>",
]


def build_tiny_tokenizer(save_dir: str | Path | None = None, vocab_size: Optional[int] = None):
    """``vocab_size``: pad to this many tokens with reserved ones (never fewer than the 270 it needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # The special tokens sit in the model's vocabulary at the ids they would get as added tokens (256...),
    # so that the reserved ones can follow them: they are added as special tokens below all the same.
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + SPECIAL_TOKENS
    tokens += [f"<|reserved_special_token_{i}|>" for i in range((vocab_size or 0) - len(tokens))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
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
