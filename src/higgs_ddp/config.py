"""Typed run configuration: YAML file + dotted ``key=value`` overrides, checked against dataclasses.

An unknown key or a value of the wrong type is a ``ConfigError`` that names the key and suggests the
nearest valid ones; nothing is silently ignored. Each field carries its range or choices (``ranged``, ``choice``)
and each section its rules between fields (``check_rules``): ``load_config`` checks them all before any
model or data is loaded. What can only be checked against the machine, the model or the data is in
``check_machine``, ``check_lora_targets`` and ``batching.check_step_fits``, which the run and the doctor
both call.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from higgs_ddp.errors import HiggsError

OFFICIAL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
# The hub repo was rewritten for transformers>=5.3; this revision is the format boson_multimodal loads.
OFFICIAL_REVISION = "10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84"

DEFAULT_LORA_TARGETS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",  # attention
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",  # text FFN
    "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj",  # audio FFN (DualFFN)
]


OFFICIAL_CODEC = "bosonai/higgs-audio-v2-tokenizer"
# The codec's hub repo was rewritten in April 2026 (a nested config.json: acoustic_model_config, ...), which
# boson_multimodal's load_higgs_audio_tokenizer cannot load (boson-ai/higgs-audio#176); this revision is the
# last in the format it loads.
OFFICIAL_CODEC_REVISION = "9d4988fbd4ad07b4cac3a5fa462741a41810dbec"
# The revision each official repo is read at when none is given: hub `main` no longer loads for either.
PINNED_REVISIONS = {OFFICIAL_REPO: OFFICIAL_REVISION, OFFICIAL_CODEC: OFFICIAL_CODEC_REVISION}


def pinned_revision(repo: Optional[str], revision: Optional[str]) -> Optional[str]:
    """The revision a hub repo is read at: the one given, else the pinned one for an official repo."""
    return revision if revision is not None else PINNED_REVISIONS.get(repo)


class ConfigError(HiggsError, ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """The numbers a config key takes; an open end is excluded. ``note`` says what its edge values mean."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# What a field's metadata says besides its range or choices, so that every use derives from the field:
#   "path": "path" | "paths": read relative to the config file when not found from the working folder
#           ("paths": a string is a one-item list);
#   "neutral": True: changing it cannot change what a step computes, so a resume accepts any value
#             (where things live, how often to log or save, speed and memory settings). A Section whose
#             RESUME_NEUTRAL is true marks all its keys so.


def ranged(default, low=None, high=None, *, low_open=False, high_open=False, note="", neutral=False):
    """A field whose value must lie in a Range, checked by load_config before anything is loaded."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open, note), "neutral": neutral})


def choice(default: str, *others: str, neutral=False):
    """A field that takes one of a few words."""
    return field(default=default, metadata={"choices": (default, *others), "neutral": neutral})


def setting(default=None, *, factory=None, path=None, neutral=False):
    """A field without a range or choices: ``path`` ("path" or "paths") and ``neutral`` as above."""
    metadata = {"path": path, "neutral": neutral}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_field(key: str, value, metadata) -> None:
    rng = metadata.get("range")
    if rng is not None and value is not None and value not in rng:  # None: an optional setting left off
        note = f" ({rng.note})" if rng.note else ""
        raise ConfigError(f"config key {key!r} must be {rng}{note}, got {value!r}")
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {list(choices)}, got {value!r}")


class Section:
    """A config section: each field's range or choices (its metadata), then the rules between its fields."""

    NAME = ""  # the section's key in the config
    RESUME_NEUTRAL = False  # every key of the section is resume-neutral (it never changes a training step)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):  # a nested section (train.fsdp)
                value.validate()
            else:
                _check_field(f"{self.NAME}.{f.name}", value, f.metadata)
        self.check_rules()

    def check_rules(self) -> None:
        """Rules between fields of this section; ConfigError names the keys."""


