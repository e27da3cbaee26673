"""Checkpoints: everything a run needs to continue exactly as if it had never stopped.

    {output_dir}/checkpoints/step_000120/
        adapter/                 LoRA: the PEFT adapter (adapter_model.safetensors + adapter_config.json)
        trainable.safetensors    audio_ffn / full: the trainable tensors by parameter name
        optimizer.safetensors    AdamW moments and step counts, by parameter name
        shards/rank_00000.safetensors  instead of the three above under FSDP: each rank's rows of every
                                 trainable and optimizer tensor, written by that rank (see shards.py)
        rng.safetensors          every rank's torch CPU (and CUDA) generator state
        config.yaml              the resolved config of the run that wrote it
        state.json               step, data position, scheduler, counters, python/numpy RNG per rank,
                                 data fingerprint, weight checksums: written last

What the files hold is the state the trainer registers (``Trainer.states``; training/state.py says how a
state chooses its place and how to add one). Only tensors (safetensors) and JSON/YAML are read back:
loading a checkpoint unpickles nothing. A checkpoint is assembled in a hidden ``.tmp-*`` folder and renamed
into place, so a crash while saving leaves the previous one intact, and a folder named ``step_N`` is always
complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from higgs_ddp.config import ConfigError
from higgs_ddp.runtime.distributed import DistEnv, all_gather_objects, all_reduce_sum
from higgs_ddp.runtime.files import fsync_path, fsync_tree
from higgs_ddp.errors import HiggsError
from higgs_ddp.training.optim import (is_quantized_state, plain_scalars, quantized_parts, rebuild_quantized,
                                     tensor_scalars)
from higgs_ddp.training.shards import (
    SHARD_DIR,
    SavedTensors,
    adapter_key,
    is_sharded,
    like,
    local_part,
    rows_held,
    shard_file,
)
from higgs_ddp.training.state import Tensors
from higgs_ddp.runtime.layout import (ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINTS, CONFIG, OPTIMIZER, RNG, STATE,
                                      weights_name)

STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(HiggsError, RuntimeError):
    pass


class ChecksumError(CheckpointError):
    """Weights that read but are not the ones saved with the checkpoint (a flipped bit, an edited file)."""


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_of(path: Path) -> Optional[int]:
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (a ``step_N`` folder is complete by construction)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / STATE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(output_dir) -> Optional[Path]:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _remove(path: Path) -> None:
    """Rename away first, so an interrupted delete never leaves a half-empty ``step_N``."""
    trash = path.with_name(f".tmp-trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(output_dir) -> None:
    """Leftovers of a save or delete that was killed half-way."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(output_dir).glob(".*.tmp"):  # a final/ or best/ (files.atomic_folder) cut short
        shutil.rmtree(p, ignore_errors=True)


# --- the pieces -------------------------------------------------------------------------------------

def weight_checksums(named_params: list, device=None) -> torch.Tensor:
    """Per trainable tensor: sum and sum of squares in float64, over the full tensor (collective when the
    tensors are sharded: each rank sums its rows). Cheap, and any divergence between ranks or a bad load
    changes them."""
    rows = [_sums(local_part(p).detach()) for _, p in named_params]
    sums = torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
    if any(is_sharded(p) for _, p in named_params):
        sums = all_reduce_sum(sums.to(device) if device is not None else sums).cpu()
    return sums


def _sums(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t.double().sum(), t.double().pow(2).sum()])


def verify_ranks_agree(named_params: list, step: int, device: torch.device) -> None:
    """Every rank must hold bit-identical replicated weights; DDP guarantees it unless something bypassed it
    (or a rank's memory went bad). Sharded weights have no replicas to compare. Two tiny all-reduces."""
    import torch.distributed as dist

    replicated = [(n, p) for n, p in named_params if not is_sharded(p)]
    if not (dist.is_available() and dist.is_initialized()) or not replicated:
        return
    sums = weight_checksums(replicated).to(device)
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    bad = [replicated[i][0] for i in torch.nonzero((lo != hi).any(1)).flatten().tolist()]
    if bad:
        raise CheckpointError(
            f"ranks hold different trainable weights at step {step} ({len(bad)} of {len(replicated)} tensors "
            f"differ, first: {bad[0]}): gradients were not synchronised; stopping without saving")


