"""The trained weights behind a path given to ``export``, ``speak`` or ``score``: found one way for all three.

``path`` may be
* a run's ``output_dir``: its ``final/`` when the run finished (``status.json``), else its latest complete
  checkpoint (a stopped or failed run, or a finished one resumed for more steps), else ``final/``;
* a checkpoint folder (``checkpoints/step_N``), written by ddp or by fsdp (``shards/``, assembled here);
* a run's ``final/`` or ``best/`` folder (its config is the run's ``config.yaml`` next to it);
* an unmerged export (``higgs-ddp export``: a PEFT adapter or ``trainable.safetensors``, with ``config.yaml``);
* a merged export, or any folder ``HiggsAudioModel.from_pretrained`` loads (``config.json`` + weights): kind
  ``merged``, which speak and score load as it is and export refuses (there is nothing left to export).

A checkpoint's weights are checked as a resume checks them before anything reads them
(``checkpoint.verify_weights``: every file reads, every tensor matches the checksum saved with it), so a
damaged checkpoint is refused in one line naming the file, never exported or spoken.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from higgs_ddp.config import Config, ConfigError, load_config
from higgs_ddp.errors import HiggsError
from higgs_ddp.runtime.layout import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINTS, CONFIG, EXPORT_RECORD, STATE,
                                      STATUS, TRAINABLE)


class ModelPathError(HiggsError, ValueError):
    """``path`` is none of the accepted kinds, or its files cannot be used (one line)."""


@dataclass
class Trained:
    """Where to read the trained weights of a path that is not a merged model."""
    kind: str  # "checkpoint" | "final" | "adapter export" | "trainable export"
    source: Path  # the folder the weights come from, as resolved (what is reported)
    folder: Path  # where trainable.safetensors is read: ``source``, or a checkpoint's fsdp shards assembled
    adapter: Optional[Path]  # train.mode=lora: the folder holding adapter_config.json + adapter_model.safetensors
    config_file: Path  # the run's config.yaml
    cfg: Config
    step: Optional[int]  # the optimizer step the weights are from, when known


def model_kind(path: Path) -> str:
    """Which of the accepted kinds ``path`` is (ModelPathError if none)."""
    if not path.exists():
        raise ModelPathError(f"model path {path} not found")
    if not path.is_dir():
        raise ModelPathError(f"model path {path} is a file; give a run folder, a checkpoint, or an export folder")
    if (path / STATE).is_file():
        return "checkpoint"
    if (path / ADAPTER_CONFIG).is_file() or (path / TRAINABLE).is_file():
        if (path / CONFIG).is_file():
            return "adapter export" if (path / ADAPTER_CONFIG).is_file() else "trainable export"
        if (path.parent / CONFIG).is_file():
            return "final"
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return "merged"
    if (path / CONFIG).is_file() and ((path / CHECKPOINTS).is_dir() or (path / "final").is_dir()):
        return "run"
    raise ModelPathError(f"model path {path} is none of: a run folder (config.yaml with checkpoints/ or final/), "
                         f"a checkpoint (state.json), a run's final/ or best/, an export folder (adapter_config.json "
                         f"or trainable.safetensors with config.yaml), a model folder (config.json + weights)")


def run_weights(run: Path) -> Path:
    """A run folder's ``final/`` if the run finished, else its latest complete checkpoint, else ``final/``."""
    from higgs_ddp.training.checkpoint import latest_checkpoint

    final = run / "final"
    try:
        finished = json.loads((run / STATUS).read_text()).get("state") == "finished"
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


def resolve(path: Path) -> tuple[str, Path]:
    """(kind, folder): a run folder replaced by the weights it holds, a checkpoint's adapter/ by the checkpoint."""
    path = Path(path)
    kind = model_kind(path)
    if kind == "run":
        path = run_weights(path)
        kind = model_kind(path)
    if kind == "final" and (path.parent / STATE).is_file():  # a checkpoint's adapter/ folder
        path, kind = path.parent, "checkpoint"
    return kind, path


