"""Checkpoint sizing (``Dims``, ``OFFICIAL_DIMS``), free disk space and what output_dir already holds."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from higgs_ddp.tools.doctor.result import FAIL, OK, WARN, Result
from higgs_ddp.tools.doctor.sources import _cached, _is_local

# When a pretrained model's config.json is neither local nor cached, its size is taken to be the official
# model's: Llama-3.2-3B with a DualFFN audio path in all 28 layers, 8 codebooks of 1024 (5.77B parameters).
OFFICIAL_DIMS = {
    "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": list(range(28)),
    "audio_num_codebooks": 8, "audio_codebook_size": 1024,
    "text_config": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                    "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256},
}
BYTES_PER_TRAINABLE = 4 * 3  # fp32 weights + AdamW's two fp32 moments


@dataclass
class Dims:
    """What the parameter count depends on, from a HiggsAudioConfig dict (model.config or config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attention_bias: bool
    mlp_bias: bool
    dual_layers: list
    audio_attention: bool
    audio_vocab: int  # codebooks x (codebook size + stream BOS/EOS)

    @classmethod
    def from_config(cls, raw: dict) -> "Dims":
        from transformers import LlamaConfig

        text = LlamaConfig(**dict(raw.get("text_config") or {}))
        if not (raw.get("text_config") or {}).get("vocab_size"):
            text.vocab_size = 128256  # the Llama-3 tokenizer the real model uses
        adapter = raw.get("audio_adapter_type", "stack")
        dual = sorted(raw.get("audio_dual_ffn_layers") or []) if adapter.startswith("dual_ffn") else []
        return cls(
            hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size, attention_bias=bool(getattr(text, "attention_bias", False)),
            mlp_bias=bool(getattr(text, "mlp_bias", False)),
            dual_layers=[i for i in dual if 0 <= i < text.num_hidden_layers],
            audio_attention=adapter == "dual_ffn" and bool(raw.get("use_audio_out_self_attention")),
            audio_vocab=int(raw.get("audio_num_codebooks", 12)) * (int(raw.get("audio_codebook_size", 1024)) + 2),
        )

    def linears(self) -> list:
        """(module name, in, out, bias) of every Linear in the decoder layers, the way the model names them."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)]
        mlp = [("gate_proj", h, self.intermediate), ("up_proj", h, self.intermediate),
               ("down_proj", self.intermediate, h)]
        out = []
        for i in range(self.layers):
            parts = [("self_attn", attn, self.attention_bias), ("mlp", mlp, self.mlp_bias)]
            if i in self.dual_layers:
                parts.append(("audio_mlp", mlp, self.mlp_bias))
                if self.audio_attention:
                    parts.append(("audio_attn", attn, self.attention_bias))
            for block, mods, bias in parts:
                out += [(f"layers.{i}.{block}.{name}", n_in, n_out, bias) for name, n_in, n_out in mods]
        out += [("audio_decoder_proj.text_lm_head", h, self.vocab, False),
                ("audio_decoder_proj.audio_lm_head", h, self.audio_vocab, False)]
        return out

    def audio_norms(self) -> int:
        return len(self.dual_layers) * self.hidden * (3 if self.audio_attention else 2)

    def count(self, mode: str, lora_targets: list = (), lora_r: int = 0) -> int:
        """Trainable parameters under train.mode (the Whisper audio tower, always frozen, is left out)."""
        lin = self.linears()
        if mode == "lora":
            def hit(name):
                return any(name == t or name.endswith("." + t) for t in lora_targets)
            return sum(lora_r * (n_in + n_out) for name, n_in, n_out, _ in lin if hit(name))
        if mode == "audio_ffn":
            return sum(n_in * n_out + (n_out if b else 0) for name, n_in, n_out, b in lin
                       if name.startswith("layers.") and ".audio_" in name) + self.audio_norms()
        weights = sum(n_in * n_out + (n_out if b else 0) for _, n_in, n_out, b in lin)
        embeddings = (self.vocab + self.audio_vocab) * self.hidden
        norms = self.layers * 2 * self.hidden + self.hidden + self.audio_norms()
        return weights + embeddings + norms


def _model_config_dict(cfg) -> Optional[dict]:
    """The model's config without loading it: inline for random init, else a local or cached config.json."""
    if cfg.model.init == "random":
        return dict(cfg.model.config or {})
    name = cfg.model.path
    path = Path(name).expanduser() / "config.json" if _is_local(name) else _cached(name, "config.json",
                                                                                     cfg.model.revision)
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def checkpoint_need(cfg) -> tuple[float, int, str]:
    """-> (bytes one checkpoint takes, how many exist at once at most, how the size was estimated).

    A checkpoint holds the trainable weights and AdamW's two moments, all fp32. ``train.keep_last``
    are kept and the next one is written before the oldest is deleted, but never more than the run saves."""
    t = cfg.train
    raw = _model_config_dict(cfg)
    params = Dims.from_config(raw or OFFICIAL_DIMS).count(t.mode, cfg.lora.target_modules, cfg.lora.r)
    per = params * BYTES_PER_TRAINABLE
    how = f"{params:,} trainable parameters x {BYTES_PER_TRAINABLE} B" + \
        ("" if raw is not None else ", sized as the official 3B model: its config is not cached")
    saves = math.ceil(t.max_steps / t.save_every) if t.save_every else 1
    count = min(t.keep_last + 1, saves) if t.keep_last else saves
    return per, count, how


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e9:.4f} GB"


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cfg, need_bytes: Optional[float] = None) -> Result:
    """Free space where the checkpoints go against what they will take (``need_bytes`` overrides the
    estimate). Less than needed is a FAIL (the run dies at a save); less than twice that is a WARN."""
    out_dir = Path(cfg.output_dir)
    where = _existing_parent(out_dir)
    if not os.access(where, os.W_OK):
        return Result(FAIL, f"output_dir {cfg.output_dir}: {where} is not writable: choose another output_dir")
    if need_bytes is None:
        per, count, how = checkpoint_need(cfg)
        final = per / 3  # output_dir/final: the trainable weights without the optimizer state
        need_bytes = per * count + final
        detail = f"{count:,} checkpoint{'s' * (count > 1)} of {_gb(per)} ({how}) + final weights"
    else:
        detail = "as given"
    free = shutil.disk_usage(where).free
    shown = f"{_gb(free)} free at {where}, checkpoints need about {_gb(need_bytes)} ({detail})"
    if free < need_bytes:
        return Result(FAIL, f"disk: {shown}: free space, point output_dir at a larger disk, or lower train.keep_last")
    if free < 2 * need_bytes:
        return Result(WARN, f"disk: {shown}: little room for logs, samples and anything else on that disk")
    return Result(OK, f"disk: {shown}")