class ModelState:
    """The trainable tensors (``state_dict``: {name: tensor}, this rank's rows under FSDP). The checkpoint
    writes them as the PEFT ``adapter/`` or ``trainable.safetensors`` (or in the shard files) and records
    their checksums, which a load checks before any other state is loaded."""
    rows = True

    def __init__(self, model, named_params: list):
        self.model, self.named_params = model, named_params

    def state_dict(self) -> Tensors:
        return Tensors(dict(self.named_params))

    def load_state_dict(self, saved: Tensors) -> None:
        with torch.no_grad():
            for n, p in self.named_params:
                start, end = rows_held(p)
                local_part(p).copy_(saved.tensors.read(n, start, end))


class OptimizerState:
    """AdamW's moments and step counts (tensors keyed ``name::field``, this rank's rows; an 8-bit moment as
    its parts ``name::field.codes`` / ``.scale`` / ``.qmap``, optim.py) and, as JSON, the parameter order and
    the param groups."""
    rows = True

    def __init__(self, optimizer, named_params: list):
        self.optimizer, self.named_params = optimizer, named_params

    def state_dict(self) -> Tensors:
        sd = self.optimizer.state_dict()
        names = {p: n for n, p in self.named_params}
        order = [names[p] for g in self.optimizer.param_groups for p in g["params"]]
        tensors = {}
        for i, st in sd["state"].items():
            for key, v in st.items():
                if is_quantized_state(v):  # an 8-bit moment as plain tensors: name::exp_avg.codes, .scale, .qmap
                    tensors.update({f"{order[i]}::{key}.{part}": t for part, t in quantized_parts(v).items()})
                else:
                    tensors[f"{order[i]}::{key}"] = v
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
        return Tensors(tensors, {"param_names": order, "param_groups": plain_scalars(groups)})

    def load_state_dict(self, saved: Tensors) -> None:
        params, names = dict(self.named_params), {id(p): n for n, p in self.named_params}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        if order != saved.json["param_names"]:
            raise CheckpointError("the checkpoint's optimizer was built for other trainable parameters")
        index = {n: i for i, n in enumerate(order)}
        state: dict = {}
        for key in sorted(k for k in saved.tensors.keys() if "::" in k):
            name, field = key.rsplit("::", 1)
            p = params[name]
            shape = list(saved.tensors.shape(key))
            if shape == list(p.shape):  # moments (and 8-bit codes): this rank's rows, placed like the weight
                start, end = rows_held(p)
                value = like(p, saved.tensors.read(key, start, end).to(local_part(p).device))
            elif not shape:  # AdamW's step count: a scalar, the same on every rank
                value = saved.tensors.read(key, 0, 0)
            else:  # an 8-bit moment's block scales and code map (replicated only: config.py refuses FSDP)
                value = saved.tensors.read(key, 0, shape[0])
            state.setdefault(index[name], {})[field] = value
        eight_bit = hasattr(self.optimizer, "block_size")  # torchao's; torch's AdamW gets fp32 moments back
        for i, st in state.items():
            p = params[order[i]]
            for moment in {f.split(".")[0] for f in st if "." in f}:
                parts = {f.split(".", 1)[1]: st.pop(f) for f in [f for f in st if f.startswith(moment + ".")]}
                value = rebuild_quantized(parts, local_part(p))
                st[moment] = value if eight_bit else value.dequantize()
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved.json["param_groups"]]
        groups = tensor_scalars(groups, self.optimizer.param_groups)  # torchao's lr is a tensor
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


class RngState:
    """Every rank's generators (collective: ``state_dict`` gathers them): torch's as tensors keyed
    ``rank{r}.torch_cpu`` (and ``.torch_cuda``), python's and numpy's as JSON, one entry per rank. Restored
    only with as many ranks as saved them (otherwise a resume says so)."""
    rows = False

    def __init__(self, env: DistEnv):
        self.env = env

    def state_dict(self) -> Tensors:
        ranks = all_gather_objects(_rng_state())  # small
        return Tensors({f"rank{r}.{k}": v.contiguous() for r, (t, _) in enumerate(ranks) for k, v in t.items()},
                       [plain for _, plain in ranks])

    def load_state_dict(self, saved: Tensors) -> None:
        if len(saved.json) == self.env.world_size:
            prefix = f"rank{self.env.rank}."
            _set_rng_state({k[len(prefix):]: v for k, v in saved.tensors.items() if k.startswith(prefix)},
                           saved.json[self.env.rank])


def _local_cpu(tensors: dict) -> dict:
    return {k: local_part(v).detach().cpu().contiguous() for k, v in tensors.items()}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, plain


