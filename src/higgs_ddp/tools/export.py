"""Export trained weights: as they are, or merged into a full model folder.

    higgs-ddp export --checkpoint DIR --out OUT [--merge] [--dtype auto|bf16|fp32]

DIR is a run's output_dir (its final/ once the run finished, else its latest checkpoint), a checkpoint
folder, a run's final/ or best/, or an unmerged export: found as ``speak`` finds them (tools/weights.py),
and a checkpoint's weights are checked against the checksums saved with them first, as a resume checks
them. A checkpoint folder holds ``config.yaml`` (the resolved run config) and either ``adapter/``
(train.mode=lora, peft's format) or ``trainable.safetensors`` (audio_ffn / full: raw HiggsAudioModel
parameter names); final/ and best/ hold the same files at their top, the run's config.yaml beside them.
Without --merge the weights are copied with the tokenizer and an ``export.json`` provenance record. With
--merge the base model is rebuilt from the config exactly as training builds it, the trained weights are
loaded (every tensor must find its parameter) and merged, and OUT becomes a folder that
``HiggsAudioModel.from_pretrained`` and boson_multimodal's ``HiggsAudioServeEngine`` load as they are. Every
export carries the run's ``config.yaml`` (``higgs-ddp speak`` reads the codec there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from higgs_ddp.config import Config, ConfigError
from higgs_ddp.errors import HiggsError, report
from higgs_ddp.runtime.files import atomic_folder
from higgs_ddp.tools.weights import ModelPathError, Trained, trained_weights
from higgs_ddp.runtime.layout import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CONFIG, EXPORT_RECORD, TRAINABLE

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ExportError(HiggsError, RuntimeError):
    pass


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise ExportError(f"cannot read {path}: {e}") from None


def _check_keys(what: str, missing: list, unexpected: list) -> None:
    # A renamed module or a config drift would otherwise export the base weights unchanged, silently.
    if missing or unexpected:
        raise ExportError(f"{what} do not match the model rebuilt from config.yaml: "
                          f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                          f"(e.g. {unexpected[:2]})")


def merged_model(ckpt: Path, cfg: Config, tokenizer, dtype: torch.dtype = torch.float32,
                 adapter: Optional[Path] = None):
    """Base + trained weights as one plain HiggsAudioModel in ``dtype``, each weight rounded once. ``ckpt``
    holds ``trainable.safetensors`` or (train.mode=lora) ``adapter/``; ``adapter``: the PEFT adapter folder
    when it is elsewhere (a run's ``final/``, an unmerged export: the adapter files at their top).

    The base is built in ``dtype`` (bf16: 2 bytes per weight, 11.5 GB for the 5.8B model where fp32 would
    need 23 GB and then a cast), the adapter kept in fp32, and each LoRA delta added to its base weight in
    fp32 before the one rounding to ``dtype``: the same bits as merging in fp32 and casting after. (peft's
    own merge rounds the delta to the base's dtype first, then the sum: two roundings.) Trained audio_ffn /
    full weights are fp32 in the checkpoint and rounded once as they are copied in."""
    from higgs_ddp.model import apply_training_mode, build_for_training

    if cfg.train.mode == "lora":
        from peft import set_peft_model_state_dict

        # the base in dtype, the adapter in fp32
        model = build_for_training(cfg, tokenizer, dtype, base=base_model(cfg, tokenizer, dtype))
        adapter = ckpt / ADAPTER_DIR if adapter is None else adapter
        saved = json.loads((adapter / ADAPTER_CONFIG).read_text())
        want = {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "target_modules": sorted(cfg.lora.target_modules)}
        got = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
               "target_modules": sorted(saved.get("target_modules") or [])}
        if got != want:  # the scale alpha/r is not in the tensors: a mismatch would merge silently wrong
            raise ExportError(f"adapter_config.json {got} disagrees with config.yaml's lora section {want}")
        state = _load_safetensors(adapter / ADAPTER_WEIGHTS)
        try:
            result = set_peft_model_state_dict(model, state)
        except RuntimeError as e:  # shape mismatches
            raise ExportError(f"the adapter does not fit the model: {str(e).splitlines()[-1].strip()}") from None
        missing = [k for k in result.missing_keys if "lora_" in k]
        _check_keys("the adapter tensors", missing, list(result.unexpected_keys))
        return merge_lora_once(model)
    from safetensors import safe_open

    model = apply_training_mode(base_model(cfg, tokenizer, dtype), cfg)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    path = ckpt / TRAINABLE
    try:  # one tensor at a time: a full fine-tune's file is as large as the model itself
        with safe_open(str(path), "pt") as f, torch.no_grad():
            keys = set(f.keys())
            _check_keys("the trainable tensors", sorted(trainable - keys), sorted(keys - set(params)))
            for name in keys:
                value = f.get_tensor(name)
                if params[name].shape != value.shape:
                    raise ExportError(f"{name}: shape {tuple(value.shape)} in the checkpoint, "
                                      f"{tuple(params[name].shape)} in the model")
                params[name].copy_(value)
    except (ExportError, OSError):
        raise
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise ExportError(f"cannot read {path}: {e}") from None
    return model


def base_model(cfg: Config, tokenizer, dtype: torch.dtype = torch.float32):
    """The HiggsAudioModel a run's trained weights apply to: the config's model, or with train.init_from the
    earlier fine-tune it started from, merged into its own base (recursively: that one may have started from
    another). Training builds its base here too (train.py), so export and speak rebuild exactly what trained."""
    from higgs_ddp.model import build_model

    if not cfg.train.init_from:
        return build_model(cfg, tokenizer, dtype=dtype)
    return starting_model(Path(cfg.train.init_from), cfg, tokenizer, dtype)


MODEL_KEYS = ("path", "revision", "init", "config", "tokenizer")  # what makes two runs' bases the same shape


def starting_model(path: Path, cfg: Config, tokenizer, dtype: torch.dtype):
    """train.init_from's trained weights merged into their base (as export --merge merges them), one line when
    ``path`` holds none or was trained on another model than ``cfg``'s."""
    import tempfile

    try:
        # Each process its own scratch folder: the ranks of a run all build the starting model.
        with tempfile.TemporaryDirectory(prefix="higgs-init-") as tmp, \
                trained_weights(path, Path(tmp) / "weights") as trained:
            theirs, ours = trained.cfg.model, cfg.model
            for key in MODEL_KEYS:
                if getattr(theirs, key) != getattr(ours, key):
                    raise ConfigError(f"train.init_from={path} was trained on model.{key}={getattr(theirs, key)!r}, "
                                      f"this run's is {getattr(ours, key)!r}: its weights do not fit this model")
            return merged_model(trained.folder, trained.cfg, tokenizer, dtype, adapter=trained.adapter)
    except ModelPathError as e:
        raise ConfigError(f"train.init_from: {e}" + ("; a merged model folder is a model.path"
                                                     if "merged model folder" in str(e) else "")) from None


@torch.no_grad()
def merge_lora_once(peft_model):
    """The PeftModel's LoRA deltas added into its base weights in fp32 and rounded once; the plain model."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).float()
                base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
    return peft_model.unload()  # drops the LoRA modules, keeping the base weights as they now are


def output_dtype(cfg: Config, tokenizer, choice: str) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    if cfg.model.init == "random":
        return torch.float32
    from higgs_ddp.model import model_config

    # The pretrained folder's declared dtype (bf16 for the official model), not the fp32 it was loaded in.
    dtype = model_config(cfg, tokenizer).torch_dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def export(path: Path, out: Path, merge: bool = False, dtype: str = "auto") -> str:
    """Writes OUT (all or nothing) and returns the one-line summary. ``path``: what ``speak`` takes, but a
    merged model (weights.py), a checkpoint checked as a resume checks it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} already exists and is not an empty folder")
    from higgs_ddp.runtime.shared_fs import unwritable

    why = unwritable(out.parent)  # before minutes of merging, not after
    if why:
        raise ExportError(f"--out {out} cannot be written ({why})")
    with trained_weights(path, out.parent / f".{out.name}.unsharded-{os.getpid()}") as trained:
        return _export(trained, out, merge, dtype)


def _export(trained: Trained, out: Path, merge: bool, dtype: str) -> str:
    from higgs_ddp.model import load_tokenizer

    cfg, step = trained.cfg, trained.step
    m = cfg.model
    info = {"checkpoint": str(trained.source.resolve()), "step": step,
            "mode": cfg.train.mode, "merged": merge,
            "base_model": ({"path": m.path, "revision": m.revision} if m.init == "pretrained"
                           else "random init"),
            "seed": cfg.train.seed}  # a random-init base is only reproducible from model.config + this seed
    try:
        tokenizer = load_tokenizer(cfg)
    except OSError as e:
        raise ExportError(f"cannot load the tokenizer: {str(e).splitlines()[0]}") from None
    # Built in a sibling folder and renamed at the end: a failed export leaves no half-written OUT.
    with atomic_folder(out) as tmp:
        if merge:
            target = output_dtype(cfg, tokenizer, dtype)
            model = merged_model(trained.folder, cfg, tokenizer, target, adapter=trained.adapter)
            model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="5GB")
            tokenizer.save_pretrained(str(tmp))  # the inference engine loads the tokenizer from the model path
            info["dtype"] = str(target).removeprefix("torch.")
            what = f"merged {info['dtype']} HiggsAudioModel"
        else:
            if trained.adapter is not None:  # (final/ and best/ hold their tokenizer and best.json beside it)
                shutil.copytree(trained.adapter, tmp, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("tokenizer", "best.json"))
                what = "peft adapter (load it onto the base with PeftModel.from_pretrained, or use --merge)"
            else:
                shutil.copy2(trained.folder / TRAINABLE, tmp / TRAINABLE)
                what = "trainable tensors only (--merge writes a full model folder)"
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # Rebuilding the base for unmerged weights needs the run's model section (random init: all of it);
        # higgs-ddp speak reads the codec and precision there, for a merged folder too.
        shutil.copy2(trained.config_file, tmp / CONFIG)
        (tmp / EXPORT_RECORD).write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    at = f" step {step}" if step is not None else ""
    return f"exported {cfg.train.mode} {trained.kind}{at} -> {out}: {what}, {size / 2**20:.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-ddp export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a run's output_dir (its final/ once finished, else its latest checkpoint), a checkpoint "
                             "folder, a run's final/ or best/, or an unmerged export")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--merge", action="store_true", help="write a full HiggsAudioModel folder")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="merged weights' dtype; auto: the pretrained base's (fp32 for a random init)")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out, args.merge, args.dtype), flush=True)
    except HiggsError as e:
        return report(e)
    return 0
