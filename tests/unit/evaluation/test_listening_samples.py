"""Listening samples: the tiny model speaks eval.prompts through the inference path, stopping at EOS.

Listening samples: the tiny model (LoRA-injected, as the trainer holds it) speaks eval.prompts through
boson_multimodal's generation path, decoded by the tiny codec, on CPU."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import steer, tiny_config

from higgs_ddp.data.codec import load_codec
from higgs_ddp.evaluation.generation import generate_codes
from higgs_ddp.evaluation.listening import check_prompts, write_samples
from higgs_ddp.model import apply_training_mode, build_model, load_tokenizer, unwrap

MAX_SECONDS = 0.2  # 5 frames at 25 frames/s: the tiny codec decodes slowly on CPU


@pytest.fixture(scope="module")
def codec():
    return load_codec("tiny")


def setup(tmp_path, *overrides, with_reference=True):
    cfg = tiny_config(tmp_path, f"eval.max_audio_seconds={MAX_SECONDS}", *overrides, samples=1, audio=True)
    ref = tmp_path / "data" / "clips" / "0000_ref.wav"  # write_demo_corpus gives sample 0 a reference clip
    assert ref.is_file()
    cfg.eval.prompts = [{"text": "hello there"}]
    if with_reference:
        cfg.eval.prompts.append({"text": "say this", "reference_audio": str(ref), "reference_text": "the fox"})
    tok = load_tokenizer(cfg)
    model = apply_training_mode(build_model(cfg, tok), cfg)  # LoRA: the adapter layers are inside the raw model
    model.train()
    return cfg, tok, model, unwrap(model)


def test_samples_are_written_and_a_model_that_never_stops_is_reported(tmp_path, codec):
    cfg, tok, _, raw = setup(tmp_path)
    eos = raw.config.audio_stream_eos_id
    handle = steer(raw, lambda step: {eos: -1e4})  # the stream EOS never wins
    try:
        results = write_samples(raw, tok, codec, cfg, 10, tmp_path / "samples")
    finally:
        handle.remove()
    folder = tmp_path / "samples" / "step_000010"
    frames = round(MAX_SECONDS * codec.frame_rate)
    # The reference clip reached the model: its codes (plus stream BOS/EOS and the delay) in the prompt.
    wave, sr = sf.read(cfg.eval.prompts[1]["reference_audio"], dtype="float32")
    C = raw.config.audio_num_codebooks
    assert handle.calls.prompt_rows == [0, codec.encode(torch.from_numpy(wave)).shape[1] + 2 + C - 1]
    assert [r.path for r in results] == [folder / "sample_00.wav", folder / "sample_01.wav"]
    hop = codec.sample_rate / codec.frame_rate
    for r in results:
        wave, sr = sf.read(str(r.path), dtype="float32")
        assert sr == codec.sample_rate and sf.info(str(r.path)).subtype == "PCM_16"
        # Exactly the frame budget, with or without a reference in the prompt (whose audio positions
        # must not eat into the generation budget).
        assert r.hit_limit and r.frames == frames and r.invalid_codes == 0 and r.clipped == 0
        assert len(wave) == frames * hop and r.seconds == pytest.approx(len(wave) / sr)
        assert np.isfinite(wave).all() and np.abs(wave).max() > 0
    listing = json.loads((folder / "samples.json").read_text())
    assert listing["sample_rate"] == codec.sample_rate and listing["step"] == 10
    assert [(s["text"], s["path"], s["frames"], s["hit_limit"]) for s in listing["samples"]] == [
        ("hello there", "sample_00.wav", frames, True), ("say this", "sample_01.wav", frames, True)]
    assert listing["samples"][1]["reference_audio"] == cfg.eval.prompts[1]["reference_audio"]


def test_generation_leaves_training_untouched_and_is_reproducible(tmp_path, codec):
    cfg, tok, model, raw = setup(tmp_path, with_reference=False)
    raw.audio_decoder_proj.eval()  # a submodule that was in eval mode stays so
    attrs = set(vars(raw))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = write_samples(raw, tok, codec, cfg, 1, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state), "generation moved the training RNG stream"
    assert raw.training and model.training and not raw.audio_decoder_proj.training
    assert raw.layers[0].training
    assert set(vars(raw)) == attrs, "generation left state (a KV cache bucket?) on the model"
    assert all(p.grad is None for p in model.parameters())
    torch.rand(3)  # the training stream moves on between two sample steps
    second = write_samples(raw, tok, codec, cfg, 2, tmp_path / "b")
    assert first[0].path.read_bytes() == second[0].path.read_bytes(), "the same seed must give the same sample"
    cfg.eval.seed = 1
    other = write_samples(raw, tok, codec, cfg, 3, tmp_path / "c")
    assert other[0].path.read_bytes() != first[0].path.read_bytes()


def test_generation_uses_the_lora_adapter(tmp_path):
    cfg, tok, model, raw = setup(tmp_path, "eval.temperature=0.0", with_reference=False)
    fake_codec = SimpleNamespace(frame_rate=25.0)
    raw.eval()
    with torch.inference_mode():
        before = generate_codes(raw, tok, fake_codec, cfg, "hello there").columns
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # zero at init: the adapter starts as the identity
                    p.copy_(torch.randn_like(p))
        after = generate_codes(raw, tok, fake_codec, cfg, "hello there").columns
    assert not (before.shape == after.shape and torch.equal(before, after))


def test_generation_stops_at_the_stream_eos(tmp_path, codec):
    cfg, tok, _, raw = setup(tmp_path, with_reference=False)
    mc = raw.config
    C, limit = mc.audio_num_codebooks, round(MAX_SECONDS * codec.frame_rate)
    eos, bos = mc.audio_stream_eos_id, mc.audio_stream_bos_id

    def ending(k, together=False):
        """After k frames the EOS wins: codebook c at frame column k+1+c (the delay pattern's place for
        frame k+1), or in every codebook at column k+1 (``together``)."""
        def bonus(step):
            return {bos: -1e4, eos: [1e4 if step > k + (0 if together else c) else -1e4 for c in range(C)]}
        return bonus

    # k = limit ends exactly at the limit: the budget leaves room for the EOS and the delay columns.
    # Ending together, codebook c's frames 1..k-c are real: k-(C-1) frames are complete, the EOS frame
    # is the first holding an EOS (boson's engine keeps the same: [:, 1:-1]).
    for bonus, frames in ((ending(2), 2), (ending(limit), limit), (ending(C + 1, together=True), 2)):
        handle = steer(raw, bonus)
        try:
            [r] = write_samples(raw, tok, codec, cfg, 1, tmp_path / "samples")
        finally:
            handle.remove()
        assert (r.hit_limit, r.frames, r.invalid_codes) == (False, frames, 0)
        assert r.seconds == pytest.approx(frames / codec.frame_rate)
        assert len(sf.read(str(r.path))[0]) == frames * codec.sample_rate / codec.frame_rate


def test_out_of_range_codes_are_reported_not_clipped(tmp_path, codec):
    cfg, tok, _, raw = setup(tmp_path, "eval.max_audio_seconds=0.4", with_reference=False)
    mc = raw.config
    # At frame column 6 every codebook emits the stream BOS: an id outside the codebook, mid-stream.
    handle = steer(raw, lambda step: {mc.audio_stream_eos_id: -1e4, mc.audio_stream_bos_id: 1e4 if step == 6 else -1e4})
    try:
        [r] = write_samples(raw, tok, codec, cfg, 5, tmp_path / "samples")
    finally:
        handle.remove()
    # Codebook C-1 holds it at frame 6-(C-1), the first frame with one: the audio stops before it.
    assert r.invalid_codes > 0 and r.frames == 6 - (mc.audio_num_codebooks - 1) - 1
    assert r.hit_limit
    assert json.loads((r.path.parent / "samples.json").read_text())["samples"][0]["invalid_codes"] == r.invalid_codes


def test_same_codes_as_the_inference_engine(tmp_path, codec):
    """HiggsAudioServeEngine.generate on the same model, prompt (with a reference clip) and seed: the same
    audio stream, and the same codes once the engine reverts the delay and drops BOS/EOS frames; with the
    engine's static KV cache and with the dynamic cache used under autocast."""
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine
    from transformers.cache_utils import StaticCache

    from higgs_ddp.data.prompt import build_chatml
    from higgs_ddp.evaluation.generation import _collator, max_new_tokens
    from higgs_ddp.evaluation.listening import _encode_reference

    cfg, tok, _, raw = setup(tmp_path, "eval.max_audio_seconds=1.0")
    prompt = cfg.eval.prompts[1]
    mc = raw.config
    raw.eval()
    with torch.inference_mode():
        ref_codes = _encode_reference(cfg, 1, prompt, codec)
        ours = [generate_codes(raw, tok, codec, cfg, prompt["text"], prompt["reference_text"], ref_codes,
                               static_cache=static) for static in (True, False)]

    engine = HiggsAudioServeEngine.__new__(HiggsAudioServeEngine)  # its __init__ loads a model from a path
    cache_config = mc.text_config.__class__(**mc.text_config.to_dict())
    cache_config.num_hidden_layers += len(mc.audio_dual_ffn_layers)
    engine.__dict__.update(model=raw, tokenizer=tok, audio_tokenizer=codec.model, device="cpu",
                           audio_codebook_size=mc.audio_codebook_size, collator=_collator(mc),
                           kv_caches={1024: StaticCache(config=cache_config, batch_size=1, max_cache_len=1024,
                                                        device="cpu", dtype=torch.float32)})
    chatml = build_chatml(prompt["text"], None, prompt["reference_text"], with_reference=True, with_target=False)
    chatml.messages[2].content.audio_url = prompt["reference_audio"]
    budget = max_new_tokens(mc, round(cfg.eval.max_audio_seconds * codec.frame_rate))
    # Left alone the engine goes on with text after the audio stream: stop it there too, as we do.
    r = engine.generate(chatml, max_new_tokens=budget, temperature=cfg.eval.temperature, force_audio_gen=True,
                        seed=cfg.eval.seed, stop_strings=["<|end_of_text|>", "<|eot_id|>", "<|audio_eos|>"])
    theirs = torch.as_tensor(r.generated_audio_tokens)
    for got in ours:
        assert torch.equal(theirs, got.columns)
        assert not got.hit_limit and got.codes.shape[1] > 0  # the random tiny model ends this one by itself
        assert torch.equal(got.codes, revert_delay_pattern(theirs)[:, 1:-1])