def _set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, keys, gauss = plain["python"]
    random.setstate((v, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- save / load ------------------------------------------------------------------------------------

def _agree(error: str, env: DistEnv, what: str) -> None:
    """Collective: raise on every rank if any rank failed (the others must not wait at the next step)."""
    failed = all_reduce_sum(torch.tensor([1.0 if error else 0.0], device=env.device)).item()
    if failed:
        raise CheckpointError(error or f"another rank could not write {what}")


def _weights(states: dict) -> ModelState:
    return next(s for s in states.values() if isinstance(s, ModelState))


def save_checkpoint(output_dir, step: int, states: dict, *, config: dict, env: DistEnv, keep_last: int) -> Path:
    """Collective: every rank calls it. Rank 0 writes the checkpoint of ``states`` (the registry, state.py);
    with sharded weights each rank also writes its own rows. All ranks learn whether that worked."""
    weights = _weights(states)
    verify_ranks_agree(weights.named_params, step, env.device)
    sums = weight_checksums(weights.named_params, env.device)
    saved = {k: s.state_dict() for k, s in states.items()}  # collective (the RNG of every rank)
    rows = {k: v for k, s in states.items() if getattr(s, "rows", False) for k, v in saved[k].tensors.items()}
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:06d}"
    tmp = final.with_name(all_gather_objects(f".tmp-{final.name}-{os.getpid()}")[0])  # rank 0's name
    sharded = any(is_sharded(p) for _, p in weights.named_params)
    error = ""
    if env.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARD_DIR if sharded else tmp).mkdir(parents=True)
            if sharded and hasattr(weights.model, "peft_config"):  # peft's adapter files, less the tensors (in shards/)
                weights.model.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True, state_dict={})
                (tmp / ADAPTER_DIR / ADAPTER_WEIGHTS).unlink()
        except OSError as e:
            error = f"could not write checkpoint {final}: {e}"
    _agree(error, env, f"checkpoint {final}")
    if sharded:  # each rank its rows: nothing is gathered
        try:
            f = tmp / shard_file(env.rank)
            save_file(_local_cpu(rows), str(f))
            fsync_path(f)
        except (OSError, RuntimeError) as e:
            error = f"could not write {tmp / shard_file(env.rank)} (rank {env.rank}): {e}"
        _agree(error, env, f"checkpoint {final}")
    if env.is_main:
        try:
            _write_tensors(tmp, states, saved, sharded)
            layout = {"world_size": env.world_size,
                      "weight_checksums": {n: s for (n, _), s in zip(weights.named_params, sums.tolist())},
                      **({"sharding": {"world_size": env.world_size,
                                       "shapes": {k: list(v.shape) for k, v in rows.items()}}} if sharded else {})}
            _write_rest(tmp, final, config, {**_json_parts(saved), **layout})
            for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
                _remove(old)
        except Exception as e:  # noqa: BLE001 -- any failure must reach the other ranks, not leave them waiting
            error = f"could not write checkpoint {final}: {e}"
    _agree(error, env, f"checkpoint {final}")
    return final


def _json_parts(saved: dict) -> dict:
    """What goes into state.json: each state's JSON value (a Tensors' JSON part, when it has one)."""
    parts = {k: (v.json if isinstance(v, Tensors) else v) for k, v in saved.items()}
    return {k: v for k, v in parts.items() if v is not None}


def _write_tensors(tmp: Path, states: dict, saved: dict, sharded: bool) -> None:
    """Rank 0's tensor files: ``{key}.safetensors`` for each state with tensors, but the weights as the PEFT
    ``adapter/`` or ``trainable.safetensors``, and nothing of the row states when they are in shards/."""
    from peft import PeftModel

    for key, s in states.items():
        if not isinstance(saved[key], Tensors) or (sharded and getattr(s, "rows", False)):
            continue
        if isinstance(s, ModelState) and isinstance(s.model, PeftModel):
            s.model.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
        else:
            name = "trainable" if isinstance(s, ModelState) else key
            save_file(_local_cpu(saved[key].tensors), str(tmp / f"{name}.safetensors"))


def _write_rest(tmp: Path, final: Path, config: dict, state: dict) -> None:
    """config.yaml and state.json (last), then the folder made durable and renamed into place."""
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    fsync_tree(tmp)  # data on disk before the rename makes the checkpoint visible
    if final.exists():  # the same step saved again (e.g. a rerun that had nothing left to do)
        _remove(final)
    os.rename(tmp, final)
    fsync_path(final.parent)  # the rename itself


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({STATE}: {e})") from None


def _same_sums(a: list, b: list) -> bool:
    # Float64 sums of the same weights agree to the last bits whatever the sharding added them in.
    return all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12) for x, y in zip(a, b))


