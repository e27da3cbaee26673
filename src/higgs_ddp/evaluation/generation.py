"""Speech from the model: the generation engine that listening samples (listening.py), ``higgs-ddp speak``
and ``higgs-ddp score`` share.

Generation follows boson_multimodal's inference engine (``HiggsAudioServeEngine.generate``) step for
step, without constructing the engine (which loads a model from a path):

* the prompt is our ``build_chatml(..., with_target=False)``, tokenised by ``prepare_chatml_sample`` (as
  training tokenises it) plus the engine's assistant header and ``<|audio_out_bos|>`` (the engine's
  ``force_audio_gen=True``), collated by boson's ``HiggsAudioSampleCollator`` configured as the engine
  configures it; a reference audio is read, conditioned (data.audio) and encoded as training data is
  (prepare.decode_for_codec, codec.py: the same codes for the same file);
* ``HiggsAudioModel.generate`` gets the engine's arguments: ``use_cache``, a static KV cache bucket
  (the engine's sizes; under the trainer's bf16 autocast boson's dynamic cache, see ``generate_codes``),
  ``stop_strings``/``tokenizer``, ``do_sample``/``temperature``/``top_p``/``top_k``,
  repetition-aware sampling (``ras_win_len=7``, ``ras_win_max_num_repeat=2``) and ``seed`` (``Sampling``,
  the engine's defaults; training's samples take temperature, seed and length from ``eval``);
* the generated (delayed) code columns go back to (codebooks, frames) with boson's
  ``revert_delay_pattern``, minus the stream-BOS frame and everything from the first stream-EOS frame on
  (the engine's ``[:, 1:-1]`` for a finished stream).

Differences from the engine, on purpose: generation stops at the end of the first audio stream
(``<|audio_eos|>``) instead of continuing with text; codes outside the codebook are reported
(``invalid_codes``) and the audio stops before them, where the engine clips them into range; the special
token ids are passed to ``generate`` instead of being set on the model; no CUDA graphs are captured.

``higgs-ddp speak`` (tools/speak.py) speaks through the same ``speak_text``.

Nothing of this touches training: the global (and CUDA) RNG streams are forked and restored, generation
runs in inference mode, every module gets its train/eval flag back, and no cache stays on the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from higgs_ddp.config import AudioConditioning, Config, EvalConfig, uses_bf16
from higgs_ddp.data.audio import AudioProblem, DurationRule, read_audio, resample
from higgs_ddp.data.prompt import build_chatml, tokenize_chatml
from higgs_ddp.runtime import precision
from higgs_ddp.errors import InputError


STOP_STRINGS = ["<|end_of_text|>", "<|eot_id|>"]  # the engine's defaults
ENGINE_KV_CACHE_LENGTHS = (1024, 4096, 8192)  # HiggsAudioServeEngine's default static cache buckets
TOP_P, TOP_K = 0.95, None  # the engine's defaults
RAS_WIN_LEN, RAS_WIN_MAX_NUM_REPEAT = 7, 2


@dataclass(frozen=True)
class Sampling:
    """How to sample: the arguments of HiggsAudioServeEngine.generate, with its defaults, and the length limit."""

    temperature: float = 0.7  # 0: greedy
    top_p: float = TOP_P
    top_k: Optional[int] = TOP_K  # None: no top-k cut
    ras_win_len: int = RAS_WIN_LEN  # repetition-aware sampling window (0: off)
    ras_win_max_num_repeat: int = RAS_WIN_MAX_NUM_REPEAT
    max_audio_seconds: float = 10.0  # a stream without an EOS by then is cut there and reported (hit_limit)
    seed: int = 0  # boson's generate seeds its own generator with it at every call

    @classmethod
    def of_eval(cls, ev: EvalConfig) -> "Sampling":
        """Training's listening samples: the engine's defaults, with eval's temperature, seed and limit."""
        return cls(temperature=ev.temperature, max_audio_seconds=ev.max_audio_seconds, seed=ev.seed)

    def check(self, name=lambda field: field) -> None:
        """ValueError (one line) for a setting generation cannot use. ``name``: how the user set a field
        (speak's and score's flags: ``flag_name``)."""
        if not self.temperature >= 0:
            raise InputError(f"{name('temperature')} must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"{name('top_p')} must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"{name('top_k')} must be >= 1 (or unset), got {self.top_k}")
        if self.ras_win_len < 0 or self.ras_win_max_num_repeat < 1:
            raise InputError(f"{name('ras_win_len')} must be >= 0 (0: off) and {name('ras_win_max_num_repeat')} "
                             f">= 1, got {self.ras_win_len} and {self.ras_win_max_num_repeat}")
        if not self.max_audio_seconds > 0:
            raise InputError(f"{name('max_audio_seconds')} must be > 0 (generation needs a limit), "
                             f"got {self.max_audio_seconds}")