def weights_step(source: Path, kind: str) -> Optional[int]:
    from higgs_ddp.training.checkpoint import CheckpointError, read_state, step_of

    if kind == "checkpoint":
        try:  # state.json is written last into every checkpoint; the folder name is only a fallback
            return read_state(source)["step"]
        except (CheckpointError, KeyError):
            return step_of(source.resolve())
    if (source / "best.json").is_file():  # a run's best/ (eval.best_by): the step it was kept at
        record = source / "best.json"
    else:
        record = source.parent / STATUS if kind == "final" else source / EXPORT_RECORD
    try:
        return json.loads(record.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def trained_weights(path: Path, scratch: Path):
    """The ``Trained`` behind ``path`` (any kind but merged). ``scratch``: a folder this may create while the
    context lasts (an fsdp checkpoint's weights assembled whole), removed afterwards."""
    kind, path = resolve(path)
    if kind == "merged":
        raise ModelPathError(f"{path} is a merged model folder (config.json + weights), not trained weights to "
                             f"export: load it as it is")
    if kind != "checkpoint":
        config_file = path.parent / CONFIG if kind == "final" else path / CONFIG
        cfg = read_config(config_file)
        lora = (path / ADAPTER_CONFIG).is_file()
        if lora != (cfg.train.mode == "lora"):
            raise ModelPathError(f"{path} holds {'an adapter' if lora else 'trainable tensors'} but its config says "
                                 f"train.mode={cfg.train.mode}")
        yield Trained(kind, path, path, path if lora else None, config_file, cfg, weights_step(path, kind))
        return
    with unsharded(path, verified_state(path), scratch) as view:
        cfg = read_checkpoint(view)
        yield Trained(kind, path, view, view / ADAPTER_DIR if cfg.train.mode == "lora" else None,
                      view / CONFIG, cfg, weights_step(path, kind))


def verified_state(ckpt: Path) -> dict:
    """The checkpoint's state.json, once its weights passed what a resume checks (one line otherwise)."""
    from higgs_ddp.training.checkpoint import CheckpointError, verify_weights

    try:
        return verify_weights(ckpt)
    except CheckpointError as e:
        raise ModelPathError(f"{e}; an earlier checkpoint of the run may be intact") from None


def read_config(file: Path, *overrides: str) -> Config:
    try:
        return load_config(str(file), list(overrides))  # needs no data: manifest paths are only strings here
    except ConfigError as e:
        raise ModelPathError(f"{file}: {e}") from None


def read_checkpoint(ckpt: Path) -> Config:
    """The run config of a checkpoint folder (replicated layout), after checking the weights its mode needs."""
    if not (ckpt / CONFIG).is_file():
        raise ModelPathError(f"{ckpt} has no config.yaml (not a higgs-ddp checkpoint folder?)")
    cfg = read_config(ckpt / CONFIG)
    need = ([f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}", f"{ADAPTER_DIR}/{ADAPTER_CONFIG}"] if cfg.train.mode == "lora"
            else [TRAINABLE])
    missing = [n for n in need if not (ckpt / n).is_file()]
    if missing:
        raise ModelPathError(f"{ckpt} (train.mode={cfg.train.mode}) has no {' and no '.join(missing)}")
    return cfg


@contextlib.contextmanager
def unsharded(ckpt: Path, state: dict, scratch: Path):
    """``ckpt`` itself, or (written by fsdp: each rank's rows in shards/) ``scratch`` holding its trainable
    weights whole in the replicated layout, removed afterwards."""
    from safetensors import SafetensorError

    from higgs_ddp.training.shards import consolidate

    if not state.get("sharding"):
        yield ckpt
        return
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        try:
            consolidate(ckpt, state, scratch)
        except (SafetensorError, OSError) as e:  # a shard cut short since it was checked; a bug keeps its traceback
            raise ModelPathError(f"cannot read the shards of {ckpt}: {' '.join(str(e).split())}") from None
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