@dataclass
class ModelConfig(Section):
    NAME = "model"
    path: Optional[str] = None  # hub id or local folder of a boson_multimodal-format checkpoint
    revision: Optional[str] = None  # defaults to OFFICIAL_REVISION for the official repo
    init: str = choice("pretrained", "random")  # "random": random weights from `config`
    config: Optional[dict] = None  # inline HiggsAudioConfig kwargs, for init=random
    tokenizer: Optional[str] = None  # path/hub id; "tiny" builds the offline byte tokenizer
    # boson_multimodal's decoder layers know these three (LLAMA_ATTENTION_CLASSES)
    attn_implementation: str = choice("sdpa", "eager", "flash_attention_2")
    # "nf4": train.mode=lora's frozen decoder-layer linears and text head stored in 4 bits (torchao's NF4; quantize.py)
    quantize: str = choice("none", "nf4")

    def check_rules(self) -> None:
        if self.init == "random" and not self.config:
            raise ConfigError("model.init=random needs an inline model.config (HiggsAudioConfig fields)")
        if self.init == "pretrained" and not self.path:
            raise ConfigError("model.path is required for model.init=pretrained")


@dataclass
class AudioConditioning(Section):
    """What prepare does to each clip before the codec encodes it (data/audio.py ``condition``), besides the
    mono down-mix and the resampling to the codec's rate that it always does. Everything here is off by
    default. The settings that change the audio are part of the code cache's key (``cache_key``)."""

    NAME = "data.audio"
    RESUME_NEUTRAL = True  # what prepare does to the audio: judged by the data fingerprint (the codes), not here
    # integrated loudness (ITU-R BS.1770, measured by pyloudnorm) each clip is scaled to, e.g. -20
    loudness_lufs: Optional[float] = ranged(None, -70, 0, note="null: off")
    # no sample above this (dBFS): a clip whose peak is higher is scaled down whole (never clipped or compressed)
    peak_dbfs: Optional[float] = ranged(None, -60, 0, note="null: off")
    trim_silence: bool = False  # cut leading and trailing silence
    # silence: 10 ms frames more than this far below the clip's loudest frame (gain-independent)
    trim_db: float = ranged(40.0, 0, 120, low_open=True)
    trim_keep_seconds: float = ranged(0.1, 0)  # silence kept before the first and after the last loud frame
    # shorter clips (after trimming) are data problems; the longest is data.max_audio_seconds
    min_seconds: float = ranged(0.0, 0, note="0: no minimum beyond the codec's shortest input")

    VERSION = 1  # bump when condition() changes what it does for the same settings

    @property
    def changes_audio(self) -> bool:
        return self.loudness_lufs is not None or self.peak_dbfs is not None or self.trim_silence

    def cache_key(self) -> str:
        """The part of the code cache key these settings make: empty when they leave the audio as the codec
        gets it anyway, so turning nothing on keeps every existing cache; min_seconds only filters clips."""
        if not self.changes_audio:
            return ""
        parts = [f"lufs={self.loudness_lufs:g}" if self.loudness_lufs is not None else "",
                 f"peak={self.peak_dbfs:g}" if self.peak_dbfs is not None else "",
                 f"trim={self.trim_db:g}dB/{self.trim_keep_seconds:g}s" if self.trim_silence else ""]
        return f"audio-v{self.VERSION}:" + ",".join(p for p in parts if p)


@dataclass
class DataConfig(Section):
    NAME = "data"
    # The data itself is judged at resume by its fingerprint (ids, tokens, codes), not by where it lives or
    # how it got there: these keys are resume-neutral.
    manifest: list = setting(factory=list, path="paths", neutral=True)  # JSONL file(s), one sample per line
    val_manifest: list = setting(factory=list, path="paths", neutral=True)  # validation manifest(s)
    # or: this fraction of the training samples (chosen by a hash of the id)
    val_fraction: float = ranged(0.0, 0, 1, high_open=True)
    # "error": stop with the full list | "skip": count, report, train on the rest
    on_error: str = choice("error", "skip", neutral=True)
    max_audio_seconds: float = ranged(30.0, 0, note="0: no limit")
    max_tokens_per_batch: int = ranged(0, 0, note="0: fixed micro_batch_size")  # > 0: length-aware micro-batches
    # dataset root for allow_outside_root (default: each manifest's folder)
    root: Optional[str] = setting(path="path", neutral=True)
    allow_outside_root: bool = setting(True, neutral=True)
    # audio tokenizer: hub id, local folder, or "tiny" (random, for demos)
    codec: str = setting(OFFICIAL_CODEC, path="path")
    # defaults to OFFICIAL_CODEC_REVISION for the official codec
    codec_revision: Optional[str] = setting(neutral=True)
    # code cache (default: .higgs_codes next to the first manifest)
    cache_dir: Optional[str] = setting(path="path", neutral=True)
    shuffle: bool = True
    num_workers: int = ranged(2, 0, note="0: batches are built in the training process", neutral=True)
    prefetch_factor: int = ranged(4, 1, neutral=True)
    audio: AudioConditioning = field(default_factory=AudioConditioning)  # loudness, peak, trimming, durations
    # the voice-clone reference of each simple manifest line (data/references.py): "given": its ref_audio and
    # ref_text, if any | "same_speaker": another clip of its speaker, with that clip's transcript | "none"
    reference: str = choice("given", "same_speaker", "none", neutral=True)
    # same_speaker: [shortest, longest]
    reference_seconds: list = setting(factory=lambda: [3.0, 10.0], neutral=True)
    # train.objective=dpo: the preference pairs, DIR/pairs.jsonl as `higgs-ddp prefs build` writes it
    # (data/preferences.py), and optionally held-out pairs to validate on (or data.val_fraction of the prompts)
    preferences: Optional[str] = setting(path="path")
    val_preferences: Optional[str] = setting(path="path")

    def check_rules(self) -> None:
        if self.val_manifest and self.val_fraction:
            raise ConfigError("give data.val_manifest or data.val_fraction, not both")
        if self.val_preferences and self.val_fraction:
            raise ConfigError("give data.val_preferences or data.val_fraction, not both")
        r = self.reference_seconds
        if len(r) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in r) \
                or not 0 < r[0] <= r[1]:
            raise ConfigError(f"config key 'data.reference_seconds' must be [shortest, longest] with "
                              f"0 < shortest <= longest (seconds), got {r!r}")


