"""Training prompts are the prompts boson_multimodal's inference engine builds, token for token."""

from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

from higgs_ddp.data.collator import HiggsCollator
from higgs_ddp.data.prompt import build_chatml, tokenize_sample

C, CB = 4, 64


class FixedCodec:
    """Stands in for the pretrained audio tokenizer (a hub download): returns known codes."""

    sampling_rate = 24000

    def __init__(self, codes):
        self.codes = codes

    def encode(self, wav, sr):
        return self.codes.unsqueeze(0)


def engine_inputs(tokenizer, chatml, ref_codes=None):
    """Run HiggsAudioServeEngine._prepare_inputs, the engine's own prompt builder, without a model."""
    ids = tokenizer.convert_tokens_to_ids
    collator = HiggsAudioSampleCollator(  # configured as the engine configures it
        whisper_processor=None, encode_whisper_embed=False, audio_in_token_id=ids("<|AUDIO|>"),
        audio_out_token_id=ids("<|AUDIO_OUT|>"), audio_stream_bos_id=CB, audio_stream_eos_id=CB + 1,
        pad_token_id=ids("<|end_of_text|>"), return_audio_in_tokens=False, use_delay_pattern=True,
        audio_num_codebooks=C, round_to=1)
    engine = SimpleNamespace(tokenizer=tokenizer, audio_tokenizer=FixedCodec(ref_codes), device="cpu",
                             collator=collator, model=SimpleNamespace(device="cpu"))
    return HiggsAudioServeEngine._prepare_inputs(engine, chatml)


def test_plain_tts_prompt_matches_inference(tokenizer):
    target = torch.randint(0, CB, (C, 8))
    sample = tokenize_sample(tokenizer, "Hello, world.", target, scene="Audio is recorded from a quiet room.")
    prompt = engine_inputs(tokenizer, build_chatml("Hello, world.", "Audio is recorded from a quiet room.",
                                                   with_target=False))["input_ids"][0]
    assert torch.equal(sample.input_ids[:len(prompt)], prompt)
    # What follows the prompt is exactly the audio turn, and only it is supervised.
    rest = tokenizer.decode(sample.input_ids[len(prompt):])
    assert rest == "<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|>"
    assert (sample.label_ids[:len(prompt)] == -100).all()
    assert (sample.label_ids[len(prompt):] != -100).all()


def test_voice_clone_prompt_matches_inference(tokenizer, tmp_path):
    ref = torch.randint(0, CB, (C, 6))
    wav = tmp_path / "ref.wav"
    sf.write(wav, np.zeros(2400, dtype=np.float32), 24000)
    chatml = build_chatml("Say this.", None, "reference words", with_reference=True, with_target=False)
    chatml.messages[2].content.audio_url = str(wav)  # the engine loads the reference from disk
    want = engine_inputs(tokenizer, chatml, ref_codes=ref)

    sample = tokenize_sample(tokenizer, "Say this.", torch.randint(0, CB, (C, 5)), ref_text="reference words",
                             ref_codes=ref)
    n = want["input_ids"].shape[1]
    assert torch.equal(sample.input_ids[:n], want["input_ids"][0])
    batch = HiggsCollator(tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
                          tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>"),
                          tokenizer.convert_tokens_to_ids("<|end_of_text|>"), CB, CB + 1, C)([sample])
    ref_cols = want["audio_out_ids"].shape[1]
    # The reference reaches the model as the same codes, in the same place, as at inference.
    assert torch.equal(batch.audio_out_ids[:, :ref_cols], want["audio_out_ids"])
    assert (batch.label_audio_ids[:, :ref_cols] == -100).all(), "the reference must never be a target"
    assert (sample.label_ids[:n] == -100).all()


def test_prompts_tokenized_in_a_batch_are_boson_s_own(tokenizer):
    """prompt_batch builds, in one tokenizer call, what prepare_chatml_sample builds one by one: every turn
    kind, supervised or not, repeated texts."""
    from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent

    from higgs_ddp.data.prompt import chatml_ids
    from higgs_ddp.data.prompt_batch import chatml_ids_batch, walk

    multi = ChatMLSample(messages=[
        Message("system", "Be brief."), Message("user", ["Say", TextContent("it"), AudioContent("a.npy")]),
        Message("assistant", "Sure.", recipient="tool"), Message("assistant", AudioContent("b.npy")),
        Message("user", "Again, with é and 語."), Message("assistant", [AudioContent("c.npy"), "done"])],
        start_index=3)
    samples = [build_chatml("Hello there."), build_chatml("Hi.", scene="A quiet room", ref_text="Ref words.",
                                                          with_reference=True), multi,
               build_chatml("Hello there."), ChatMLSample(messages=multi.messages)]  # every turn supervised
    assert all(walk(s) is not None for s in samples)  # built by the batch, not boson's function one by one
    got = chatml_ids_batch(tokenizer, [(s, f"s{i}") for i, s in enumerate(samples)])
    for i, (sample, mine) in enumerate(zip(samples, got)):
        assert mine == chatml_ids(tokenizer, sample, f"s{i}"), i