def _check_sums(saved: SavedTensors, saved_sums: dict, now: dict) -> None:
    """ChecksumError naming the file when the weights ``now`` ({name: [sum, sum of squares]}, as loaded) are
    not the ones ``state.json`` recorded: the check of every loader (a resume, export, speak, score)."""
    wrong = [n for n in now if n not in saved_sums or not _same_sums(saved_sums[n], now[n])]
    wrong = wrong or sorted(set(saved_sums) ^ set(now))
    if wrong:
        raise ChecksumError(f"{saved.file_of(wrong[0])} is damaged (its tensors do not match the checksums saved "
                            f"with them in {saved.path / STATE}, first: {wrong[0]})")


def _open_weights(path: Path, state: dict, names: list, optimizer: bool = True) -> SavedTensors:
    """The checkpoint's tensors, after checking that they are the trainable tensors ``names``."""
    saved = SavedTensors(path, state, optimizer)
    weights = {k for k in saved.keys() if "::" not in k}
    missing = [n for n in names if (adapter_key(n) if getattr(saved, "adapter", False) else n) not in weights]
    if missing or len(weights) != len(names):
        raise CheckpointError(f"{path}: trainable tensors differ from this model's ({len(weights)} saved, "
                              f"{len(names)} here{f', first missing: {missing[0]}' if missing else ''})")
    return saved


def _cannot_load(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: cannot load checkpoint: {' '.join(str(e).split())}")


def load_checkpoint(path: Path, states: dict, env: DistEnv) -> tuple[dict, dict]:
    """Restore every registered state (state.py), whatever strategy and number of ranks wrote the checkpoint
    (each rank reads only its rows); returns the saved state dict and each state's note ({key: note}, where
    there is one). The weights come first: ChecksumError, before any other state has changed, when they are
    not the ones saved."""
    path = Path(path)
    state = read_state(path)
    weights = _weights(states)
    names = [n for n, _ in weights.named_params]
    try:
        rows = _open_weights(path, state, names)
        weights.load_state_dict(Tensors(rows))
        now = dict(zip(names, weight_checksums(weights.named_params, env.device).tolist()))
        _check_sums(rows, state["weight_checksums"], now)
        notes = {}
        for key, s in states.items():
            if s is not weights:
                notes[key] = s.load_state_dict(_saved_value(path, state, key, getattr(s, "rows", None), rows))
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise _cannot_load(path, e) from None
    return state, {k: v for k, v in notes.items() if v}


def _saved_value(path: Path, state: dict, key: str, rows, weights: SavedTensors):
    """What ``load_state_dict`` gets for ``key``: its JSON value; for a state with tensors (``rows`` True:
    rows of the trainable tensors, read from either layout; False: its own file) ``Tensors``; None when the
    checkpoint was written before the state existed."""
    if rows is None:
        return state.get(key)
    if rows:
        return Tensors(weights, state.get(key))
    f = path / f"{key}.safetensors"
    return Tensors(load_file(str(f)), state.get(key)) if f.is_file() or key in state else None


def verify_weights(path: Path) -> dict:
    """What a resume checks of the weights, for the commands that read a checkpoint's weights themselves
    (export, speak, score): every file they read reads, and every trainable tensor, read whole one at a
    time from either layout, matches the checksum saved with it. Returns the saved state dict."""
    path = Path(path)
    problem = damage(path, weights_only=True)
    if problem:
        raise CheckpointError(problem)
    state = read_state(path)
    try:
        sums = state["weight_checksums"]
        saved = _open_weights(path, state, list(sums), optimizer=False)
        now = {n: _sums(saved.read(n, 0, (saved.shape(n) or [0])[0])).tolist() for n in sums}
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise _cannot_load(path, e) from None
    _check_sums(saved, sums, now)
    return state


def resume_point(output_dir, resume: str, env: Optional[DistEnv] = None) -> tuple[Optional[Path], str]:
    """Where the run would continue from and the note it would print, only looking (the doctor): a
    damaged checkpoint is not renamed, and weights are not loaded (their checksums are not checked)."""
    chosen, note, _ = resume_from(output_dir, resume, env)
    return chosen, note


def resume_from(output_dir, resume: str, env: Optional[DistEnv] = None, load=None) -> tuple[Optional[Path], str, object]:
    """Collective: the checkpoint to continue from (None: a fresh start), a note for the user (if any) and
    what ``load(checkpoint)`` returned (the trainer's resume; None without ``load``).

    A checkpoint path only seeds a run: once output_dir has checkpoints of its own, the newest of those that
    loads wins, so a restarted or requeued job running the same command continues instead of starting over
    (see ``_newest_loadable``: a damaged one is passed over, whether its files do not read or its weights
    fail their checksums as they load).
    """
    own = list(reversed(complete_checkpoints(output_dir)))  # newest first
    if resume == "never":
        if own:
            raise ConfigError(f"train.resume=never but {output_dir} already holds checkpoints (latest {own[0].name}); "
                              f"their steps would mix with this run's: use another output_dir or delete "
                              f"{checkpoint_root(output_dir)}")
        return None, "", None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE).is_file():
            raise ConfigError(f"train.resume={resume}: not a complete checkpoint folder (no {STATE}); "
                              f"use auto, never or a checkpoints/step_N folder")
        if not own:
            problem = _agreed_damage(path)
            if problem:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
            return path, "", load(path) if load else None
    if not own:
        return None, "", None
    chosen, note, loaded = _newest_loadable(own, output_dir, env, load)
    if resume != "auto" and chosen.resolve() != Path(resume).resolve():
        note = "\n".join(filter(None, (
            f"train.resume={resume} only seeds a run without checkpoints; this output_dir has its own, so it "
            f"continues from the newest that loads ({chosen.name}). To go back, delete the later checkpoints or "
            f"resume into a new output_dir", note)))
    return chosen, note, loaded