@dataclass
class FsdpSettings(Section):  # train.parallel=fsdp (see parallel.py)
    NAME = "train.fsdp"
    # "autocast": fp32 weights gathered, bf16 autocast as under DDP (the same numerics) | "bf16": FSDP's
    # MixedPrecisionPolicy, weights gathered in bf16 and gradients reduced in fp32 (faster; ~1e-2 relative)
    mixed_precision: str = choice("autocast", "bf16")
    cpu_offload: bool = setting(False, neutral=True)  # keep the sharded weights, gradients and AdamW state in host memory


@dataclass
class TrainConfig(Section):
    NAME = "train"
    mode: str = choice("lora", "audio_ffn", "full")
    max_steps: int = ranged(1000, 1)
    micro_batch_size: int = ranged(1, 1)
    grad_accum_steps: int = ranged(1, 1)
    lr: float = ranged(2e-4, 0)
    min_lr_ratio: float = ranged(0.1, 0, 1, note="the final LR as a fraction of train.lr")
    warmup_steps: int = ranged(50, 0)
    weight_decay: float = ranged(0.0, 0)
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2), each in [0, 1)
    # "adamw": fp32 moments (8 bytes per trained parameter) | "adamw8bit": torchao's 8-bit moments (~2 bytes;
    # training/optim.py), what lets full fine-tuning fit one 80 GB GPU (docs/speed-and-memory.md)
    optimizer: str = choice("adamw", "adamw8bit")
    max_grad_norm: float = ranged(1.0, 0, note="0: no clipping")
    seed: int = 1234
    # "auto": bf16 on GPU, fp32 on CPU | "bf16": bf16 autocast on either (on a CPU: the GPU's numerics, to
    # test them anywhere; slower than fp32 there) | "fp32". Trainable weights and AdamW state stay fp32.
    precision: str = choice("auto", "bf16", "fp32")
    text_weight: float = ranged(1.0, 0)
    audio_weight: float = ranged(1.0, 0)
    loss_alignment: str = choice("auto", "shifted", "aligned")  # see dual_loss.py
    max_bad_steps: int = ranged(3, 1, neutral=True)  # consecutive non-finite steps before the run stops
    find_unused_parameters: bool = setting(False, neutral=True)
    log_every: int = ranged(1, 1, neutral=True)  # a metrics.jsonl row every N steps (and at the last)
    # optimizer steps between checkpoints
    save_every: int = ranged(500, 0, note="0: only at the end and when stopped", neutral=True)
    keep_last: int = ranged(3, 0, note="0: all", neutral=True)  # complete checkpoints kept
    # "auto": from the latest checkpoint in output_dir, if any | "never" | a checkpoint path
    resume: str = setting("auto", neutral=True)
    # differences from the checkpoint to accept, e.g. [train.lr]
    resume_accept: list = setting(factory=list, neutral=True)
    # Speed and memory (see perf.py and BENCHMARKS.md); none of them changes the loss or the gradients, so
    # switching one on to fit a GPU is a normal resume.
    # recompute each decoder layer in backward: less memory, ~1/3 more compute
    activation_checkpointing: bool = setting(False, neutral=True)
    # "supervised": text head only where a text target is supervised
    text_logits: str = choice("supervised", "all", neutral=True)
    # rows of text logits computed (and kept for backward) at a time
    text_logits_chunk: int = ranged(4096, 0, note="0: all rows at once", neutral=True)
    compile: bool = setting(False, neutral=True)  # torch.compile each decoder layer
    # "ddp": a replica per rank | "fsdp": weights, gradients and AdamW state sharded over the ranks (FSDP2);
    # a DDP checkpoint resumes under FSDP and back (shards.py)
    parallel: str = choice("ddp", "fsdp", neutral=True)
    # on a GPU, refuse a run whose weights, gradients and AdamW state alone exceed it (training/memory_plan.py)
    check_memory: bool = setting(True, neutral=True)
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)
    # "sft": supervised next-token loss on data.manifest | "dpo": preference optimisation on data.preferences
    # (the dpo section; docs/preferences.md)
    objective: str = choice("sft", "dpo")
    # start from an earlier fine-tune: a run folder, checkpoint or (unmerged) export, its trained weights merged
    # into the base as `export --merge` does; this run's train.mode then trains on top (a new adapter for lora).
    # Under dpo that starting model is the reference.
    init_from: Optional[str] = setting(path="path")

    def check_rules(self) -> None:
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in self.betas):
            raise ConfigError(f"config key 'train.betas' must be two numbers in [0, 1) (AdamW's beta1, beta2), "
                              f"got {self.betas!r}")
        if self.parallel == "fsdp" and self.find_unused_parameters:
            raise ConfigError("train.find_unused_parameters is a DDP setting; under train.parallel=fsdp every rank "
                              "produces every gradient on every micro-step already")
        if not self.text_weight and not self.audio_weight:
            raise ConfigError("train.text_weight and train.audio_weight are both 0: nothing would be learned")
        if not self.resume:
            raise ConfigError("train.resume must be auto, never or a checkpoint folder")
        if self.optimizer == "adamw8bit" and self.parallel == "fsdp":
            raise ConfigError("train.optimizer=adamw8bit works under train.parallel=ddp (or one process), not fsdp: "
                              "its 8-bit blocks would follow each shard's split; use ddp, or adamw with fsdp")


