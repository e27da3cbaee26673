"""A trained model, ready to speak: ``load_for_inference(path)`` for whatever a run or an export left behind.

``path`` may be
* a run's ``output_dir``: its ``final/`` when the run finished (``status.json``), else its latest complete
  checkpoint (a stopped or failed run, or a finished one resumed for more steps), else ``final/``;
* a checkpoint folder (``checkpoints/step_N``), written by ddp or by fsdp (``shards/``, assembled as export
  assembles it);
* a run's ``final/`` folder (its config is the run's ``config.yaml`` next to it);
* an unmerged export (``higgs-ddp export``: a PEFT adapter or ``trainable.safetensors``, with ``config.yaml``);
* a merged export, or any folder ``HiggsAudioModel.from_pretrained`` loads (``config.json`` + weights).

Every kind ends as the same thing: base + trained weights merged into one plain ``HiggsAudioModel`` in fp32
(export's ``merged_model``, so the weights are bit for bit those of ``export --merge``), in eval mode, on the
GPU when there is one. Generation then runs under the run's precision (bf16 autocast on GPU), as the
listening samples during training do.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from higgs_ddp.config import Config, ConfigError, load_config
from higgs_ddp.tools.export import ExportError, merged_model, read_checkpoint, resolve_checkpoint, unsharded


class ModelPathError(ValueError):
    """``path`` is none of the accepted kinds, or its files cannot be used (one line)."""


@dataclass
class Loaded:
    model: torch.nn.Module  # the raw HiggsAudioModel (no peft, no wrapper), eval mode, fp32, on ``device``
    tokenizer: object
    codec: object  # data.codec.Codec of the run (data.codec), on ``device``
    cfg: Config  # the run's config (for a merged folder: model.path points at the folder)
    kind: str  # "checkpoint" | "final" | "adapter export" | "trainable export" | "merged"
    source: Path  # the folder the trained weights were read from
    step: Optional[int]  # the optimizer step they are from, when known
    device: torch.device

    def describe(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        return f"{self.kind} {self.source}{at}, train.mode={self.cfg.train.mode}, on {self.device}"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(path, device=None, codec=None) -> Loaded:
    """The model at ``path`` (any kind above), its tokenizer and codec. Raises ModelPathError (one line) when
    ``path`` is none of the accepted kinds or cannot be loaded, ValueError for a device that is not there.
    ``codec``: a Codec already loaded (comparing several checkpoints of a run), used when it is the one the
    run's config names, on ``device``."""
    from higgs_ddp.data.codec import CodecError, codec_identity, load_codec

    path = Path(path)
    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string: ..."
        raise ValueError(f"device {device!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but no GPU is visible to torch")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as the tensors placed there name it
    try:
        kind, source, model, tokenizer, cfg, step = _load_weights(path)
        if codec is None or codec.identity != codec_identity(cfg.data.codec, cfg.data.codec_revision) \
                or codec.device != device:
            codec = load_codec(cfg.data.codec, cfg.data.codec_revision, device=device)
    except (ExportError, ConfigError, CodecError) as e:
        raise ModelPathError(str(e)) from None
    except OSError as e:  # the hub / transformers: several lines, the first names the problem
        raise ModelPathError(f"cannot load {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    model.requires_grad_(False)
    return Loaded(model.to(device).eval(), tokenizer, codec, cfg, kind, source, step, device)


def model_kind(path: Path) -> str:
    """Which of the accepted kinds ``path`` is (ModelPathError if none)."""
    if not path.exists():
        raise ModelPathError(f"model path {path} not found")
    if not path.is_dir():
        raise ModelPathError(f"model path {path} is a file; give a run folder, a checkpoint, or an export folder")
    if (path / "state.json").is_file():
        return "checkpoint"
    if (path / "adapter_config.json").is_file() or (path / "trainable.safetensors").is_file():
        if (path / "config.yaml").is_file():
            return "adapter export" if (path / "adapter_config.json").is_file() else "trainable export"
        if (path.parent / "config.yaml").is_file():
            return "final"
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return "merged"
    if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "final").is_dir()):
        return "run"
    raise ModelPathError(f"model path {path} is none of: a run folder (config.yaml with checkpoints/ or final/), "
                         f"a checkpoint (state.json), a run's final/, an export folder (adapter_config.json or "
                         f"trainable.safetensors with config.yaml), a model folder (config.json + weights)")


