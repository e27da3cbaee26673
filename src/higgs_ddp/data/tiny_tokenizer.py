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


# Llama-3's layout: 128,000 ordinary tokens, then 256 special ones from id 128,000. Higgs Audio v2 puts its
# audio tokens among them; the five ids its config names (HiggsAudioConfig's defaults) are exact here, the
# other Higgs tokens sit on reserved ids that are free in Llama-3.2's list.
LLAMA3_FIRST_SPECIAL = 128000
LLAMA3_SPECIAL_IDS = {
    "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
    "<|audio_bos|>": 128011, "<|audio_eos|>": 128012, "<|audio_out_bos|>": 128013, "<|recipient|>": 128014,
    "<|AUDIO|>": 128015, "<|AUDIO_OUT|>": 128016, "<|scene_desc_start|>": 128017, "<|scene_desc_end|>": 128018,
}
LLAMA3_VOCAB = 128256


def build_tiny_tokenizer(save_dir: str | Path | None = None, vocab_size: Optional[int] = None,
                         layout: str = "compact"):
    """``vocab_size``: pad to this many tokens with reserved ones (never fewer than the 270 it needs).

    ``layout="llama3"``: the same byte-level tokenizer with the special tokens at Llama-3's ids (128,000 and
    up, 128,256 tokens in all), as the real Higgs Audio v2 tokenizer has them: what a downloaded model's
    config and ids look like, without downloading it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if layout == "llama3":
        assert set(LLAMA3_SPECIAL_IDS) == set(SPECIAL_TOKENS)
        # Ordinary tokens the byte-level text never produces fill the ids up to the special block.
        tokens = alphabet + [f"<|unused_{i}|>" for i in range(LLAMA3_FIRST_SPECIAL - len(alphabet))]
        by_id = {i: t for t, i in LLAMA3_SPECIAL_IDS.items()}
        reserved = iter(range(LLAMA3_VOCAB))
        tokens += [by_id.get(i) or f"<|reserved_special_token_{next(reserved)}|>"
                   for i in range(LLAMA3_FIRST_SPECIAL, LLAMA3_VOCAB)]
    elif layout == "compact":
        # The special tokens sit in the model's vocabulary at the ids they would get as added tokens (256...),
        # so that the reserved ones can follow them: they are added as special tokens below all the same.
        tokens = alphabet + SPECIAL_TOKENS
        tokens += [f"<|reserved_special_token_{i}|>" for i in range((vocab_size or 0) - len(tokens))]
    else:
        raise ValueError(f"unknown tokenizer layout {layout!r}")
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