@dataclass
class DpoSettings(Section):  # train.objective=dpo (dpo_loss.py; docs/preferences.md)
    NAME = "dpo"
    # the KL strength: how far the policy may move from the reference. TRL's DPOTrainer defaults to 0.1;
    # NeMo's Magpie-TTS recipe uses 0.01 with lr 2e-7 on a full model (smaller beta: larger moves allowed)
    beta: float = ranged(0.1, 0, low_open=True)
    # TRL's rpo_alpha: adds sft_weight x the chosen candidates' supervised loss (0: pure DPO)
    sft_weight: float = ranged(0.0, 0)
    # compare per-target log-probabilities (each candidate's sum / its targets): length does not decide alone
    length_normalized: bool = False


@dataclass
class LoraSettings(Section):
    NAME = "lora"
    r: int = ranged(16, 1)
    alpha: int = ranged(32, 1, note="the adapter's output is scaled by alpha / r: 0 would keep it at zero")
    dropout: float = ranged(0.05, 0, 1, high_open=True)
    target_modules: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def check_rules(self) -> None:
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"config key 'lora.target_modules' must be a list of module names, "
                              f"got {self.target_modules!r}")


@dataclass
class EvalConfig(Section):
    NAME = "eval"
    RESUME_NEUTRAL = True  # validation and samples read the weights and never change them (nor the training RNG)
    # optimizer steps between validations (0: only at the end); needs a validation set
    every: int = ranged(0, 0, note="0: only at the end")
    max_batches: int = ranged(0, 0, note="0: the whole validation set")  # micro-batches per rank per validation
    samples_every: int = ranged(0, 0, note="0: with every validation")  # optimizer steps between listening samples
    prompts: list = field(default_factory=list)  # [{text, reference_audio?, reference_text?}] spoken at each sample
    # A sample that reaches this without the stream EOS is reported. Generation always needs a limit, so
    # 0 is refused rather than read as "no limit" (as data.max_audio_seconds reads it).
    max_audio_seconds: float = ranged(10.0, 0, low_open=True,
                                      note="generation needs a length limit; 0 is not 'no limit' here")
    temperature: float = ranged(0.7, 0, note="0: greedy")
    seed: int = 0  # generation seed: the same prompt gives comparable samples from step to step
    # Scores of the listening samples (evaluation/scoring.py); weights from a folder or the Hugging Face cache,
    # never downloaded during a run. Whisper (transformers' classes) for WER/CER, e.g. openai/whisper-large-v3:
    asr_model: Optional[str] = None
    # a WavLMForXVector speaker-verification model for speaker similarity, e.g. microsoft/wavlm-base-plus-sv,
    # or "resemblyzer": the encoder that ships inside that package (higgs-ddp[voice]), no download at all
    speaker_model: Optional[str] = None
    language: str = "en"  # of the prompts without their own "language" (zh, ja, ...: CER instead of WER)
    # keep {output_dir}/best/ (final/'s formats) at the best value so far of this metric ("none": no best/)
    best_by: str = choice("none", "val_loss", "wer", "speaker_sim")
    # stop a run whose eval.best_by metric has not improved for this many evaluations in a row
    early_stop_patience: int = ranged(0, 0, note="0: never stop early")

    PROMPT_KEYS = ("text", "reference_audio", "reference_text", "speaker_audio", "language")
    PROMPT_PATHS = ("reference_audio", "speaker_audio")  # read relative to the config file, as data paths are

    def check_rules(self) -> None:
        for i, prompt in enumerate(self.prompts):
            if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str) or not prompt["text"].strip() \
                    or set(prompt) - set(self.PROMPT_KEYS):
                raise ConfigError(f"eval.prompts[{i}] must be a mapping with a non-empty text and optionally "
                                  f"reference_audio, reference_text, speaker_audio (a clip of the voice it should "
                                  f"have) and language, got {prompt!r}")
        if not isinstance(self.language, str) or not self.language.strip():
            raise ConfigError(f"config key 'eval.language' must be a language code such as en or zh, "
                              f"got {self.language!r}")
        needs = {"wer": ("asr_model", "an ASR model"), "speaker_sim": ("speaker_model", "a speaker model")}
        if self.best_by in needs:
            key, what = needs[self.best_by]
            if not getattr(self, key):
                raise ConfigError(f"eval.best_by={self.best_by} needs {what}: set eval.{key}")
            if not self.prompts:
                raise ConfigError(f"eval.best_by={self.best_by} scores the listening samples: set eval.prompts")
        if self.best_by == "speaker_sim" and not any(p.get("speaker_audio") or p.get("reference_audio")
                                                     for p in self.prompts):
            raise ConfigError("eval.best_by=speaker_sim needs a prompt with a reference_audio or speaker_audio "
                              "(the voice to compare with)")
        if self.early_stop_patience and self.best_by == "none":
            raise ConfigError("eval.early_stop_patience needs a metric to watch: set eval.best_by")


