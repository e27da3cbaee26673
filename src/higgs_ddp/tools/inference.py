"""A trained model, ready to speak: ``load_for_inference(path)`` for whatever a run or an export left behind:
any path tools/weights.py accepts (a run, a checkpoint, final/ or best/, an unmerged or a merged export),
found as export finds it; a checkpoint is checked as a resume checks it before its weights are read.

Every kind ends as the same thing: base + trained weights merged into one plain ``HiggsAudioModel`` (export's
``merged_model``, so the weights are bit for bit those of ``export --merge --dtype`` the same), in eval mode,
on the GPU when there is one. Its dtype (``--dtype`` of speak and score): ``auto`` is bf16 on a GPU (2 bytes
a weight: 11.5 GB for the 5.8B model instead of 23 GB, each weight rounded once after the merge) and fp32 on
a CPU, the reference; ``bf16`` on a CPU gives the GPU's weights anywhere. Generation then runs under the
run's precision (bf16 autocast on GPU), as the listening samples during training do.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from higgs_ddp.config import Config, ConfigError, load_config
from higgs_ddp.errors import InputError
from higgs_ddp.runtime.layout import CONFIG
from higgs_ddp.tools.export import ExportError, merged_model
from higgs_ddp.tools.weights import ModelPathError, read_config, resolve, trained_weights, weights_step

__all__ = ["DTYPE_CHOICES", "DTYPE_HELP", "Loaded", "default_device", "dtype_name", "inference_dtype", "load_for_inference"]

DTYPE_CHOICES = ("auto", "fp32", "bf16")
DTYPE_HELP = "the weights' dtype: auto (default) is bf16 on a GPU, fp32 on a CPU; fp32 is the reference"


@dataclass
class Loaded:
    model: torch.nn.Module  # the raw HiggsAudioModel (no peft, no wrapper), eval mode, in ``dtype``, on ``device``
    tokenizer: object
    codec: object  # data.codec.Codec of the run (data.codec), on ``device``
    cfg: Config  # the run's config (for a merged folder: model.path points at the folder)
    kind: str  # "checkpoint" | "final" | "adapter export" | "trainable export" | "merged"
    source: Path  # the folder the trained weights were read from
    step: Optional[int]  # the optimizer step they are from, when known
    device: torch.device
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        return (f"{self.kind} {self.source}{at}, train.mode={self.cfg.train.mode}, on {self.device} in "
                f"{dtype_name(self.dtype)}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``--dtype``: auto is bf16 on a GPU and fp32 elsewhere."""
    if choice not in DTYPE_CHOICES:
        raise InputError(f"--dtype {choice!r}: use one of {', '.join(DTYPE_CHOICES)}")
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def load_for_inference(path, device=None, codec=None, dtype: str = "auto") -> Loaded:
    """The model at ``path`` (any kind above), its tokenizer and codec. Raises ModelPathError (one line) when
    ``path`` is none of the accepted kinds or cannot be loaded, ValueError for a device that is not there.
    ``codec``: a Codec already loaded (comparing several checkpoints of a run), used when it is the one the
    run's config names, on ``device``. ``dtype``: auto, fp32 or bf16 (``inference_dtype``)."""
    from higgs_ddp.data.codec import CodecError, codec_identity, load_codec

    path = Path(path)
    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError as e:  # "Expected one of cpu, cuda, ... device type at start of device string: ..."
        raise InputError(f"device {device!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} asked for, but no GPU is visible to torch")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as the tensors placed there name it
    weights = inference_dtype(dtype, device)
    try:
        kind, source, model, tokenizer, cfg, step = _load_weights(path, weights)
        if codec is None or codec.identity != codec_identity(cfg.data.codec, cfg.data.codec_revision) \
                or codec.device != device:
            codec = load_codec(cfg.data.codec, cfg.data.codec_revision, device=device)
    except (ExportError, ConfigError, CodecError) as e:
        raise ModelPathError(str(e)) from None
    except OSError as e:  # the hub / transformers: several lines, the first names the problem
        raise ModelPathError(f"cannot load {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    model.requires_grad_(False)
    return Loaded(model.to(device).eval(), tokenizer, codec, cfg, kind, source, step, device, weights)


def _tokenizer(cfg: Config, folder: Optional[Path]):
    """The tokenizer saved with the weights (final/ and exports carry one), else the run's."""
    from higgs_ddp.model import load_tokenizer

    if folder is not None and (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    return load_tokenizer(cfg)


def _load_weights(path: Path, dtype: torch.dtype):
    """-> (kind, source folder, model in ``dtype``, tokenizer, cfg, step)."""
    kind, path = resolve(path)
    if kind == "merged":
        return kind, path, *_load_merged(path, dtype), weights_step(path, kind)
    with tempfile.TemporaryDirectory(prefix="higgs-ddp-load-") as tmp, \
            trained_weights(path, Path(tmp) / "view") as trained:  # fsdp shards assembled, as export does
        # final/ and exports carry the tokenizer saved with the weights; a checkpoint uses the run's
        tokenizer = _tokenizer(trained.cfg, None if kind == "checkpoint" else path / "tokenizer")
        model = merged_model(trained.folder, trained.cfg, tokenizer, dtype, adapter=trained.adapter)
    return kind, trained.source, model, tokenizer, trained.cfg, trained.step


def _load_merged(path: Path, dtype: torch.dtype):
    """A full model folder: the run's config.yaml (export writes it) for the codec and precision, or the
    defaults (the official codec) for any other HiggsAudioModel folder."""
    from higgs_ddp.model import _import_higgs, check_tokenizer

    where = ["model.init=pretrained", f"model.path={path}", "model.revision=null", "model.tokenizer=null"]
    if (path / CONFIG).is_file():
        cfg = read_config(path / CONFIG, *where, "model.config=null")
    else:
        try:
            cfg = load_config(None, where)
        except ConfigError as e:
            raise ModelPathError(f"{path}: {e}") from None
    _, HiggsAudioModel = _import_higgs()
    tokenizer = _tokenizer(cfg, path)
    model = HiggsAudioModel.from_pretrained(str(path), torch_dtype=dtype,
                                            attn_implementation=cfg.model.attn_implementation)
    check_tokenizer(model.config, tokenizer)
    return model, tokenizer, cfg
