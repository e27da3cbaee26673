"""Many prompts' tokens at once, exactly as boson_multimodal's ``prepare_chatml_sample`` makes them one by one.

``prepare_chatml_sample`` calls ``tokenizer.encode`` about nine times per conversation (headers, the text,
the audio placeholders, the end-of-turn tokens): at 100k clips that per-call overhead was three quarters
of a cold prepare's CPU time (issue 31). Here each conversation is first walked as that function walks
it, into its pieces of text and whether each is supervised; every distinct piece of the whole batch is
then encoded once, in one call of the fast tokenizer on the list (a batch of one is what ``encode`` runs),
and the conversations are put together from them. The same tokens by construction, piece for piece;
``chatml_ids_batch`` also checks the first conversation of every batch against boson's own function and
uses that function for the batch if they ever differ (another boson version), and for any conversation
the walk does not cover (anything not a plain ChatMLSample, a recipient outside an assistant turn).
"""

from __future__ import annotations

from typing import Optional

from boson_multimodal.data_types import AudioContent, ChatMLSample, TextContent

from higgs_ddp.data.prompt import chatml_ids

MASK, COPY = False, True  # a piece's labels: -100 each, or its own tokens
AUDIO_IN = "<|audio_bos|><|AUDIO|><|audio_eos|>"
AUDIO_OUT = "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"


def walk(sample) -> Optional[tuple]:
    """-> ([(text, labelled)], audio contents) as prepare_chatml_sample encodes ``sample``, or None where
    this walk does not follow that function (it is then asked itself)."""
    if type(sample) is not ChatMLSample:
        return None
    out, n_audio = [], 0
    messages, start = sample.messages, sample.start_index
    for turn, message in enumerate(messages):
        role, recipient, content = message.role, message.recipient, message.content
        if isinstance(content, str):
            contents = [TextContent(text=content)]
        elif isinstance(content, list):
            contents = [TextContent(text=c) if isinstance(c, str) else c for c in content]
        else:
            contents = [content] if isinstance(content, (TextContent, AudioContent)) else []
        supervised = role == "assistant" and (start is None or turn >= start)
        head = "<|begin_of_text|>" if turn == 0 else ""
        out.append((f"{head}<|start_header_id|>{role}<|end_header_id|>\n\n", MASK))
        if recipient:
            if role != "assistant":  # boson asserts (and returns nothing): its own error message
                return None
            out.append((f"{recipient}<|recipient|>", COPY))
        for c in contents:
            kind = getattr(c, "type", None)
            if kind == "text":
                if not isinstance(c.text, str):
                    return None
                out.append((c.text, supervised))
            elif kind == "audio":
                n_audio += 1
                if role in ("user", "system"):
                    out.append((AUDIO_IN, MASK))
                elif role == "assistant":
                    out.append((AUDIO_OUT, supervised))
            elif kind is None:
                return None
        nxt = turn + 1
        eom = role == "assistant" and nxt != len(messages) and messages[nxt].role == "assistant"
        out.append(("<|eom_id|>" if eom else "<|eot_id|>", supervised))
    return out, n_audio


def chatml_ids_batch(tokenizer, samples: list) -> list:
    """``samples``: (chatml, sample id). -> per sample (input ids, label ids, audio contents) as lists of int,
    as ``chatml_ids`` returns them, or the ValueError it raises."""
    walks = [walk(chatml) for chatml, _ in samples]
    texts = list(dict.fromkeys(text for w in walks if w is not None for text, _ in w[0]))
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    out, checked = [], False
    for (chatml, sample_id), w in zip(samples, walks):
        if w is None:
            out.append(_one(tokenizer, chatml, sample_id))
            continue
        ids, labels = [], []
        for text, labelled in w[0]:
            tokens = encoded[text]
            ids += tokens
            labels += tokens if labelled else [-100] * len(tokens)
        out.append((ids, labels, w[1]))
        if not checked:
            if out[-1] != _one(tokenizer, chatml, sample_id):  # boson builds prompts otherwise now
                return [_one(tokenizer, c, s) for c, s in samples]
            checked = True
    return out


def _one(tokenizer, chatml, sample_id: str):
    try:
        return chatml_ids(tokenizer, chatml, sample_id)
    except ValueError as e:
        return e
