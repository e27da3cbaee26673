"""Preference pairs as training samples: each pair's prompt tokenized once, its chosen and rejected candidates
built into two samples of that same prompt (the ChatML conversation, delay pattern and stream EOS of every
supervised sample, ``prompt.build_chatml`` + ``HiggsCollator``), and a micro-batch of P pairs collated as one
batch of 2P sequences: the P chosen first, then the P rejected in the same order. A candidate that was cut at
the generation limit (its "stopped" false) has no end targets: no stream EOS, no text after its audio.
With data.max_tokens_per_batch the token budget packs whole pairs (``PairRecord.positions``).

The pairs file is read and checked by ``preferences.read_pairs`` (one line naming the file and line for any
problem); references given as audio are encoded through the code cache, as a manifest's are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from higgs_ddp.config import Config
from higgs_ddp.data.collator import Batch, HiggsCollator
from higgs_ddp.data.dataset import (DataError, _audio_codes, _in_val, check_preferences, count_positions,
                                    load_codes_file)
from higgs_ddp.data.audio import AudioProblem
from higgs_ddp.data.phases import Phases
from higgs_ddp.data.preferences import Pair, read_run_pairs, run_identity
from higgs_ddp.data.prompt import Sample, build_chatml, check_audio_count, chatml_ids
from higgs_ddp.data.records import Data
from higgs_ddp.dual_loss import count_sample_targets
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.runtime.files import write_json_atomic


@dataclass
class PairRecord:
    """One pair, tokenized: the prompt's ids once, the codes [reference?, chosen, rejected]. ``id``, the ids and
    ``codes`` are what ``records.fingerprint`` hashes, so a checkpoint knows the pairs it was trained on."""

    where: str
    id: str  # Pair.name: the prompt id and both candidates' keys
    prompt: str  # the prompt id (the validation split keeps a prompt's pairs together)
    input_ids: np.ndarray
    label_ids: np.ndarray
    codes: list  # [reference codes?] + [chosen, rejected]
    positions: int  # its batching cost: 2 x the longer sequence (what the pair takes padded; never split)
    seconds: float
    stopped: tuple = (True, True)  # (chosen, rejected) ended by themselves; False: cut, no end targets

    def sample(self) -> tuple[Sample, Sample]:
        ids, labels = (torch.from_numpy(a.astype(np.int64)) for a in (self.input_ids, self.label_ids))
        context = [torch.from_numpy(c.astype(np.int64)) for c in self.codes[:-2]]
        chosen, rejected = (torch.from_numpy(c.astype(np.int64)) for c in self.codes[-2:])
        return (Sample(ids, labels, context + [chosen], f"{self.id}:chosen", self.stopped[0]),
                Sample(ids, labels, context + [rejected], f"{self.id}:rejected", self.stopped[1]))


@dataclass
class PairBatch(Batch):
    """2P sequences: rows 0..P-1 the chosen candidates, P..2P-1 the rejected ones of the same pairs."""
    pairs: int = 0
    sample_targets: Optional[torch.Tensor] = None  # (2P,) supervised targets per sequence, known before the forward


class PairCollator:
    def __init__(self, collator: HiggsCollator):
        self.collator = collator

    @classmethod
    def for_model(cls, config) -> "PairCollator":
        return cls(HiggsCollator.for_model(config))

    def __call__(self, pairs: list) -> PairBatch:
        samples = [c for c, _ in pairs] + [r for _, r in pairs]
        b = self.collator(samples)
        targets = count_sample_targets(b.label_ids, b.label_audio_ids, b.audio_out_ids_start,
                                       b.audio_out_ids_start_group_loc)
        fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(Batch)}
        return PairBatch(**fields, pairs=len(pairs), sample_targets=targets)


def load_preference_data(cfg: Config, env: DistEnv, tokenizer, model_config, quiet: bool = False) -> Data:
    """The training and validation pairs of ``cfg.data`` (train.objective=dpo), every problem one line."""
    d, mc = cfg.data, model_config
    C, K = mc.audio_num_codebooks, mc.audio_codebook_size
    check_preferences(cfg)
    expected = run_identity(d.codec, d.codec_revision, tokenizer, C, K)
    phases = Phases()
    train_pairs, val_pairs = read_run_pairs(d.preferences, d.val_preferences, expected)
    phases.mark("pairs")
    pairs = train_pairs + val_pairs
    refs = _references(pairs, cfg, env, C, K, quiet, phases)
    from higgs_ddp.data.codec import CodecError, codec_rates
    try:
        frame_rate = codec_rates(d.codec, d.codec_revision)[1]
    except CodecError:  # the seconds are reported only: a codec config not at hand (offline) costs nothing else
        frame_rate = 0
    ids = tokenizer.convert_tokens_to_ids
    in_id, out_id = ids("<|AUDIO|>"), ids("<|AUDIO_OUT|>")
    prompts: dict = {}
    train, val, too_long = [], [], []
    for n, pair in enumerate(pairs):
        chatml = build_chatml(pair.text, pair.scene, pair.ref_text, with_reference=pair.ref is not None)
        key = repr(chatml)
        if key not in prompts:
            try:
                input_ids, label_ids, n_audio = chatml_ids(tokenizer, chatml, pair.id)
            except ValueError as e:
                raise DataError(f"{pair.where}: {e}") from None
            prompts[key] = (np.asarray(input_ids, np.int32), np.asarray(label_ids, np.int32), n_audio)
        input_ids, label_ids, n_audio = prompts[key]
        context = [refs[pair.ref.path]] if pair.ref is not None else []
        codes = context + [pair.chosen.codes, pair.rejected.codes]
        check_audio_count(n_audio, len(codes) - 1, pair.id)
        # A pair's two sequences sit in one micro-batch padded to the longest: a token budget
        # (data.max_tokens_per_batch, padded positions) counts the pair as twice its longer sequence.
        positions = 2 * max(count_positions(input_ids, [c.shape[1] for c in context + [target]], in_id, out_id, C,
                                            mc.use_delay_pattern, mc.encode_audio_in_tokens)
                            for target in codes[-2:])
        if d.max_tokens_per_batch and positions > d.max_tokens_per_batch:
            too_long.append(f"{pair.where}: the pair needs {positions} positions (its two sequences of up to "
                            f"{positions // 2}), more than data.max_tokens_per_batch={d.max_tokens_per_batch}")
        frames = pair.chosen.codes.shape[1] + pair.rejected.codes.shape[1]
        stopped = (pair.chosen.stopped is not False, pair.rejected.stopped is not False)
        # A cut candidate trains on other targets than a stopped one: its id says so, and with it the data
        # fingerprint a checkpoint keeps (files without the flag keep their ids).
        name = pair.name + "".join(f" ({role} cut)" for role, s in zip(("chosen", "rejected"), stopped) if not s)
        record = PairRecord(pair.where, name, pair.id, input_ids, label_ids, codes, positions,
                            frames / frame_rate if frame_rate else 0.0, stopped)
        listed_val = n >= len(train_pairs)
        (val if listed_val or (d.val_fraction and _in_val(pair.id, d.val_fraction)) else train).append(record)
    phases.mark("pairs tokenized")
    if too_long:  # a pair is never split, nor left out unsaid: raise the budget or drop the pair from the file
        raise DataError(too_long[0] + (f" ({len(too_long) - 1} more pair(s) too long)" if len(too_long) > 1 else ""))
    if not train:
        raise DataError(f"no training pairs in {d.preferences}" + (f" (data.val_fraction={d.val_fraction:g} took "
                                                                   f"them all)" if d.val_fraction else ""))
    if d.val_fraction and not val:
        raise DataError(f"data.val_fraction={d.val_fraction:g} selected none of the {len(train)} pairs' prompts; "
                        f"raise it or give data.val_preferences")
    unrecorded = sum(getattr(p, r).stopped is None for p in pairs for r in ("chosen", "rejected"))
    report = {"objective": "dpo", "preferences": d.preferences, "val_preferences": d.val_preferences,
              "train_samples": len(train), "val_samples": len(val), "train_pairs": len(train),
              "val_pairs": len(val), "prompts": len({r.prompt for r in train}),
              "train_audio_hours": sum(r.seconds for r in train) / 3600, "skipped": 0, "problems": [],
              "cut_candidates": sum(not s for r in train + val for s in r.stopped),
              "candidates_without_stopped": unrecorded,
              "startup_seconds": phases.seconds, "startup_cpu_seconds": phases.cpu_seconds}
    if env.is_main:
        path = Path(cfg.output_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, report)
        if not quiet:
            print(f"data: {len(train)} preference pairs of {report['prompts']} prompts"
                  + (f", {len(val)} held out" if val else "") + f"; ready in {phases.line()}", flush=True)
            if unrecorded:
                print(f"data: note: {unrecorded} candidate(s) in {d.preferences}"
                      + (f" / {d.val_preferences}" if d.val_preferences else "")
                      + " do not say whether they stopped by themselves (\"stopped\"): each is trained as ending "
                        "where its codes end; pairs from higgs-ddp prefs build get it by running the same build "
                        "again (it reuses the generated candidates)", flush=True)
    return Data(train, val, report)


def _references(pairs: list[Pair], cfg: Config, env: DistEnv, C: int, K: int, quiet: bool, phases: Phases) -> dict:
    """path -> codes of every pair's reference: .npy codes read, audio encoded through the code cache."""
    with_ref = [p for p in pairs if p.ref is not None]
    if not with_ref:
        return {}
    found = {}
    audio = [p for p in with_ref if not p.ref.is_codes]
    if audio:
        entries = [_Refs([p.ref]) for p in audio]
        codes, failed, _, _ = _audio_codes(entries, cfg, env, C, K, quiet, phases)
        for p in audio:
            if p.ref.path in failed:
                raise DataError(f"{p.where}: reference {failed[p.ref.path][1]}")
        found.update(codes)
    for p in with_ref:
        if p.ref.is_codes and p.ref.path not in found:
            try:
                found[p.ref.path] = load_codes_file(p.ref.path, p.ref.shown, C, K)
            except AudioProblem as e:
                raise DataError(f"{p.where}: reference {e}") from None
    return found


@dataclass
class _Refs:
    """What ``dataset._audio_codes`` reads of a manifest entry: its audio references."""
    audio: list