@pytest.mark.parametrize("mode", ["lora", "audio_ffn", "full"])
def test_generation_under_the_trainers_mixed_precision(tmp_path, mode):
    """train.precision=bf16 (on GPU and CPU alike): the base in bf16, what trains in fp32, generation under
    bf16 autocast. (A single static KV cache fails for train.mode=full: its layers mix fp32 and bf16 keys.)"""
    from higgs_ddp.model import build_for_training
    from higgs_ddp.runtime.precision import weight_dtype

    cfg = tiny_config(tmp_path, f"train.mode={mode}", f"eval.max_audio_seconds={MAX_SECONDS}",
                      "train.precision=bf16", samples=1)
    tok = load_tokenizer(cfg)
    raw = unwrap(build_for_training(cfg, tok, weight_dtype(cfg, torch.device("cpu"))))
    assert raw.embed_tokens.weight.dtype == torch.bfloat16 or mode == "full"
    raw.eval()
    with torch.inference_mode():
        got = generate_codes(raw, tok, SimpleNamespace(frame_rate=25.0), cfg, "hello there")
    assert got.codes.shape[0] == raw.config.audio_num_codebooks and got.columns.shape[1] > 1


def test_unusable_reference_audio_is_a_one_line_error(tmp_path, codec):
    cfg, tok, _, raw = setup(tmp_path, with_reference=False)
    missing = tmp_path / "nope" / "ref.wav"
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not a wav file at all")
    cfg.eval.prompts = [{"text": "hi", "reference_audio": str(missing), "reference_text": "hi"},
                        {"text": "hi", "reference_audio": str(garbage), "reference_text": "hi"},
                        {"text": "hi", "reference_text": "words without audio"},
                        {"text": "hi", "reference_audio": str(missing)},  # audio without its words: one rule
                        {"text": "fine"}]
    problems = check_prompts(cfg)
    assert len(problems) == 4 and all("\n" not in p for p in problems)
    assert str(missing) in problems[0] and "not found" in problems[0] and problems[0].startswith("eval.prompts[0]")
    assert str(garbage) in problems[1] and "eval.prompts[2]" in problems[2]
    assert problems[3] == ("eval.prompts[3]: a reference needs both its audio (eval.prompts[3].reference_audio) "
                           "and its transcript (eval.prompts[3].reference_text)")
    cfg.eval.prompts = [{"text": "fine"}, {"text": "hi", "reference_audio": str(missing), "reference_text": "hi"}]
    with pytest.raises(ValueError) as e:
        write_samples(raw, tok, codec, cfg, 1, tmp_path / "samples")
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    assert raw.training
    assert not (tmp_path / "samples").exists(), "checked before anything is generated or written"


