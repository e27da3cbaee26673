"""Building the model (pretrained or random-initialised HiggsAudioModel), choosing what trains, and the
module DDP wraps.

DDP only all-reduces gradients when its own ``forward`` runs, so calling ``ddp.module(...)`` silently
trains each rank on its own data. ``HiggsForward`` is the module DDP wraps: its forward unwraps peft
(``base_model.model``) and calls the raw HiggsAudioModel with a whitelisted set of inputs, so the call
goes ``ddp(...) -> HiggsForward.forward -> HiggsAudioModel.forward`` and DDP's hooks stay in place.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from higgs_ddp.config import Config, ConfigError, check_lora_targets
from higgs_ddp.errors import error_line
from higgs_ddp.runtime.lean_imports import peft_probes_torchao_only_when_loaded, trim_transformers

SPECIAL_IDS = {  # HiggsAudioConfig field -> token it must name in the tokenizer
    "audio_in_token_idx": "<|AUDIO|>",
    "audio_out_token_idx": "<|AUDIO_OUT|>",
    "audio_out_bos_token_id": "<|audio_out_bos|>",
    "audio_eos_token_id": "<|audio_eos|>",
    "pad_token_id": "<|end_of_text|>",
}


def _import_higgs():
    # peft 0.21 touches torch.distributed.tensor, which torch only imports lazily.
    import torch.distributed.tensor  # noqa: F401

    trim_transformers()
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
    return HiggsAudioConfig, HiggsAudioModel


@contextlib.contextmanager
def _loading(key: str, name: str):
    """transformers and the hub raise OSError, over several lines, for a model or tokenizer that is not there
    (offline, a typo, no access): the setting that named it, in one line."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"{key}={name} cannot be loaded: {error_line(e)}") from None


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer

    name = cfg.model.tokenizer or cfg.model.path
    if name == "tiny":  # as wide as the model's text head: padded with reserved tokens
        return build_tiny_tokenizer(vocab_size=(cfg.model.config.get("text_config") or {}).get("vocab_size"))
    if not name:
        raise ConfigError("model.tokenizer is required when model.path is not set")
    rev = cfg.model.revision if name == cfg.model.path else None
    with _loading("model.tokenizer" if cfg.model.tokenizer else "model.path", name):
        return AutoTokenizer.from_pretrained(name, revision=rev)