def flag_name(field: str) -> str:
    """A Sampling field as the speak/score flag that sets it: max_audio_seconds -> --max-audio-seconds."""
    return "--" + field.replace("_", "-")


@dataclass
class Generated:
    """One prompt's generation, before decoding."""

    columns: torch.Tensor  # (C, N) the audio stream as generated: delayed, with stream BOS/EOS
    codes: torch.Tensor  # (C, frames) what is decoded: in range, no BOS/EOS
    hit_limit: bool
    invalid_codes: int


@dataclass
class Spoken:
    """One text spoken and decoded (``speak_text``)."""

    wave: Optional[np.ndarray]  # float32 at the codec's rate; None when not decoded
    generated: Generated
    generate_seconds: float = 0.0  # wall time of the generation


def read_reference(path, what: str, max_seconds: float, min_seconds: float, audio: Optional[AudioConditioning] = None,
                   codec_rate: int = 0) -> tuple[torch.Tensor, int]:
    """-> (mono float32 wave, sample rate) of a reference audio file, checked as training audio is
    (``min_seconds``: the codec's shortest input); a ValueError starting with ``what`` otherwise.

    ``audio``: the run's data.audio, with the codec's rate. The wave is then the one training's prepare
    gives the codec for the same file (``decode_for_codec``: conditioned at the codec's rate, its durations
    judged as training judges them), so the model hears the reference as it learned from references."""
    from higgs_ddp.data.prepare import decode_for_codec

    try:
        if audio is not None:
            rule = DurationRule(min_seconds, audio.min_seconds, max_seconds, audio.trim_silence)  # as training's
            return decode_for_codec(Path(path), str(path), rule, audio, codec_rate)
        wave, sr = read_audio(Path(path), str(path), max_seconds, min_seconds)
    except AudioProblem as e:
        raise InputError(f"{what}: {e}") from None
    return torch.from_numpy(wave), sr


def encode_reference(codec, wave: torch.Tensor, sr: int) -> torch.Tensor:
    """A reference wave as the prompt's codes: resampled to the codec's rate and encoded (as training data)."""
    return codec.encode(resample(wave.to(codec.device), sr, codec.sample_rate))


def reference_codes(cfg: Config, codec, path, what: str) -> torch.Tensor:
    """The codes of a reference audio file for the run ``cfg``: read, checked and conditioned (data.audio)
    as training's prepare does, then encoded: the codes training used for the same file (``speak`` and
    ``score``; the listening samples read theirs through the same ``read_reference``)."""
    return encode_reference(codec, *read_reference(path, what, cfg.data.max_audio_seconds, codec.min_seconds,
                                                   cfg.data.audio, codec.sample_rate))


def describe_conditioning(audio: AudioConditioning) -> str:
    """data.audio's settings that change the audio, in words ("" when none does): what speak says it did to
    a reference."""
    parts = [f"loudness_lufs={audio.loudness_lufs:g}" if audio.loudness_lufs is not None else "",
             f"peak_dbfs={audio.peak_dbfs:g}" if audio.peak_dbfs is not None else "",
             f"trim_silence (trim_db={audio.trim_db:g}, trim_keep_seconds={audio.trim_keep_seconds:g})"
             if audio.trim_silence else ""]
    return ", ".join(p for p in parts if p)