def test_a_reference_too_short_for_the_codec_is_refused_at_start_up(tmp_path, codec):
    cfg, tok, _, raw = setup(tmp_path, with_reference=False)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(80, np.float32), codec.sample_rate)  # 10 ms: the codec's encoder needs 39 ms
    cfg.eval.prompts = [{"text": "hi", "reference_audio": str(short), "reference_text": "hi"}]
    problems = check_prompts(cfg)  # from the config alone: no codec is loaded at start-up
    assert problems == [f"eval.prompts[0].reference_audio: audio {short} is too short for the codec: 10.0 ms, "
                        f"its encoder needs 39.0 ms"]
    with pytest.raises(ValueError, match="too short for the codec"):  # and the samples check it the same way
        write_samples(raw, tok, codec, cfg, 1, tmp_path / "samples")


def test_the_start_up_check_names_a_codec_whose_config_cannot_be_read(tmp_path, codec):
    cfg, *_ = setup(tmp_path)  # the demo's reference
    cfg.data.codec = str(tmp_path / "not_a_codec")
    (tmp_path / "not_a_codec").mkdir()
    problems = check_prompts(cfg)
    assert len(problems) == 1 and f"codec folder {tmp_path / 'not_a_codec'} has no config.json" in problems[0]


def test_generation_prints_no_deprecation_from_inside_boson(tmp_path, codec):
    """boson's static-cache path calls transformers' deprecated get_max_length(): logged once per process,
    it read like our bug in speak, score and the training log. Dropped around generate; other messages
    of that logger still pass."""
    import logging

    cfg, tok, _, raw = setup(tmp_path, with_reference=False)
    logger, seen = logging.getLogger("transformers.cache_utils"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logging.Logger.warning_once.cache_clear()  # once per process: this test must not depend on the order
        with torch.inference_mode():
            generate_codes(raw, tok, codec, cfg, "hello there", static_cache=True)
        logger.warning("another message")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another message"], seen