def _newest_loadable(newest_first: list, output_dir, env: Optional[DistEnv], load) -> tuple[Path, str, object]:
    """The newest checkpoint that loads, a note naming what was passed over, and what ``load`` returned.

    A later checkpoint that a full disk or a copy cut short (its files do not read), or whose weights do not
    match their checksums as ``load`` loads them (a flipped bit), is renamed ``step_N.damaged`` (kept for a
    look, no longer a checkpoint: it would hold a ``keep_last`` place and be looked at on every start). Every
    rank reads the files and they agree on the result, so all of them load the same checkpoint. A failed
    load has changed only the weights (``load_checkpoint``), which the next one overwrites."""
    damaged = []
    for path in newest_first:
        problem = _agreed_damage(path)
        loaded = None
        if not problem and load is not None:
            loaded, problem = _load_checked(load, path)
        if not problem:
            break
        damaged.append((path, problem))
    else:
        listed = "; ".join(problem for _, problem in damaged)
        raise CheckpointError(f"no checkpoint in {checkpoint_root(output_dir)} can be loaded: {listed}. Delete "
                              f"or move away the damaged ones (all of them to start over)")
    if not damaged:
        return path, "", loaded
    if env is not None and env.is_main:
        for bad, _ in damaged:
            os.rename(bad, bad.with_name(f"{bad.name}.damaged"))
    listed = "; ".join(problem for _, problem in damaged)
    return path, (f"{listed}; resuming from {path.name}, the newest checkpoint that loads (the damaged one is "
                  f"kept as {damaged[0][0].name}.damaged{' and older' if len(damaged) > 1 else ''})"), loaded


def _load_checked(load, path: Path) -> tuple[object, str]:
    """Collective: (what ``load(path)`` returned, '') or (None, the checksum failure any rank saw)."""
    try:
        loaded, problem = load(path), ""
    except ChecksumError as e:
        loaded, problem = None, str(e)
    problem = next((p for p in all_gather_objects(problem) if p), "")
    return (None, problem) if problem else (loaded, "")


def _agreed_damage(path: Path) -> str:
    """Collective: what any rank found wrong with ``path`` ('' if nothing), the same on every rank."""
    return next((p for p in all_gather_objects(damage(path)) if p), "")


def _tensor_files(path: Path, weights_only: bool = False) -> list:
    """The files holding a checkpoint's trainable (and optimizer) tensors, in either layout (shards.py)."""
    try:
        sharding = json.loads((path / STATE).read_text()).get("sharding")
    except (OSError, ValueError):
        sharding = None  # damage() names state.json itself first
    if sharding:
        return [path / shard_file(r) for r in range(sharding["world_size"])]
    weights = path / weights_name(path)
    return [weights] if weights_only else [weights, path / OPTIMIZER]


def damage(path: Path, weights_only: bool = False) -> str:
    """'' when every file a resume reads can be read; else one line naming the first that cannot.
    ``weights_only``: only the files that export and speak read (not the optimizer and RNG states)."""
    path = Path(path)
    rest = [] if weights_only else [path / RNG]
    for f in (path / STATE, path / CONFIG, *_tensor_files(path, weights_only), *rest):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):  # the header, checked against the file's length
                    pass
            elif f.suffix == ".json":
                json.loads(f.read_text())
            else:
                yaml.safe_load(f.read_text())
        except FileNotFoundError:
            return f"{f} is missing"
        except (OSError, ValueError, yaml.YAMLError, SafetensorError) as e:
            return f"{f} is damaged ({' '.join(str(e).split())})"
    return ""