@dataclass
class LoggingConfig(Section):
    NAME = "logging"
    RESUME_NEUTRAL = True
    tensorboard: bool = False  # also write every metric (and the listening samples) to {output_dir}/tensorboard


@dataclass
class BenchConfig(Section):  # higgs-ddp bench: random samples of one length, no data needed
    NAME = "bench"
    RESUME_NEUTRAL = True
    seq_len: int = ranged(2048, 1)  # positions per sample (text + expanded audio)
    # share of them that is audio (speech: ~25 frames/s, a few text tokens/s)
    audio_fraction: float = ranged(0.85, 0, 1)
    samples: int = ranged(256, 1)
    warmup_steps: int = ranged(3, 0)
    steps: int = ranged(10, 1)
    peer: bool = True  # also time the transformers.Trainer loop of the public Higgs trainers, side by side
    peak_tflops: float = ranged(0.0, 0, note="0: look the GPU up in a table")  # the device's dense bf16 peak for MFU
    find_largest_micro_batch: bool = False  # GPU: double the micro-batch until out of memory
    # model.init=random drawn on the run's device in its dtype (the GPU: seconds for 5.8B, where the CPU takes
    # minutes); not the CPU draw that export rebuilds from the seed, so for benchmarks only (configs/bench_3b.yaml)
    build_on_device: bool = False


