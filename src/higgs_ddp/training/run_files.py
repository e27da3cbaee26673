"""A run's own files beside its checkpoints: the resolved config at its start, and the weights of final/ and
best/ in the formats a user loads (a PEFT adapter, or the trainable tensors with the model's config)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from higgs_ddp.config import Config
from higgs_ddp.runtime.files import atomic_folder
from higgs_ddp.runtime.layout import CONFIG, TRAINABLE


def save_weights(out: Path, model, state: dict, mode: str, model_config, tokenizer, note: dict | None = None) -> None:
    """``out`` (final/ or best/) replaced as a whole, durably: written beside and renamed, so a crash leaves the
    previous one (best/ is rewritten during the run). ``state``: the full trainable tensors (gathered)."""
    with atomic_folder(out, durable=True) as tmp:
        if mode == "lora":
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
        else:
            from safetensors.torch import save_file
            save_file(state, str(tmp / TRAINABLE), metadata={"mode": mode})
            model_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if note is not None:
            (tmp / f"{out.name}.json").write_text(json.dumps(note, indent=1) + "\n")


def write_run_files(cfg: Config) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
