"""Checkpointed state is registered, not passed (torchtitan's ``CheckpointManager(states={...})``).

``Trainer.states`` maps a key to an object with ``state_dict()`` and ``load_state_dict(value)``: the weights,
the step, the data position, the counters, the best-so-far tracker, the optimizer, the schedule and the RNG.
A checkpoint saves every registered object and a resume loads every one, in registration order
(``checkpoint.save_checkpoint`` / ``load_checkpoint``); neither names a piece of state.

What ``state_dict()`` returns decides where it is stored:

- a JSON value (numbers, strings, lists, dicts): ``state.json[key]``;
- ``Tensors(tensors, json)``: the tensors in ``{key}.safetensors``, the JSON part in ``state.json[key]``
  unless it is None. Such a state says where its tensors live with a class attribute ``rows``: False, its
  own file, written by rank 0 (gather what every rank holds in ``state_dict``, as ``RngState`` does); True,
  rows of the trainable tensors (named by parameter, or ``name::field``), which under FSDP each rank writes
  in its shard file (``ModelState``, ``OptimizerState``: shards.py's ``SavedTensors`` reads their rows from
  either layout; a third such state would have to teach it its file).

``load_state_dict`` gets back the same shape (for ``Tensors``, its tensors: a dict, or for ``rows`` a
``SavedTensors`` reader of any rows) and may return a note for the user. It gets None when the checkpoint was written before the state existed: resume as such a run
did, or refuse (raise ValueError: the resume names the checkpoint and the reason).

To add checkpointed state: one object with ``state_dict()`` / ``load_state_dict(value)`` (a plain value on
an object: ``Attributes``), and one line registering it in ``Trainer.__init__``'s ``self.states``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Tensors(NamedTuple):
    """A state with tensors: {name: tensor}, and its JSON part (None: it has none)."""
    tensors: Any
    json: Any = None


class Attributes:
    """Some attributes of an object as one state: {name: value}, or the value itself for one ``name``."""

    def __init__(self, obj, *names: str):
        self.obj, self.names = obj, names

    def state_dict(self):
        values = {n: getattr(self.obj, n) for n in self.names}
        return values if len(self.names) > 1 else values[self.names[0]]

    def load_state_dict(self, value) -> None:
        if value is None:
            raise ValueError(f"it holds no {', '.join(self.names)}")
        for n, v in (value.items() if len(self.names) > 1 else [(self.names[0], value)]):
            setattr(self.obj, n, v)


class DataPosition:
    """``state.json["data"]``: which data the run trains on (its fingerprint: a resume checks it first,
    ``check_resumable``) and where the sampler stands after ``step()`` optimizer steps (loaded after the step)."""

    def __init__(self, sampler, fingerprint: Callable[[], dict], step: Callable[[], int]):
        self.sampler, self.fingerprint, self.step = sampler, fingerprint, step

    def state_dict(self) -> dict:
        epoch, micro = self.sampler.position(self.step())
        return {**self.fingerprint(), "epoch": epoch, "micro_batches_into_epoch": micro}

    def load_state_dict(self, data: dict) -> None:
        if data is None:
            raise ValueError("it holds no data position")
        if "micro_batches_into_epoch" in data:
            self.sampler.resume_at(self.step(), data["epoch"], data["micro_batches_into_epoch"])
        else:  # saved before positions were kept in micro-batches: by step, right for the same layout
            self.sampler.start_step = self.step()
