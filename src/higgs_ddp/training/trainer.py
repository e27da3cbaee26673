"""The pieces of a run: setup (model, data, DDP, optimizer), one optimizer step, and saving."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from higgs_ddp.config import Config, ConfigError, check_machine
from higgs_ddp.data.batching import StepBatchSampler, TokenBudgetBatchSampler
from higgs_ddp.data.collator import Batch, HiggsCollator
from higgs_ddp.data.dataset import Data, ManifestDataset, cache_dir, fingerprint, load_data
from higgs_ddp.data.pair_data import PairCollator, load_preference_data
from higgs_ddp.data.prefetch import Prefetcher
from higgs_ddp.dual_loss import compute_dual_loss
from higgs_ddp.errors import HiggsError
from higgs_ddp.evaluation.validation import Validatable
from higgs_ddp.model import HiggsForward, build_for_training, load_tokenizer, model_config, text_head, unwrap
from higgs_ddp.quantize import check as check_quantize
from higgs_ddp.quantize import is_nf4
from higgs_ddp.runtime import precision
from higgs_ddp.runtime.distributed import DistEnv, all_reduce_sum
from higgs_ddp.runtime.shared_fs import check_shared_directory, describe_nodes
from higgs_ddp.training.best import BestTracker
from higgs_ddp.training.checkpoint import (ModelState, OptimizerState, RngState,
                                           load_checkpoint, save_checkpoint)
from higgs_ddp.training.memory_plan import check_memory
from higgs_ddp.training.optim import SchedulerState, build_optimizer, build_scheduler
from higgs_ddp.training.parallel import build_strategy
from higgs_ddp.training.perf import compile_decoder_layers, enable_activation_checkpointing, enable_tf32
from higgs_ddp.training.preemption import leave_stop_signals_to_parent
from higgs_ddp.training.preference import (AdapterOff, FrozenCopy, PreferenceObjective, PreferenceStep,
                                          describe_validation, starting_copy)
from higgs_ddp.training.resume_policy import check_resumable
from higgs_ddp.training.run_files import save_weights
from higgs_ddp.training.shards import gather_full
from higgs_ddp.training.state import Attributes, DataPosition


class TrainingError(HiggsError, RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    text_loss: float
    audio_loss: float
    per_codebook_loss: list
    grad_norm: float
    text_targets: int
    audio_targets: int
    tokens: int
    samples: int
    padding_fraction: float  # of the positions the model computed, the share that was padding
    skipped: bool

    def row(self) -> dict:
        """What metrics.jsonl and TensorBoard get."""
        return dataclasses.asdict(self)

    def progress(self) -> dict:
        """The progress line's fields besides loss, lr and throughput."""
        return {"text": f"{self.text_loss:.3f}", "audio": f"{self.audio_loss:.3f}"}


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, data: Data | None = None, base=None):
        """``base``: (tokenizer, dtype) -> the HiggsAudioModel to start from, for train.init_from (the entry point
        passes tools/export.base_model: the earlier fine-tune merged into its base)."""
        self.cfg, self.env = cfg, env
        t = cfg.train
        check_machine(cfg, env.device.type)  # flash-attn and CPU offload need a GPU
        check_quantize(cfg, env.world_size)  # model.quantize=nf4: its mode, FSDP rank counts
        if t.init_from and base is None:
            raise ConfigError("train.init_from is read by the training command (higgs-ddp train); this caller "
                              "builds its own model")
        dpo = t.objective == "dpo"
        hosts = check_shared_directory(cfg.output_dir, "output_dir", env)  # before anything is written there
        if data is None and (cfg.data.cache_dir or cfg.data.manifest or dpo):  # it prepares its data: the code cache,
            # checked now, not after the model has loaded (no manifest: load_data says so)
            check_shared_directory(cache_dir(cfg), "data.cache_dir", env)
        if env.is_main and env.distributed:  # what the launcher(s) made of the allocation
            print(f"world: {describe_nodes(hosts)}", flush=True)
        self.precision = precision.describe(cfg, env.device)  # bf16 autocast (GPU or CPU) or fp32

        self.tokenizer = load_tokenizer(cfg)
        check_memory(cfg, env, model_config(cfg, self.tokenizer), self.precision == "bf16")  # GPU: will it fit?
        if dpo and data is None:  # every pair and its codes checked before any weight is built
            data = load_preference_data(cfg, env, self.tokenizer, model_config(cfg, self.tokenizer))
        dtype = precision.weight_dtype(cfg, env.device)
        self.model = build_for_training(cfg, self.tokenizer, dtype, device=env.device,
                                        base=base(self.tokenizer, dtype) if t.init_from else None)
        self.raw = unwrap(self.model)
        self.strategy = build_strategy(cfg, env)  # (it wraps the model last, after checkpointing and compile)
        # DPO's reference for audio_ffn / full: the starting weights, copied before anything changes the policy
        # (lora needs no copy: its reference is the adapter switched off). Not a checkpointed state: a resume
        # builds the same starting model and copies it again.
        start = (starting_copy(self.raw, share_frozen=not self.strategy.collective_forward)
                 if dpo and t.mode != "lora" else None)

        mc = self.raw.config
        # Before the model moves to the GPU: preparing new audio loads the codec there for a while.
        self.data = data or load_data(cfg, env, self.tokenizer, mc)  # (the benchmark brings its own)
        self.dataset = ManifestDataset(self.data.train)
        self.val_dataset = ManifestDataset(self.data.val)
        if cfg.eval.every and not len(self.val_dataset):
            raise ConfigError("eval.every needs a validation set: data.val_manifest or data.val_fraction")
        if cfg.eval.prompts:  # every rank: they must all stop, or the others would wait at a collective
            from higgs_ddp.evaluation.listening import check_prompts
            problems = check_prompts(cfg)  # now, not hours later at the first sample
            if problems:
                raise ConfigError("; ".join(problems))
        from higgs_ddp.evaluation.scoring import Scorer, check_models
        problems = check_models(cfg)  # every rank, at start: ASR and speaker weights are never downloaded
        if problems:
            raise ConfigError("; ".join(problems))
        self.scorer = Scorer(cfg, env.device) if cfg.eval.prompts else None  # loads the models at first use
        if cfg.eval.best_by == "val_loss" and not len(self.val_dataset):
            raise ConfigError("eval.best_by=val_loss needs a validation set: data.val_manifest or data.val_fraction")
        self.tracker = BestTracker(cfg.eval.best_by, cfg.eval.early_stop_patience)
        t_plan = time.perf_counter()
        if cfg.data.max_tokens_per_batch:
            self.sampler = TokenBudgetBatchSampler(self.dataset.lengths, cfg.data.max_tokens_per_batch,
                                                   t.grad_accum_steps, env.rank, env.world_size, t.seed,
                                                   cfg.data.shuffle)
        else:
            self.sampler = StepBatchSampler(len(self.dataset), t.micro_batch_size, t.grad_accum_steps, env.rank,
                                            env.world_size, t.seed, cfg.data.shuffle)
        self.data.report.setdefault("startup_seconds", {})["batching plan"] = time.perf_counter() - t_plan
        self.model.to(env.device)
        self.model.train()
        # workers build CPU batches; pinned, then copied. Pairs: 2P sequences a micro-batch (pair_data.py)
        self.collator = PairCollator.for_model(mc) if dpo else HiggsCollator.for_model(mc)
        workers = cfg.data.num_workers
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenized before the workers fork
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=self.collator, num_workers=workers,
            pin_memory=env.device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor if workers else None,
            # One iterator serves the whole run (the sampler never ends); persistent workers would only
            # outlive it, past Prefetcher.close, to an exit handler that distributed.exit_process skips.
            persistent_workers=False,
            # Slurm's and torchrun's stop signals reach the workers too: the training process decides.
            worker_init_fn=leave_stop_signals_to_parent,
            # Its own generator: starting an iterator draws a seed, and from the global generator that draw
            # would shift dropout after a resume.
            generator=torch.Generator().manual_seed(t.seed))

        perf = []  # what rank 0 reports in the run card
        if cfg.model.quantize == "nf4":
            perf.append(f"NF4 base ({sum(map(is_nf4, self.raw.parameters()))} frozen linear weights)")
        if env.device.type == "cuda":
            enable_tf32()
        if t.activation_checkpointing:
            perf.append(f"activation checkpointing ({enable_activation_checkpointing(self.raw)} layers)")
        if t.compile:
            perf.append(f"torch.compile ({compile_decoder_layers(self.raw)} layers)")
        self.perf = perf
        self.text_head = text_head(self.raw) if t.text_logits == "supervised" else None
        if self.text_head is not None and t.find_unused_parameters and any(
                p.requires_grad for p in self.text_head.parameters()):
            # The deferred head runs after DDP's forward: DDP's search for unused weights would miss it.
            raise ConfigError("train.find_unused_parameters=true with a trained text head needs "
                              "train.text_logits=all")
        # The wrapper last, after checkpointing and compile (torchtitan's order)
        self.wrapped = self.strategy.wrap(HiggsForward(self.model, defer_text_head=self.text_head is not None))
        # Collected after wrapping: FSDP2 replaces each parameter by its shard (same names).
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.params, t.lr, t.betas, t.weight_decay, env.device, t.optimizer)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.reference = None if not dpo else (AdapterOff(self) if start is None else FrozenCopy(
            start, self.strategy, defer_text_head=self.text_head is not None, compile=t.compile))
        self.preference = PreferenceObjective(self) if dpo else None  # the DPO step and validation
        self.alignment = t.loss_alignment
        self.verified = False  # the first step checks label convention and target counts
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.step = 0  # optimizer steps taken or skipped: where the schedule and the data stand
        # Everything a checkpoint saves and a resume restores, registered once (training/state.py says how to
        # add more: one object with state_dict/load_state_dict, one line here). Loaded in this order: the
        # weights first (a checksum failure leaves the rest untouched), the step before the data position.
        self.states = {
            "model": ModelState(self.model, self.named_params),
            "step": Attributes(self, "step"),
            "data": DataPosition(self.sampler, lambda: self.data_fingerprint, lambda: self.step),
            "counters": Attributes(self, "bad_in_row", "skipped_steps", "alignment", "verified"),
            "best": self.tracker,
            "optimizer": OptimizerState(self.optimizer, self.named_params),
            "scheduler": SchedulerState(self.scheduler),
            "rng": RngState(env),
        }

    @property
    def autocast(self) -> torch.autocast:
        """The step's numerics, a fresh context each time: ``with trainer.autocast: ...``."""
        return precision.autocast(self.cfg, self.env.device)

    def batches(self) -> Prefetcher:
        """This rank's micro-batches, endlessly, fetched (and put on the device) a step ahead."""
        return Prefetcher(iter(self.loader), self.env.device)

    @functools.cached_property
    def codec(self):
        """The audio codec, loaded on first use (listening samples: the ranks that speak a prompt)."""
        from higgs_ddp.data.codec import load_codec
        return load_codec(self.cfg.data.codec, self.cfg.data.codec_revision, device=self.env.device)

    def memory(self) -> dict:
        if self.env.device.type != "cuda":
            return {}
        return {"gpu_memory_gb": torch.cuda.max_memory_allocated(self.env.device) / 1e9}

    @functools.cached_property
    def data_fingerprint(self) -> dict:
        return fingerprint(self.data.train)

    def save_checkpoint(self) -> Path:
        """Collective: ``checkpoints/step_N`` of every registered state, N the steps taken."""
        return save_checkpoint(self.cfg.output_dir, self.step, self.states, config=self.cfg.to_dict(), env=self.env,
                               keep_last=self.cfg.train.keep_last)

    def resume(self, path: Path) -> int:
        """Continue from a checkpoint: weights, optimizer, schedule, data position, RNG. Returns its step."""
        t = self.cfg.train
        check_resumable(path, self.cfg.to_dict(), self.data_fingerprint, self.env.world_size, t.resume_accept)
        state, notes = load_checkpoint(path, self.states, self.env)
        step = self.step
        if state["world_size"] != self.env.world_size and self.env.is_main:
            epoch, micro = self.sampler.position(step)
            print(f"resume: {state['world_size']} ranks saved this checkpoint, {self.env.world_size} run now "
                  f"(accepted by train.resume_accept): the data continues at the same micro-batch (epoch {epoch}, "
                  f"micro-batch {micro}), nothing is replayed or skipped; their RNG states are not restored",
                  flush=True)
        if step > t.max_steps:
            raise ConfigError(f"{path} is at step {step}, past train.max_steps={t.max_steps}")
        note = notes.get("best") or self._best_folder_after_resume(Path(path))
        if note and self.env.is_main:
            print(f"resume: {note}", flush=True)
        return step

    def _best_folder_after_resume(self, ckpt: Path) -> str:
        """A run resumed from another run's checkpoint takes that run's best/ along when it holds the best the
        checkpoint recorded (rank 0 copies it); a note otherwise. best/ already in output_dir is this run's
        own (written after its checkpoint, by steps about to be redone identically): it stays."""
        import json
        import shutil

        t = self.tracker
        here, there = Path(self.cfg.output_dir) / "best", ckpt.parent.parent / "best"
        if t.best_step is None or (here / "best.json").is_file() or here.resolve() == there.resolve():
            return ""
        try:
            saved = json.loads((there / "best.json").read_text())
        except (OSError, ValueError):
            saved = {}
        if (saved.get("metric"), saved.get("step")) != (t.metric, t.best_step):
            return f"{t.describe()}, whose weights are not in {there}: best/ is written at the next improvement"
        if self.env.is_main:
            shutil.copytree(there, here)
        return f"{t.describe()}: best/ copied from {there}"

    def run_card(self, **replaced) -> str:
        """What rank 0 prints before the first step; ``replaced`` rows by name say what a caller that is no
        training run does instead (the benchmark: its data, its steps, no output)."""
        t, env, d, m = self.cfg.train, self.env, self.cfg.data, self.cfg.model
        total = sum(p.numel() for p in self.model.parameters())
        model = (f"random HiggsAudioModel, {total / 1e6:,.1f}M parameters" if m.init == "random"
                 else f"{m.path}" + (f" @ {m.revision[:10]}" if m.revision else "") + f", {total / 1e9:.2f}B parameters")
        positions = int(self.dataset.lengths.sum())
        unit = "samples" if self.preference is None else "pairs"  # (a pair: its chosen and rejected sequences)
        val = f"; validation {len(self.val_dataset)} {unit}" if len(self.val_dataset) else "; no validation set"
        per_micro = (f"up to {d.max_tokens_per_batch} positions" if d.max_tokens_per_batch
                     else f"{t.micro_batch_size} {unit}")
        per_step = t.micro_batch_size * t.grad_accum_steps * env.world_size
        epochs = t.max_steps * per_step / max(len(self.dataset), 1)
        batch = (f"{env.world_size} ranks x {t.grad_accum_steps} micro-steps x {per_micro}"
                 + ("" if d.max_tokens_per_batch else f" = {per_step} {unit} per step"))
        training = f"{t.mode}, {self.num_trainable:,} trainable parameters ({100 * self.num_trainable / total:.2f} %)"
        if self.preference is not None:
            p = self.cfg.dpo
            training += (f"; DPO, beta {p.beta:g}" + (f", sft_weight {p.sft_weight:g}" if p.sft_weight else "")
                         + (", length-normalised" if p.length_normalized else "")
                         + f"; reference: {t.init_from or 'the base model'} ({self.reference.describe})")
        rows = [
            ("model", model),
            ("training", training),
            ("data", f"{len(self.dataset)} {unit}, {self.data.report['train_audio_hours']:.2f} h of audio, "
                     f"{positions:,} positions{val}"),
            ("batch", batch),
            ("schedule", f"{t.max_steps} steps" + ("" if d.max_tokens_per_batch else f" (~{epochs:.1f} epochs)")
                         + f", lr {t.lr:g}, warmup {t.warmup_steps}"),
            ("runs on", f"{env.world_size} x {env.device.type}, {self.strategy.describe()}, {self.precision}" + "".join(f", {p}" for p in self.perf)),
            ("output", self.cfg.output_dir),
        ]
        rows = {**dict(rows), **replaced}
        return "higgs-ddp run card\n" + "\n".join(f"  {k:<9} {v}" for k, v in rows.items())

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def validate(self) -> tuple[dict, str]:
        """One validation pass (collective) -> (its metrics row, the line that says it)."""
        if self.preference is not None:
            row = self.preference.evaluate()
            return row, describe_validation(row)
        from higgs_ddp.evaluation.validation import evaluate

        row = evaluate(self.validatable())
        acc = ", ".join(f"{a:.2f}" for a in row["per_codebook_acc"])
        return row, (f"validation loss {row['loss']:.4f} (text {row['text_loss']:.4f}, audio {row['audio_loss']:.4f}; "
                     f"codebook accuracy {acc})")

    def validatable(self) -> Validatable:
        """The narrow view of this trainer that evaluation/validation.py scores (its only way in)."""
        module = self.strategy.eval_module(self.wrapped)  # no gradients: no DDP bookkeeping

        def batch(indices: list) -> Batch:
            return self.collator([self.val_dataset[i] for i in indices]).to(self.env.device, non_blocking=True)

        def score(b: Batch):
            with self.autocast:
                return self.loss(module(**b.model_inputs()), b, check=False, accuracy=True)

        t = self.cfg.train
        return Validatable(self.env, len(self.val_dataset), t.micro_batch_size, self.cfg.eval.max_batches,
                           self.raw.config.audio_num_codebooks, t.text_weight, t.audio_weight, batch, score,
                           self.strategy.collective_forward, self.model)

    def loss(self, out: dict, b: Batch, check: bool, accuracy: bool = False):
        t = self.cfg.train
        return compute_dual_loss(
            out.get("logits"), out["expanded_labels"], out["audio_logits"], b.label_audio_ids,
            expanded_input_ids=out["expanded_input_ids"] if check else None,
            audio_out_ids=b.audio_out_ids if check else None,
            audio_out_ids_start=b.audio_out_ids_start, alignment=self.alignment,
            text_weight=t.text_weight, audio_weight=t.audio_weight, validate=check,
            text_hidden=out.get("text_hidden"), text_head=self.text_head, chunk_rows=t.text_logits_chunk,
            accuracy=accuracy)

    def train_step(self, micro: list[Batch]) -> StepResult | PreferenceStep:
        """One optimizer step on this rank's micro-batches (the objective's forwards and backwards, then the
        update shared by every objective)."""
        micro = [b.to(self.env.device, non_blocking=True) for b in micro]
        if self.preference is not None:
            loss, fields = self.preference.accumulate(micro)
            grad_norm, finite = self.update(loss)
            return PreferenceStep(loss=loss, grad_norm=grad_norm, skipped=not finite, **fields)
        return self.supervised_step(micro)

    def supervised_step(self, micro: list[Batch]) -> StepResult:
        env, t = self.env, self.cfg.train
        # Global supervised-token counts over all micro-steps and ranks, known before any backward:
        # every token weighs the same however the global batch is split.
        counts = torch.tensor([[b.text_targets, b.audio_targets, b.num_positions, b.padded_positions,
                                b.num_samples] for b in micro], dtype=torch.float64).sum(0)
        counts = all_reduce_sum(counts.to(env.device))
        g_text, g_audio, g_tokens, g_padded, g_samples = counts.tolist()
        C = self.raw.config.audio_num_codebooks
        sums = torch.zeros(2 + 2 * C, dtype=torch.float64, device=env.device)
        for i, b in enumerate(micro):
            self.strategy.set_sync(self.wrapped, last=i == len(micro) - 1)
            # Verify the label convention on the first step; the aligned path is verified on every step.
            check = not self.verified or self.alignment == "aligned"
            with self.autocast:  # the deferred text head runs inside the loss, so the loss is under it too
                out = self.wrapped(**b.model_inputs())
                dl = self.loss(out, b, check)
            if check:
                if (int(dl.text_tokens), int(dl.audio_tokens)) != (b.text_targets, b.audio_targets):
                    raise TrainingError(
                        f"loss counted {int(dl.text_tokens)}/{int(dl.audio_tokens)} text/audio targets, "
                        f"the collator {b.text_targets}/{b.audio_targets}: normalisation would be wrong")
                self.alignment = dl.path
            # Normalised by the global target counts; grad_scale undoes the wrapper's mean over ranks.
            dl.normalized(g_text, g_audio, scale=self.strategy.grad_scale).backward()
            sums += torch.cat([torch.stack([dl.text_loss_sum.detach(), dl.audio_loss_sum.detach()]),
                               dl.per_codebook_loss_sum, dl.per_codebook_tokens]).double()
        self.verified = True
        sums = all_reduce_sum(sums)
        text_loss = (sums[0] / max(g_text, 1)).item()
        audio_loss = (sums[1] / max(g_audio, 1)).item()
        per_cb = (sums[2:2 + C] / sums[2 + C:].clamp(min=1)).tolist()
        loss = t.text_weight * text_loss + t.audio_weight * audio_loss
        grad_norm, finite = self.update(loss)
        return StepResult(loss=loss, text_loss=text_loss, audio_loss=audio_loss, per_codebook_loss=per_cb,
                          grad_norm=grad_norm, text_targets=int(g_text), audio_targets=int(g_audio),
                          tokens=int(g_tokens), samples=int(g_samples),
                          padding_fraction=1.0 - g_tokens / max(g_padded, 1), skipped=not finite)

    def update(self, loss: float) -> tuple[float, bool]:
        """The accumulated gradients clipped and applied (or the step skipped when the loss or the gradient is
        not finite), the schedule advanced -> (grad_norm, whether the step was applied)."""
        t = self.cfg.train
        grad_norm = self.strategy.clip_grad_norm_(self.params, t.max_grad_norm)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # identical on every rank
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.bad_in_row += 1
            self.skipped_steps += 1
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (it is indexed by optimizer steps taken or
            # skipped); torch warns about scheduler.step() without optimizer.step(), which is intended here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_in_row >= t.max_bad_steps:
            raise TrainingError(
                f"{self.bad_in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(last: loss={loss}, grad_norm={grad_norm}); stopping. Lower train.lr or check the data.")
        self.step += 1
        return grad_norm, finite

    def save_final(self) -> Path:
        """The trained tensors, whole, in the formats export and the inference engine read. Collective: with
        sharded weights every rank takes part in gathering them to rank 0, one tensor at a time."""
        return self.save_weights("final")

    def evaluated(self, step: int, value, why: str = "") -> None:
        """One evaluation of eval.best_by (the same value on every rank): best/ rewritten when it improved
        (collective), the evaluations without improvement counted towards eval.early_stop_patience. A value
        that could not be measured (None; ``why`` says why) is warned about and counts for nothing."""
        from tqdm import tqdm

        t = self.tracker
        if value is None:
            if self.env.is_main:
                tqdm.write(f"step {step}: warning: eval.best_by={t.metric} could not be measured "
                           f"({why or 'no sample gave a value'}); this evaluation does not count"
                           + (f" towards eval.early_stop_patience={t.patience}" if t.patience else "")
                           + f" and best/ is not written; {t.describe()}")
            return
        if t.update(step, value):
            path = self.save_best(step)
            if self.env.is_main:
                tqdm.write(f"step {step}: new {t.describe()}; weights in {path}")
        elif self.env.is_main and t.patience:
            tqdm.write(f"step {step}: {t.metric} {value:.4f}, no better than the {t.describe()} "
                       f"({t.since_best} of eval.early_stop_patience={t.patience})")

    def best_folder(self) -> Path | None:
        """``output_dir/best`` when it holds the tracker's best (it may not: no value was ever measured, or a
        resume from another run's checkpoint whose best/ stayed there); None otherwise, so that no message
        names a folder that was not written."""
        import json

        t, best = self.tracker, Path(self.cfg.output_dir) / "best"
        try:
            saved = json.loads((best / "best.json").read_text())
        except (OSError, ValueError):
            return None
        return best if t.best_step is not None and (saved.get("metric"), saved.get("step")) == (t.metric, t.best_step) \
            else None

    def save_best(self, step: int) -> Path:
        """``best/``: the weights as they are now, in final/'s formats, with ``best.json`` saying why.
        Collective, like save_final."""
        t = self.tracker
        return self.save_weights("best", {"metric": t.metric, "value": t.best, "step": step})

    def save_weights(self, name: str, note: dict | None = None) -> Path:
        """``{output_dir}/{name}/`` in final/'s formats (run_files.save_weights); rank 0 writes it."""
        state = gather_full(self.named_params, keep=self.env.is_main, device=self.env.device)
        out = Path(self.cfg.output_dir) / name
        if self.env.is_main:
            save_weights(out, self.model, state, self.cfg.train.mode, self.raw.config, self.tokenizer, note)
        return out