@dataclass
class Config:
    output_dir: str = setting("runs/default", neutral=True)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sections(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Section)]

    def validate(self) -> None:
        """Every range, choice and rule of the config, before any model or data is loaded."""
        for section in self.sections():
            section.validate()
        dpo = self.train.objective == "dpo"
        val = (self.data.val_preferences if dpo else self.data.val_manifest) or self.data.val_fraction
        if self.eval.every and not val:
            first = "data.val_preferences" if dpo else "data.val_manifest"
            raise ConfigError(f"eval.every needs a validation set: {first} or data.val_fraction "
                              f"(or eval.every=0), got eval.every={self.eval.every} without either")
        if self.model.quantize != "none" and self.train.mode != "lora":
            raise ConfigError(f"model.quantize={self.model.quantize} quantises the frozen base of train.mode=lora; "
                              f"train.mode={self.train.mode} trains the base weights themselves: set "
                              f"model.quantize=none")
        self.check_objective()

    def check_objective(self) -> None:
        """The settings train.objective=dpo needs, and the ones it cannot use (one line each)."""
        d, t = self.data, self.train
        if t.objective == "sft":
            if d.preferences or d.val_preferences:
                raise ConfigError("data.preferences is read by train.objective=dpo only; this run is sft (it trains "
                                  "on data.manifest): set train.objective=dpo or leave data.preferences out")
            return
        if not d.preferences:
            raise ConfigError("train.objective=dpo needs data.preferences: DIR/pairs.jsonl as `higgs-ddp prefs build "
                              "--out DIR` writes it")
        if d.val_manifest:
            raise ConfigError("train.objective=dpo validates on preference pairs: data.val_preferences or "
                              "data.val_fraction, not data.val_manifest")


def marked_keys(mark: str, value=True, cls=Config, prefix="", section_neutral=False) -> set[str]:
    """The dotted keys whose field metadata has ``mark`` == ``value`` ("neutral": a Section's RESUME_NEUTRAL
    marks all its keys too)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sub = hints[f.name]
            keys |= marked_keys(mark, value, sub, f"{prefix}{f.name}.", section_neutral or sub.RESUME_NEUTRAL)
        elif f.metadata.get(mark) == value or (mark == "neutral" and section_neutral):
            keys.add(f"{prefix}{f.name}")
    return keys


def resume_neutral_keys() -> set[str]:
    """The keys a resume ignores: they cannot change what a step computes."""
    return marked_keys("neutral")


PATH_LISTS = marked_keys("path", "paths")  # a string is a one-item list
FREE_FORM = {"model.config"}  # nested dicts checked by the model builder, not here


def valid_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        sub = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys += valid_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _children(section: str, keys: list) -> list:
    """The names one level below ``section`` ("" is the top): its keys and its sub-sections, in order."""
    prefix = f"{section}." if section else ""
    return list(dict.fromkeys(k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)))


def unknown_key(key: str) -> ConfigError:
    """The error for a key no section has: the nearest valid names (a typo is usually a letter or two off),
    else what its section holds; never all 80 keys, which hide the one meant."""
    keys = valid_keys()
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    section, _, leaf = key.rpartition(".")
    if section and section not in sections:  # a misspelt section: the nearest one, else whole keys compared
        section = next(iter(difflib.get_close_matches(section, sorted(sections), n=1, cutoff=0.6)), None)
    if section is None:
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    else:
        names = difflib.get_close_matches(leaf, _children(section, keys), n=3, cutoff=0.6)
        near = [f"{section}.{m}" if section else m for m in names]
    near += [k for k in keys if k.rpartition(".")[2] == leaf and k not in near]  # the right name, the wrong section
    if near:
        return ConfigError(f"unknown config key {key!r}; did you mean {' or '.join(map(repr, near[:3]))}?")
    where = section or ""
    listed = ", ".join(_children(where, keys))
    return ConfigError(f"unknown config key {key!r}; " + (f"the keys of {where!r}: {listed}" if where
                                                           else f"the top level holds: {listed}"))


def _coerce(key: str, value: Any, hint) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if key in PATH_LISTS:
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"config key {key!r} must be a path or a list of paths, got {value!r}")
        return value
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(origin or hint, True)
    if not ok:
        name = getattr(origin or hint, "__name__", str(hint))
        raise ConfigError(f"config key {key!r} must be {name}, got {type(value).__name__} {value!r}")
    if hint is float:
        value = float(value)
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise unknown_key(key)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
            _apply(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hint))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        root = ".".join(key.split(".")[:2])
        if root not in FREE_FORM and key not in valid_keys() and not any(
            key.startswith(f + ".") for f in FREE_FORM
        ):
            raise unknown_key(key)
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _relative_to(base: Path, value):
    """A path in a config file is taken relative to the file when it isn't relative to the cwd."""
    if isinstance(value, list):
        return [_relative_to(base, v) for v in value]
    if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists() \
            and (base / value).exists():
        return str(base / value)
    return value