def _random_config(cfg: Config, tokenizer):
    HiggsAudioConfig, _ = _import_higgs()
    from transformers import LlamaConfig

    raw = dict(cfg.model.config)
    # init_std is not a named argument but HiggsAudioPreTrainedModel._init_weights reads it.
    allowed = set(inspect.signature(HiggsAudioConfig.__init__).parameters) - {"self", "kwargs"} | {"init_std"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown model.config key(s) {unknown}; valid: {sorted(allowed)}")
    text = dict(raw.get("text_config") or {})
    text_allowed = set(LlamaConfig().to_dict()) | set(inspect.signature(LlamaConfig.__init__).parameters)
    bad = sorted(set(text) - text_allowed)
    if bad:
        raise ConfigError(f"unknown model.config.text_config key(s) {bad}")
    text.setdefault("vocab_size", len(tokenizer))
    raw["text_config"] = text
    raw.setdefault("skip_audio_tower", True)
    for field, token in SPECIAL_IDS.items():
        raw.setdefault(field, tokenizer.convert_tokens_to_ids(token))
    return HiggsAudioConfig(**raw)


def model_config(cfg: Config, tokenizer):
    """The HiggsAudioConfig a run will use, without building or loading any weights."""
    HiggsAudioConfig, _ = _import_higgs()
    if cfg.model.init == "random":
        return _random_config(cfg, tokenizer)
    with _loading("model.path", cfg.model.path):
        return HiggsAudioConfig.from_pretrained(cfg.model.path, revision=cfg.model.revision)


def check_tokenizer(model_config, tokenizer) -> None:
    """The model's text vocabulary is the tokenizer's, and so are the special-token ids baked into its config.
    A smaller head cannot embed every token; a larger one samples ids the tokenizer lacks, which the
    inference engine refuses mid-generation. (The official model: 128,256 and Llama-3's 128,256 tokens.)"""
    vocab = model_config.text_config.vocab_size
    if vocab != len(tokenizer):
        raise ConfigError(f"the model has a text vocabulary of {vocab} tokens but the tokenizer has "
                          f"{len(tokenizer)}; model.config.text_config.vocab_size (random init) or "
                          f"model.tokenizer must change")
    for field, token in SPECIAL_IDS.items():
        want, got = getattr(model_config, field), tokenizer.convert_tokens_to_ids(token)
        if field != "pad_token_id" and want != got:
            raise ConfigError(f"model config {field}={want} but the tokenizer maps {token} to {got}")


def build_model(cfg: Config, tokenizer, dtype: torch.dtype = torch.float32, device=None):
    HiggsAudioConfig, HiggsAudioModel = _import_higgs()
    config = model_config(cfg, tokenizer)
    check_tokenizer(config, tokenizer)  # before loading or drawing billions of weights
    if cfg.model.init == "random":
        config._attn_implementation = cfg.model.attn_implementation
        # The same seed on every rank; DDP also broadcasts rank 0's weights when it wraps the model.
        torch.manual_seed(cfg.train.seed)
        # Drawn by the CPU generator whatever the device: export rebuilds this base on the CPU from the seed,
        # and the CUDA generator would draw another one (the merge would land on it). The price is the
        # CPU's time to draw them: noticeable only for a billions-of-weights random model (the benchmark).
        # bench.build_on_device: drawn where it will run, by that device's generator (another draw than the
        # CPU's: a benchmark's weights are never exported), never held on the CPU at all, and drawn in the run's
        # dtype: the peak is the bf16 model (11.6 GB for 5.8B), not an fp32 one cast afterwards (23 GB).
        on_device = device is not None and cfg.bench.build_on_device
        with torch.device(device if on_device else "cpu"), _default_dtype(dtype if on_device else torch.float32):
            model = HiggsAudioModel(config).to(dtype)
        if device is not None:
            model = model.to(device)
    else:
        with _loading("model.path", cfg.model.path):
            model = HiggsAudioModel.from_pretrained(cfg.model.path, revision=cfg.model.revision, torch_dtype=dtype,
                                                    attn_implementation=cfg.model.attn_implementation)
    if model.audio_tower is not None:  # audio understanding only; TTS fine-tuning never runs it
        model.audio_tower.requires_grad_(False)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Factory functions make ``dtype`` tensors meanwhile (as transformers' ``torch_dtype`` does): the model's own
    initialisation then draws its weights in it. Its buffers that name their dtype (the rotary frequencies) keep it
    until the model's ``.to(dtype)``, as in the fp32 build."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def apply_training_mode(model, cfg: Config):
    """Freeze / wrap according to train.mode; returns the model to train (a PeftModel for lora)."""
    mode = cfg.train.mode
    if mode == "full":
        model.requires_grad_(True)
        if model.audio_tower is not None:
            model.audio_tower.requires_grad_(False)
        return model
    model.requires_grad_(False)
    if mode == "audio_ffn":
        n = 0
        for name, p in model.named_parameters():
            # The DualFFN audio path of each layer: audio_mlp, audio layer norms (and audio_attn if any).
            if name.startswith("layers.") and ".audio_" in name:
                p.requires_grad_(True)
                n += 1
        if n == 0:
            raise ConfigError("train.mode=audio_ffn but the model has no DualFFN audio layers")
        return model
    from peft import LoraConfig, get_peft_model

    check_lora_targets(cfg, (n for n, _ in model.named_modules()))
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none")
    peft_probes_torchao_only_when_loaded()
    return get_peft_model(model, lora)


def build_for_training(cfg: Config, tokenizer, dtype: torch.dtype, device=None, base=None,
                       quantize: bool = True) -> nn.Module:
    """The model a run trains: built, wrapped for train.mode, with the trainable weights in fp32 (under bf16
    autocast too) so that their updates and AdamW state keep full precision. ``base``: the HiggsAudioModel to
    start from instead of ``build_model``'s (train.init_from: an earlier fine-tune merged into its base). With
    model.quantize=nf4 (and ``quantize``) the frozen decoder-layer linears and the text head are then stored in NF4
    (quantize.py); export passes ``quantize=False``: it merges into the full-precision base."""
    if base is None:
        base = build_model(cfg, tokenizer, dtype=dtype, device=device)
    else:
        torch.manual_seed(cfg.train.seed)  # the new adapter's init, whatever building the base drew
    model = apply_training_mode(base, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if quantize and cfg.model.quantize == "nf4":
        from higgs_ddp.quantize import quantize_base

        quantize_base(unwrap(model), device)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """DDP -> HiggsForward -> PeftModel -> raw HiggsAudioModel."""
    from peft import PeftModel

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, HiggsForward):
        model = model.model
    if isinstance(model, PeftModel):
        model = model.base_model.model
    return model


def text_head(raw_model: nn.Module) -> nn.Module:
    return raw_model.audio_decoder_proj.text_lm_head


@contextlib.contextmanager
def deferred_text_head(raw_model: nn.Module):
    """While active, the text head returns its input: the model's ``logits`` are the final hidden states.

    The model applies its 128,256-way text head to every position, audio positions included, although only
    a handful of text positions are ever supervised in TTS; ``dual_loss`` applies it to those rows only."""
    head = text_head(raw_model)
    head.forward = _identity
    try:
        yield head
    finally:
        del head.forward  # back to the class's forward


def _identity(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


class HiggsForward(nn.Module):
    """The module DDP wraps. Its forward is where peft is unwrapped, so DDP's forward still runs.

    With ``defer_text_head`` the model's text head is bypassed (deferred_text_head) and the output
    holds ``text_hidden`` (B, T, H) instead of ``logits`` (B, T, V): the loss applies the head only to
    the rows it scores."""

    def __init__(self, model: nn.Module, defer_text_head: bool = False):
        super().__init__()
        self.model = model  # HiggsAudioModel or a PeftModel around it
        self.defer_text_head = defer_text_head
        _, HiggsAudioModel = _import_higgs()
        accepted = set(inspect.signature(HiggsAudioModel.forward).parameters)
        from higgs_ddp.data.collator import Batch
        missing = set(Batch.MODEL_INPUTS) - accepted
        assert not missing, f"HiggsAudioModel.forward does not take {missing}"

    def forward(self, **inputs) -> dict:
        from higgs_ddp.data.collator import Batch
        extra = set(inputs) - set(Batch.MODEL_INPUTS)
        if extra:
            raise TypeError(f"not a HiggsAudioModel input: {sorted(extra)}")
        raw = unwrap(self.model)
        with deferred_text_head(raw) if self.defer_text_head else contextlib.nullcontext():
            out = raw(**inputs, use_cache=False, return_dict=True)
        # A plain dict of tensors: DDP walks the output to find what backward will reach.
        text = {"text_hidden": out.logits} if self.defer_text_head else {"logits": out.logits}
        return {**text, "audio_logits": out.audio_logits + _unused_audio_embedding(raw, inputs),
                "expanded_labels": out.expanded_labels, "expanded_input_ids": out.expanded_input_ids}


def _unused_audio_embedding(raw: nn.Module, inputs: dict) -> torch.Tensor:
    """0, connected to the audio codebook embeddings when this batch has no audio codes at all.

    A batch whose turns are all text embeds no audio code, so ``audio_codebook_embeddings`` would get no
    gradient while a rank with audio gets one: DDP (without find_unused_parameters) and FSDP2 need every
    rank to produce the same set of gradients on every backward. An empty slice backpropagates an exact
    zero gradient, so the update is the one the batch asks for. Every other trainable weight is reached
    by a text-only batch already (measured: tests/unit/model/test_mixed_turns.py checks all of them)."""
    codes = [inputs.get("audio_in_ids"), inputs.get("audio_out_ids")]
    if any(c is not None and c.numel() > 0 for c in codes):
        return torch.zeros((), device=raw.audio_codebook_embeddings.weight.device)
    return raw.audio_codebook_embeddings.weight[:0].sum()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