def run_weights(run: Path) -> Path:
    """A run folder's ``final/`` if the run finished, else its latest complete checkpoint, else ``final/``."""
    from higgs_ddp.training.checkpoint import latest_checkpoint

    final = run / "final"
    try:
        finished = json.loads((run / "status.json").read_text()).get("state") == "finished"
    except (OSError, ValueError, AttributeError):
        finished = False
    if finished and final.is_dir():
        return final
    latest = latest_checkpoint(run)
    if latest is not None:
        return latest
    if final.is_dir():
        return final
    raise ModelPathError(f"{run} holds no complete checkpoint and no final/ (has the run saved anything yet?)")


def _config(file: Path, *overrides: str) -> Config:
    try:
        return load_config(str(file), list(overrides))
    except ConfigError as e:
        raise ModelPathError(f"{file}: {e}") from None


def _tokenizer(cfg: Config, folder: Optional[Path]):
    """The tokenizer saved with the weights (final/ and exports carry one), else the run's."""
    from higgs_ddp.model import load_tokenizer

    if folder is not None and (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    return load_tokenizer(cfg)


def _step(source: Path, kind: str) -> Optional[int]:
    from higgs_ddp.training.checkpoint import CheckpointError, read_state, step_of

    if kind == "checkpoint":
        try:
            return read_state(source)["step"]
        except (CheckpointError, KeyError):
            return step_of(source)
    if (source / "best.json").is_file():  # a run's best/ (eval.best_by): the step it was kept at
        record = source / "best.json"
    else:
        record = source.parent / "status.json" if kind == "final" else source / "export.json"
    try:
        return json.loads(record.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def _load_weights(path: Path):
    """-> (kind, source folder, fp32 model, tokenizer, cfg, step)."""
    kind = model_kind(path)
    if kind == "run":
        path = run_weights(path)
        kind = model_kind(path)
    if kind == "final" and (path.parent / "state.json").is_file():  # a checkpoint's adapter/ folder
        path, kind = path.parent, "checkpoint"
    if kind == "checkpoint":
        ckpt = resolve_checkpoint(path)
        with tempfile.TemporaryDirectory(prefix="higgs-ddp-load-") as tmp, \
                unsharded(ckpt, Path(tmp) / "view") as view:  # fsdp shards assembled, as export does
            cfg = read_checkpoint(view)
            tokenizer = _tokenizer(cfg, None)
            model = merged_model(view, cfg, tokenizer)
        return kind, ckpt, model, tokenizer, cfg, _step(ckpt, kind)
    if kind == "merged":
        return kind, path, *_load_merged(path), _step(path, kind)
    cfg = _config(path / "config.yaml" if kind != "final" else path.parent / "config.yaml")
    tokenizer = _tokenizer(cfg, path / "tokenizer")
    lora = (path / "adapter_config.json").is_file()
    if lora != (cfg.train.mode == "lora"):
        raise ModelPathError(f"{path} holds {'an adapter' if lora else 'trainable tensors'} but its config says "
                             f"train.mode={cfg.train.mode}")
    model = merged_model(path, cfg, tokenizer, adapter=path if lora else None)
    return kind, path, model, tokenizer, cfg, _step(path, kind)


def _load_merged(path: Path):
    """A full model folder: the run's config.yaml (export writes it) for the codec and precision, or the
    defaults (the official codec) for any other HiggsAudioModel folder."""
    from higgs_ddp.model import _import_higgs, check_tokenizer

    where = ["model.init=pretrained", f"model.path={path}", "model.revision=null", "model.tokenizer=null"]
    if (path / "config.yaml").is_file():
        cfg = _config(path / "config.yaml", *where, "model.config=null")
    else:
        try:
            cfg = load_config(None, where)
        except ConfigError as e:
            raise ModelPathError(f"{path}: {e}") from None
    _, HiggsAudioModel = _import_higgs()
    tokenizer = _tokenizer(cfg, path)
    model = HiggsAudioModel.from_pretrained(str(path), torch_dtype=torch.float32,
                                            attn_implementation=cfg.model.attn_implementation)
    check_tokenizer(model.config, tokenizer)
    return model, tokenizer, cfg