def uses_bf16(cfg: Config, device: str) -> bool:
    """Whether a run on ``device`` ("cuda" or "cpu") computes under bf16 autocast with a bf16 frozen base:
    train.precision=bf16 anywhere, "auto" on a GPU only. Every part of the run asks this one function
    (runtime/precision.py makes the autocast from it)."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device == "cuda")


def check_machine(cfg: Config, device: str) -> None:
    """What the config asks of the machine (``device``: "cuda" or "cpu"). The run checks it before it builds
    the model; the doctor checks it on the machine it runs on."""
    bf16 = uses_bf16(cfg, device)
    if cfg.train.parallel == "fsdp" and cfg.train.fsdp.cpu_offload and device != "cuda":
        raise ConfigError("train.fsdp.cpu_offload=true needs GPUs (it moves the shards from GPU to host memory); "
                          "on CPU they are in host memory already: set it to false")
    if cfg.model.quantize == "nf4" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("model.quantize=nf4 needs the torchao package, which is not installed: "
                          "pip install torchao==0.18.0, or set model.quantize=none")
    if cfg.train.optimizer == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("train.optimizer=adamw8bit needs torchao, which is not installed: pip install "
                          "torchao==0.18.0, or use train.optimizer=adamw")
    if cfg.train.optimizer == "adamw8bit" and device not in ("cuda", "cpu"):
        raise ConfigError(f"train.optimizer=adamw8bit runs on a CUDA GPU or the CPU, not {device}; "
                          f"use train.optimizer=adamw")
    if cfg.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package, which is "
                              "not installed: pip install flash-attn, or use sdpa")
        if device != "cuda":
            raise ConfigError("model.attn_implementation=flash_attention_2 needs a GPU; use sdpa on CPU")
        if not bf16:  # flash-attn computes in fp16/bf16 only; fp32 weights without autocast give it fp32
            raise ConfigError("model.attn_implementation=flash_attention_2 needs bf16: train.precision=auto or "
                              "bf16, not fp32")


def check_lora_targets(cfg: Config, module_names) -> None:
    """Each lora.target_modules entry names a module of the model (as peft matches it: the whole name or a
    dotted suffix). The run checks the model it built; the doctor a copy built on the meta device."""
    if cfg.train.mode != "lora":
        return
    names = list(module_names)
    for target in cfg.lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(f"lora.target_modules entry {target!r} matches no module of the model")


def _yaml_error(path: str, e: yaml.YAMLError) -> str:
    """One line with the file, line and column of a YAML syntax error (PyYAML spreads them over several)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"{path}: invalid YAML: {str(e).splitlines()[0]}"
    problem = getattr(e, "problem", None) or "syntax error"
    context, where = getattr(e, "context", None), getattr(e, "context_mark", None)
    started = f" ({context} at line {where.line + 1}, column {where.column + 1})" if context and where else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}{started}"


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(path, e)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        base = p.parent
        for key in marked_keys("path", "path") | PATH_LISTS:
            *sections, name = key.split(".")
            section = data
            for part in sections:
                section = section.get(part) if isinstance(section, dict) else None
            if isinstance(section, dict) and isinstance(section.get(name), (str, list)):
                section[name] = _relative_to(base, section[name])
        prompts = (data.get("eval") or {}).get("prompts") if isinstance(data.get("eval"), dict) else None
        for prompt in prompts if isinstance(prompts, list) else []:
            for key in EvalConfig.PROMPT_PATHS if isinstance(prompt, dict) else ():
                if isinstance(prompt.get(key), str):
                    prompt[key] = _relative_to(base, prompt[key])
    data = _merge(data, parse_overrides(list(overrides)))
    cfg = Config()
    _apply(cfg, data)
    cfg.validate()
    cfg.model.revision = pinned_revision(cfg.model.path, cfg.model.revision)
    cfg.data.codec_revision = pinned_revision(cfg.data.codec, cfg.data.codec_revision)
    return cfg
