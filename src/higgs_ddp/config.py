"""Typed run configuration: YAML file + dotted ``key=value`` overrides, checked against dataclasses.

An unknown key or a value of the wrong type is a ``ConfigError`` that names the key and lists the
valid ones; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

OFFICIAL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
# The hub repo was rewritten for transformers>=5.3; this revision is the format boson_multimodal loads.
OFFICIAL_REVISION = "10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84"

DEFAULT_LORA_TARGETS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",  # attention
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",  # text FFN
    "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj",  # audio FFN (DualFFN)
]


OFFICIAL_CODEC = "bosonai/higgs-audio-v2-tokenizer"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    path: Optional[str] = None  # hub id or local folder of a boson_multimodal-format checkpoint
    revision: Optional[str] = None  # defaults to OFFICIAL_REVISION for the official repo
    init: str = "pretrained"  # "pretrained" | "random" (random weights from `config`)
    config: Optional[dict] = None  # inline HiggsAudioConfig kwargs, for init=random
    tokenizer: Optional[str] = None  # path/hub id; "tiny" builds the offline byte tokenizer
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    manifest: list = field(default_factory=list)  # JSONL file(s), one sample per line; a string is one file
    val_manifest: list = field(default_factory=list)  # validation manifest(s)
    val_fraction: float = 0.0  # or: this fraction of the training samples (chosen by a hash of the id)
    on_error: str = "error"  # "error": stop with the full list | "skip": count, report, train on the rest
    max_audio_seconds: float = 30.0
    max_tokens_per_batch: int = 0  # > 0: length-aware micro-batches by padded token budget
    root: Optional[str] = None  # dataset root for allow_outside_root (default: each manifest's folder)
    allow_outside_root: bool = True
    codec: str = OFFICIAL_CODEC  # audio tokenizer: hub id, local folder, or "tiny" (random, for demos)
    codec_revision: Optional[str] = None
    cache_dir: Optional[str] = None  # code cache (default: .higgs_codes next to the first manifest)
    shuffle: bool = True
    num_workers: int = 2
    prefetch_factor: int = 4


@dataclass
class FsdpSettings:  # train.parallel=fsdp (see parallel.py)
    mixed_precision: str = "autocast"  # "autocast": fp32 weights gathered, bf16 autocast as under DDP (same
    #   numerics) | "bf16": FSDP's MixedPrecisionPolicy, weights gathered in bf16, gradients reduced in fp32
    cpu_offload: bool = False  # keep the sharded weights, gradients and AdamW state in host memory


@dataclass
class TrainConfig:
    mode: str = "lora"  # "lora" | "audio_ffn" | "full"
    max_steps: int = 1000
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0
    seed: int = 1234
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    text_weight: float = 1.0
    audio_weight: float = 1.0
    loss_alignment: str = "auto"  # "auto" | "shifted" | "aligned" (see dual_loss.py)
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    find_unused_parameters: bool = False
    log_every: int = 1
    save_every: int = 500  # optimizer steps between checkpoints (0: only at the end and when stopped)
    keep_last: int = 3  # complete checkpoints kept (0: all)
    resume: str = "auto"  # "auto": from the latest checkpoint in output_dir, if any | "never" | a checkpoint path
    resume_accept: list = field(default_factory=list)  # differences from the checkpoint to accept, e.g. [train.lr]
    # Speed and memory (see perf.py and BENCHMARKS.md); none of them changes the loss or the gradients.
    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute
    text_logits: str = "supervised"  # "supervised": text head only where a text target is supervised | "all"
    text_logits_chunk: int = 4096  # rows of text logits computed (and kept for backward) at a time; 0: all
    compile: bool = False  # torch.compile each decoder layer
    parallel: str = "ddp"  # "ddp": a replica per rank | "fsdp": weights, gradients and optimizer sharded (FSDP2)
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between validations (0: only at the end); needs a validation set
    max_batches: int = 0  # micro-batches per rank per validation (0: the whole validation set)
    samples_every: int = 0  # optimizer steps between listening samples (0: with every validation)
    prompts: list = field(default_factory=list)  # [{text, reference_audio?, reference_text?}] spoken at each sample
    max_audio_seconds: float = 10.0  # a sample that reaches this without the stream EOS is reported
    temperature: float = 0.7
    seed: int = 0  # generation seed: the same prompt gives comparable samples from step to step


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write every metric (and the listening samples) to {output_dir}/tensorboard


@dataclass
class BenchConfig:  # python -m higgs_ddp.bench: random samples of one length, no data needed
    seq_len: int = 2048  # positions per sample (text + expanded audio)
    audio_fraction: float = 0.85  # share of them that is audio (speech: ~25 frames/s, a few text tokens/s)
    samples: int = 256
    warmup_steps: int = 3
    steps: int = 10
    peer: bool = True  # also time the transformers.Trainer loop of the public Higgs trainers, side by side
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0: look the GPU up in a table
    find_largest_micro_batch: bool = False  # GPU: double the micro-batch until out of memory


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.init": ("pretrained", "random"),
    "train.mode": ("lora", "audio_ffn", "full"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.loss_alignment": ("auto", "shifted", "aligned"),
    "train.text_logits": ("supervised", "all"),
    "train.parallel": ("ddp", "fsdp"),
    "train.fsdp.mixed_precision": ("autocast", "bf16"),
    "data.on_error": ("error", "skip"),
}
PATH_LISTS = {"data.manifest", "data.val_manifest"}  # a string is a one-item list
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
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key {key!r} must be one of {list(CHOICES[key])}, got {value!r}")
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
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
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
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


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        base = p.parent
        section = data.get("data") if isinstance(data.get("data"), dict) else {}
        for key in ("manifest", "val_manifest", "cache_dir", "codec", "root"):
            if isinstance(section.get(key), (str, list)):
                section[key] = _relative_to(base, section[key])
        prompts = (data.get("eval") or {}).get("prompts") if isinstance(data.get("eval"), dict) else None
        for prompt in prompts if isinstance(prompts, list) else []:
            if isinstance(prompt, dict) and isinstance(prompt.get("reference_audio"), str):
                prompt["reference_audio"] = _relative_to(base, prompt["reference_audio"])
    data = _merge(data, parse_overrides(list(overrides)))
    cfg = Config()
    _apply(cfg, data)
    if cfg.model.init == "random" and not cfg.model.config:
        raise ConfigError("model.init=random needs an inline model.config (HiggsAudioConfig fields)")
    if cfg.model.init == "pretrained" and not cfg.model.path:
        raise ConfigError("model.path is required for model.init=pretrained")
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "train.max_steps"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1")
    if cfg.eval.every < 0 or cfg.eval.max_batches < 0 or cfg.eval.samples_every < 0:
        raise ConfigError("eval.every, eval.max_batches and eval.samples_every must be >= 0")
    for i, prompt in enumerate(cfg.eval.prompts):
        if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str) or not prompt["text"].strip() \
                or set(prompt) - {"text", "reference_audio", "reference_text"}:
            raise ConfigError(f"eval.prompts[{i}] must be a mapping with a non-empty text and optionally "
                              f"reference_audio and reference_text, got {prompt!r}")
    if cfg.train.text_logits_chunk < 0:
        raise ConfigError("train.text_logits_chunk must be >= 0 (0: all rows at once)")
    if cfg.train.save_every < 0 or cfg.train.keep_last < 0:
        raise ConfigError("train.save_every and train.keep_last must be >= 0 (0: at the end only / keep all)")
    if not cfg.train.resume:
        raise ConfigError("train.resume must be auto, never or a checkpoint folder")
    if cfg.data.val_manifest and cfg.data.val_fraction:
        raise ConfigError("give data.val_manifest or data.val_fraction, not both")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError("config key 'data.val_fraction' must be in [0, 1)")
    if cfg.data.max_tokens_per_batch < 0 or cfg.data.max_audio_seconds < 0:
        raise ConfigError("data.max_tokens_per_batch and data.max_audio_seconds must be >= 0 (0: no limit)")
    if cfg.model.revision is None and cfg.model.path == OFFICIAL_REPO:
        cfg.model.revision = OFFICIAL_REVISION
    return cfg