def _collator(mc):
    """boson's collator, configured exactly as HiggsAudioServeEngine configures it."""
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    return HiggsAudioSampleCollator(
        whisper_processor=None, encode_whisper_embed=mc.encode_whisper_embed,
        audio_in_token_id=mc.audio_in_token_idx, audio_out_token_id=mc.audio_out_token_idx,
        audio_stream_bos_id=mc.audio_stream_bos_id, audio_stream_eos_id=mc.audio_stream_eos_id,
        pad_token_id=mc.pad_token_id, return_audio_in_tokens=False, use_delay_pattern=mc.use_delay_pattern,
        audio_num_codebooks=mc.audio_num_codebooks, round_to=1)


def prepare_inputs(tokenizer, mc, text: str, ref_text: Optional[str], ref_codes: Optional[torch.Tensor],
                   device, scene: Optional[str] = None) -> dict:
    """The model inputs HiggsAudioServeEngine._prepare_inputs(chatml, force_audio_gen=True) builds."""
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

    if mc.encode_whisper_embed and ref_codes is not None:
        raise InputError("this model embeds reference audio with Whisper features, which listening samples "
                         "and speak do not compute")
    chatml = build_chatml(text, scene, ref_text, with_reference=ref_codes is not None, with_target=False)
    sample = tokenize_chatml(tokenizer, chatml, [ref_codes] if ref_codes is not None else [], "eval prompt")
    postfix = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>",
                               add_special_tokens=False)
    input_ids = torch.cat([sample.input_ids, torch.tensor(postfix, dtype=torch.long)])
    codes = sample.audio_codes
    batch = _collator(mc)([ChatMLDatasetSample(
        input_ids=input_ids, label_ids=None,
        audio_ids_concat=torch.cat(codes, dim=1) if codes else None,
        audio_ids_start=torch.tensor([0], dtype=torch.long) if codes else None,
        audio_waveforms_concat=None, audio_waveforms_start=None, audio_sample_rate=None,
        audio_speaker_indices=None)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in asdict(batch).items()}


def max_new_tokens(mc, max_frames: int) -> int:
    """Generation steps for ``max_frames`` frames and the stream EOS: one step for the stream-BOS column,
    one per frame, one for the EOS frame, and the codebook delay."""
    return max_frames + 2 + (mc.audio_num_codebooks - 1 if mc.use_delay_pattern else 0)


def _stop_at_audio_eos(audio_eos_token_id: int, agreed: bool = False):
    """A stopping criterion for the end of the first audio stream (the engine would go on with text).
    ``agreed``: every rank stops when any rank would (an all-reduce per token)."""
    from transformers.generation.stopping_criteria import StoppingCriteria

    class StopAtAudioEos(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids[:, -1] == audio_eos_token_id
            if agreed:
                from higgs_ddp.runtime.distributed import all_reduce_max
                done = all_reduce_max(done.to(torch.int32)).bool()
            return done

    return StopAtAudioEos()


def _static_cache(mc, length: int, device, dtype):
    """A KV cache bucket as HiggsAudioServeEngine builds one (DualFFN fast-forward layers cache too)."""
    from transformers.cache_utils import StaticCache

    cache_config = deepcopy(mc.text_config)
    if mc.audio_dual_ffn_layers:
        cache_config.num_hidden_layers += len(mc.audio_dual_ffn_layers)
    size = next((n for n in ENGINE_KV_CACHE_LENGTHS if n >= length), 1024 * math.ceil(length / 1024))
    return {size: StaticCache(config=cache_config, batch_size=1, max_cache_len=size, device=device, dtype=dtype)}


def split_stream(columns: torch.Tensor, mc, finished: bool, max_frames: int) -> tuple[torch.Tensor, bool, int]:
    """(C, N) generated columns -> (codes (C, frames), hit_limit, invalid_codes).

    Reverts the delay pattern, drops the stream-BOS frame and cuts at the first frame where any codebook
    holds the stream EOS. Codes outside [0, codebook_size) before that point are counted, never clipped:
    the codes stop before the first frame holding one."""
    from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern

    bos, eos, size = mc.audio_stream_bos_id, mc.audio_stream_eos_id, mc.audio_codebook_size
    frames = revert_delay_pattern(columns) if mc.use_delay_pattern else columns
    if frames.shape[1] == 0 or not bool((frames[:, 0] == bos).all()):
        raise RuntimeError(f"the generated audio stream does not start with the stream BOS: {frames[:, :1].tolist()}")
    frames = frames[:, 1:]
    eos_frames = (frames == eos).any(dim=0).nonzero()
    if len(eos_frames):
        frames = frames[:, :int(eos_frames[0])]
    elif finished:
        raise RuntimeError("generation ended the audio stream but no stream EOS frame is in it")
    hit_limit = not finished or frames.shape[1] > max_frames
    frames = frames[:, :max_frames]
    bad = (frames < 0) | (frames >= size)
    invalid = int(bad.sum())
    if invalid:
        frames = frames[:, :int(bad.any(dim=0).nonzero()[0])]
    return frames, hit_limit, invalid


def generate_codes(raw_model, tokenizer, codec, cfg: Config, text: str, ref_text: Optional[str] = None,
                   ref_codes: Optional[torch.Tensor] = None, static_cache: Optional[bool] = None,
                   lockstep: bool = False, sampling: Optional[Sampling] = None,
                   scene: Optional[str] = None) -> Generated:
    """One prompt through HiggsAudioModel.generate with the engine's arguments. The caller handles the
    model's mode, the RNG and gradients (``generation_state``). ``sampling``: ``Sampling.of_eval(cfg.eval)``
    unless given; ``cfg`` otherwise only gives the precision (``config.uses_bf16``). ``scene``: the system
    prompt's scene description, as training's ``scene``.

    ``static_cache`` (default: unless under autocast): the engine's static KV cache bucket. Under autocast
    the keys and values of different layers can come out in different dtypes (fp32 embeddings and weights
    meet bf16 matmuls), which one static cache cannot hold; boson's DynamicCache path is used instead.

    ``lockstep``: every rank generates this prompt at the same time (sharded weights: each forward gathers
    them), and all stop after the same token, so none waits at a gather the others never reach."""
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    mc = raw_model.config
    device = next(raw_model.parameters()).device
    sampling = sampling or Sampling.of_eval(cfg.eval)
    max_frames = max(1, round(sampling.max_audio_seconds * codec.frame_rate))
    inputs = prepare_inputs(tokenizer, mc, text, ref_text, ref_codes, device, scene)
    budget = max_new_tokens(mc, max_frames)
    amp = uses_bf16(cfg, device.type)  # the trainer's numerics: bf16 autocast (GPU or CPU) or fp32
    if static_cache is None:
        static_cache = not amp
    kv = None
    if static_cache:
        ref_positions = inputs["audio_out_ids"].shape[1] if inputs["audio_out_ids"] is not None else 0
        kv = _static_cache(mc, inputs["input_ids"].shape[1] + ref_positions + budget, device,
                           torch.bfloat16 if amp else raw_model.embed_tokens.weight.dtype)
    audio_eos_token_id = tokenizer.convert_tokens_to_ids("<|audio_eos|>")
    temperature = sampling.temperature
    with precision.autocast(cfg, device), warnings.catch_warnings(), _without_boson_cache_deprecation():
        # temperature 0: greedy, as in the engine, which passes top_p anyway (transformers warns, nothing changes)
        warnings.filterwarnings("ignore", message=r"`do_sample` is set to `False`")
        out = raw_model.generate(
            **inputs, max_new_tokens=budget, use_cache=True, stop_strings=STOP_STRINGS, tokenizer=tokenizer,
            do_sample=temperature != 0.0, temperature=temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            past_key_values_buckets=kv, ras_win_len=sampling.ras_win_len or None,  # boson: None is off
            ras_win_max_num_repeat=sampling.ras_win_max_num_repeat, seed=sampling.seed,
            audio_out_bos_token_id=tokenizer.convert_tokens_to_ids("<|audio_out_bos|>"),
            audio_eos_token_id=audio_eos_token_id,
            stopping_criteria=StoppingCriteriaList([_stop_at_audio_eos(audio_eos_token_id, lockstep)]))
    sequences, audio = out[0], out[1]
    if not audio:
        raise RuntimeError("generation produced no audio stream")
    columns = audio[0].detach().cpu()
    finished = int(sequences[0, -1]) == audio_eos_token_id
    codes, hit_limit, invalid = split_stream(columns, mc, finished, max_frames)
    return Generated(columns, codes, hit_limit, invalid)


class _BosonCacheDeprecation(logging.Filter):
    """boson_multimodal's ``_update_causal_mask`` calls ``StaticCache.get_max_length()``, which transformers
    4.46 logs as deprecated ("`get_max_cache()` is deprecated ... will raise error from v4.48"). The call is
    boson's (setup.py keeps transformers below 4.47 for it); printed in speak, score and the training log, it
    reads like our bug. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("`get_max_cache()` is deprecated")


@contextlib.contextmanager
def _without_boson_cache_deprecation():
    """The filter above on transformers' cache logger, around one ``generate`` only."""
    logger, quiet = logging.getLogger("transformers.cache_utils"), _BosonCacheDeprecation()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def generation_state(raw_model, seed: int, lockstep: bool = False):
    """Eval mode, inference mode, a forked RNG seeded with ``seed``; everything put back afterwards.
    In lockstep (sharded weights) no_grad instead of inference mode: FSDP gathers weights into buffers
    that training reuses, which must not become inference tensors."""
    device = next(raw_model.parameters()).device
    modes = [(m, m.training) for m in raw_model.modules()]
    attrs = set(vars(raw_model))
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), (torch.no_grad() if lockstep else torch.inference_mode()):
            torch.manual_seed(seed)
            raw_model.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        for name in set(vars(raw_model)) - attrs:  # generate() leaves its KV-cache bucket choice behind
            delattr(raw_model, name)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def speak_text(raw_model, tokenizer, codec, cfg: Config, text: str, ref_text: Optional[str] = None,
               ref_codes: Optional[torch.Tensor] = None, sampling: Optional[Sampling] = None,
               scene: Optional[str] = None, lockstep: bool = False, decode: bool = True,
               what: str = "") -> Spoken:
    """One text generated (``generate_codes``) and decoded by the codec: the path of both the listening
    samples and ``higgs-ddp speak``. Inside ``generation_state``. ``what`` names the text in errors."""
    t0 = time.perf_counter()
    gen = generate_codes(raw_model, tokenizer, codec, cfg, text, ref_text, ref_codes, lockstep=lockstep,
                         sampling=sampling, scene=scene)
    elapsed = time.perf_counter() - t0
    if not decode:
        return Spoken(None, gen, elapsed)
    if gen.codes.shape[1]:
        wave = np.asarray(codec.decode(gen.codes), dtype=np.float32).reshape(-1)
    else:  # the model ended the stream at once
        wave = np.zeros(0, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise RuntimeError(f"{what or text!r}: the codec decoded non-finite audio")
    return Spoken(wave, gen, elapsed)


def check_codec(raw_model, codec) -> None:
    """The codec speaks the model's codes: as many codebooks, of the same size."""
    mc = raw_model.config
    if codec.num_codebooks != mc.audio_num_codebooks or (
            codec.codebook_size is not None and codec.codebook_size != mc.audio_codebook_size):
        raise InputError(f"the codec {codec.identity} has {codec.num_codebooks} codebooks of {codec.codebook_size}, "
                         f"the model {mc.audio_num_codebooks} of {mc.audio_codebook_size}")
