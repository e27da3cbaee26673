"""What may differ between a checkpoint and the run that resumes it, and what is refused: the resume policy,
apart from the checkpoint files themselves (checkpoint.py). A difference is refused when it would change the
result (a config key not marked resume-neutral on its field, the data, the number of ranks), unless the user
accepts it by name (train.resume_accept)."""

from __future__ import annotations

from pathlib import Path

import yaml

from higgs_ddp.config import Config, ConfigError, resume_neutral_keys
from higgs_ddp.training.checkpoint import CheckpointError, read_state
from higgs_ddp.runtime.layout import CONFIG

# Keys that cannot change what a step computes (where things live, how often to log or save, speed and
# memory settings, validation): each is marked on its field in config.py.
NO_EFFECT = resume_neutral_keys()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and prefix + k != "model.config":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_differences(saved_config: dict, config: dict, saved_state: dict, fingerprint: dict,
                       world_size: int) -> dict:
    """What differs between a checkpoint and this run in ways that would change the result:
    {key: "then -> now"}; keys are config keys, ``data`` and ``world_size``."""
    # A key this version added is missing from an older checkpoint's config: it ran with what is now the key's
    # default. A key this version removed affects nothing any more. So: this version's keys, defaults beneath.
    then, now = {**_flat(Config().to_dict()), **_flat(saved_config)}, _flat(config)
    diffs = {k: f"{then.get(k)!r} -> {now[k]!r}" for k in sorted(now)
             if k not in NO_EFFECT and then.get(k) != now[k]}
    old = saved_state.get("data", {})
    if old.get("content") != fingerprint["content"]:
        if old.get("ids") == fingerprint["ids"]:
            diffs["data"] = ("the same sample ids, but in another order or with different tokens or audio codes "
                             "(reordered manifest, edited text or audio, another tokenizer or codec?)")
        else:
            diffs["data"] = f"{old.get('samples')} training samples -> {fingerprint['samples']}, not the same set"
    if saved_state.get("world_size") != world_size:
        diffs["world_size"] = (f"{saved_state.get('world_size')} -> {world_size} ranks (samples per step and the "
                               f"ranks' RNG differ)")
    return diffs


def check_resumable(path: Path, config: dict, fingerprint: dict, world_size: int, accept: list) -> None:
    state = read_state(path)
    try:
        saved_config = yaml.safe_load((Path(path) / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: cannot read config.yaml: {e}") from None
    diffs = resume_differences(saved_config, config, state, fingerprint, world_size)
    if "all" in accept:
        return
    blocking = {k: v for k, v in diffs.items() if k not in accept}
    if blocking:
        lines = "; ".join(f"{k}: {v}" for k, v in blocking.items())
        keys = ",".join(blocking)
        raise ConfigError(f"cannot resume from {path}: this run differs from it in ways that change the "
                          f"result: {lines}. Resume anyway with train.resume_accept=[{keys}], or start a new "
                          f"run in another output_dir")
