"""Where a run keeps what: the names of the files and folders of a run, its checkpoints and its exports, in
one place (docs/outputs.md and docs/checkpoints.md describe them).

    {output_dir}/  config.yaml  status.json  metrics.jsonl  run.lock  data_report.json
                   checkpoints/step_N/  state.json  config.yaml  adapter/ | trainable.safetensors
                                        optimizer.safetensors  rng.safetensors  (shards/ under FSDP)
                   final/  best/        adapter files (LoRA) | trainable.safetensors, tokenizer/
    an export:     the adapter files | trainable.safetensors | a merged model, config.yaml, export.json
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"  # the run's resolved config (a run, a checkpoint, an export)
STATUS = "status.json"  # running / finished / stopped / failed, with the step
METRICS = "metrics.jsonl"
STATE = "state.json"  # a checkpoint's step, data position, counters, checksums
CHECKPOINTS = "checkpoints"
FINAL, BEST = "final", "best"
EXPORT_RECORD = "export.json"
ADAPTER_DIR = "adapter"  # in a checkpoint: the PEFT adapter folder (LoRA only)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names
ADAPTER_CONFIG = "adapter_config.json"
TRAINABLE = "trainable.safetensors"  # audio_ffn / full: the trainable tensors by parameter name
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"


def holds_adapter(checkpoint) -> bool:
    """Whether a checkpoint folder holds a LoRA adapter (its ``adapter/``; else trainable tensors). Under FSDP
    the folder holds peft's adapter_config.json and the tensors are in the shards."""
    return (Path(checkpoint) / ADAPTER_DIR).is_dir()


def weights_name(checkpoint) -> str:
    """The checkpoint's weights file, relative to it: the adapter's or the trainable tensors'."""
    return f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}" if holds_adapter(checkpoint) else TRAINABLE
