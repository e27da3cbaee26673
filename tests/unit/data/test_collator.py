"""Our collator builds the batch boson_multimodal's HiggsAudioSampleCollator builds."""

import inspect

import pytest
import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

from higgs_ddp.data.collator import Batch, HiggsCollator
from higgs_ddp.data.prompt import Sample, tokenize_sample

C, CB = 4, 64


def codes(g, frames):
    return torch.randint(0, CB, (C, frames), generator=g)


def make_samples(tokenizer):
    g = torch.Generator().manual_seed(0)
    plain = tokenize_sample(tokenizer, "hello there", codes(g, 9), sample_id="plain")
    cloned = tokenize_sample(tokenizer, "a b c", codes(g, 5), scene="a quiet room", ref_text="ref",
                             ref_codes=codes(g, 7), sample_id="ref")
    # A user turn with audio-in (audio understanding / multi-turn ChatML), to cover audio_in_ids.
    chatml = ChatMLSample(messages=[
        Message("user", ["listen:", AudioContent(audio_url="x")]),
        Message("assistant", AudioContent(audio_url="y")),
    ], start_index=1)
    ids, labels, _, _ = prepare_chatml_sample(chatml, tokenizer)
    audio_in = Sample(torch.tensor(ids), torch.tensor(labels), [codes(g, 6), codes(g, 3)], "audio_in")
    return [plain, cloned, audio_in]


def official(samples, tokenizer, encode_audio_in=True):
    ids = tokenizer.convert_tokens_to_ids
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, audio_in_token_id=ids("<|AUDIO|>"), audio_out_token_id=ids("<|AUDIO_OUT|>"),
        pad_token_id=ids("<|end_of_text|>"), audio_stream_bos_id=CB, audio_stream_eos_id=CB + 1,
        round_to=8, encode_whisper_embed=False, return_audio_in_tokens=encode_audio_in,
        audio_num_codebooks=C, use_delay_pattern=True)
    converted = []
    for s in samples:
        lengths = torch.tensor([0] + [c.shape[1] for c in s.audio_codes[:-1]])
        converted.append(ChatMLDatasetSample(
            input_ids=s.input_ids.clone(), label_ids=s.label_ids.clone(),
            audio_ids_concat=torch.cat(s.audio_codes, 1), audio_ids_start=torch.cumsum(lengths, 0),
            audio_waveforms_concat=torch.zeros(0), audio_waveforms_start=torch.zeros(0, dtype=torch.long),
            audio_sample_rate=torch.zeros(0), audio_speaker_indices=torch.zeros(0, dtype=torch.long)))
    return collator(converted)


def ours(tokenizer, encode_audio_in=True, device="cpu"):
    ids = tokenizer.convert_tokens_to_ids
    return HiggsCollator(ids("<|AUDIO|>"), ids("<|AUDIO_OUT|>"), ids("<|end_of_text|>"), CB, CB + 1, C,
                         use_delay_pattern=True, encode_audio_in_tokens=encode_audio_in, device=device)


FIELDS = ["input_ids", "attention_mask", "audio_out_ids", "audio_out_ids_start", "label_audio_ids",
          "audio_in_ids", "audio_in_ids_start"]


@pytest.mark.parametrize("encode_audio_in", [True, False])
@pytest.mark.parametrize("subset", [[0], [1], [0, 1], [0, 1, 2], [2, 1]])
def test_parity_with_boson_collator(tokenizer, subset, encode_audio_in):
    samples = [make_samples(tokenizer)[i] for i in subset]
    want = official(samples, tokenizer, encode_audio_in)
    got = ours(tokenizer, encode_audio_in)(samples)
    for name in FIELDS:
        w, g = getattr(want, name), getattr(got, name)
        if w is None:
            assert g is None, name
            continue
        assert torch.equal(w.long(), g.long()), name
    assert torch.equal(want.label_ids, got.label_ids)
    # The official collator records one group index per *sample* (the model ignores the field); ours
    # records the sample of every audio-out segment, as the field's documentation describes.
    assert len(got.audio_out_ids_start_group_loc) == len(got.audio_out_ids_start)


def test_reference_audio_is_context_not_target(tokenizer):
    cloned = make_samples(tokenizer)[1]
    batch = ours(tokenizer)([cloned])
    ref_len = cloned.audio_codes[0].shape[1] + 2 + C - 1  # BOS + codes + EOS, delayed
    assert (batch.label_audio_ids[:, :ref_len] == -100).all()
    assert (batch.label_audio_ids[:, ref_len:] != -100).any()
    assert (batch.label_audio_ids == CB + 1).any(), "stream EOS must be a target"


def test_batch_moves_and_counts(tokenizer):
    batch = ours(tokenizer)(make_samples(tokenizer)[:2])
    assert batch.num_samples == 2 and batch.text_targets > 0 and batch.audio_targets > 0
    moved = batch.to("cpu", non_blocking=True)
    assert isinstance(moved, Batch) and moved.text_targets == batch.text_targets
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_model_inputs_are_a_whitelist_the_model_takes():
    accepted = set(inspect.signature(HiggsAudioModel.forward).parameters)
    assert set(Batch.MODEL_INPUTS) <= accepted
    assert "labels" not in Batch.MODEL_INPUTS


@pytest.mark.cuda
def test_tensors_are_created_on_the_device_and_pin(tokenizer):
    batch = ours(tokenizer, device="cuda")(make_samples(tokenizer))
    for name in FIELDS:
        t = getattr(batch, name)
        assert t is None or t.device.type == "cuda", name
    cpu = ours(tokenizer)(make_samples(tokenizer))
    pinned = cpu.pin_memory()
    assert pinned.input_ids.is_pinned()
    assert pinned.to("cuda", non_blocking=True).input_ids.device.type == "cuda"


def test_collator_matches_model_config(tokenizer):
    cfg = HiggsAudioConfig(audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[0], audio_num_codebooks=C,
                           audio_codebook_size=CB, audio_stream_bos_id=CB, audio_stream_eos_id=CB + 1,
                           use_delay_pattern=True, encode_audio_in_tokens=True,
                           audio_in_token_idx=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
                           audio_out_token_idx=tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>"),
                           pad_token_id=tokenizer.convert_tokens_to_ids("<|end_of_text|>"))
    samples = make_samples(tokenizer)
    a = HiggsCollator.for_model(cfg)(samples)
    b = ours(tokenizer)(samples)
    assert torch.equal(a.audio_out_ids, b.audio_out_ids) and torch.equal(a.input_ids, b.input_ids)
