"""The peer the benchmark compares us with: the training loop of the public Higgs Audio fine-tuning repos.

Those repos subclass ``transformers.Trainer``, override ``compute_loss``, call the (peft-wrapped)
HiggsAudioModel once per micro-batch and take cross-entropy over everything it returns: the text head
applied to every position (B, T, 128256), upcast to fp32, and the audio logits. Here that loop runs on
exactly our model (same builder, LoRA, fp32 LoRA weights, precision), our collator and the same samples,
so ``higgs-ddp bench`` measures the speed ratio in one process. Their loss bugs are not copied
(the labels are shifted correctly): we compare speed, not mistakes. What stays is what costs time: full
vocabulary logits and their fp32 copies, accelerate's autocast wrapper, the Trainer's per-micro-batch NaN
check and FLOP count, and its per-step logging (each a host-device sync).
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from higgs_ddp.config import Config, ConfigError, uses_bf16
from higgs_ddp.data.collator import IGNORE, HiggsCollator
from higgs_ddp.data.dataset import Data, ManifestDataset
from higgs_ddp.model import build_for_training, load_tokenizer, unwrap
from higgs_ddp.runtime.distributed import DistEnv, all_reduce_sum
from higgs_ddp.runtime.precision import weight_dtype
from higgs_ddp.training.perf import enable_tf32


class _DictCollator:
    """Our collator, returning a dict: Trainer moves only Mappings to the device. The positions travel
    with the batch (as an int) because with workers the collator runs in another process."""

    def __init__(self, collator: HiggsCollator):
        self.collator = collator

    def __call__(self, samples) -> dict:
        b = self.collator(samples)
        return {**b.model_inputs(), "label_audio_ids": b.label_audio_ids, "num_positions": b.num_positions}


class _Clock(TrainerCallback):
    """Per-step wall time from one step's end to the next: data fetch, forward, backward, clipping, AdamW
    and the Trainer's own logging all fall inside, as in the benchmark's timing of our loop."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.micro_losses, self.micro_positions = [], 0  # of the step in progress
        self.losses, self.times, self.positions, self.t_last, self.first_micro_loss = [], [], 0, None, None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.t_last is None:  # only matters with warmup=0
            self.t_last = self._now()
            if self.warmup == 0 and self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.losses.append(torch.stack(self.micro_losses).mean())  # a tensor: no extra sync per step
        if state.global_step > self.warmup:
            self.times.append(now - self.t_last)
            self.positions += self.micro_positions
        elif state.global_step == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.micro_losses, self.micro_positions, self.t_last = [], 0, now


class PeerTrainer(Trainer):
    """The public trainers' shape: Trainer drives the loop, compute_loss calls the model per micro-batch."""

    clock = None
    text_weight = audio_weight = 1.0

    def _get_train_sampler(self, *args, **kwargs):
        # In order, not Trainer's RandomSampler: deterministic, and the first batch is the one our
        # Trainer sees with data.shuffle=false (the equivalence test). Every benchmark sample has the
        # same length, so the order changes no cost.
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # Trainer still reads the original dict (its FLOP estimate)
        self.clock.micro_positions += inputs.pop("num_positions")
        label_audio = inputs.pop("label_audio_ids")
        outputs = model(**inputs, use_cache=False, return_dict=True)
        logits, labels = outputs.logits, outputs.expanded_labels
        V = logits.shape[-1]
        text = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
        audio_logits = outputs.audio_logits  # (N, C, K); each segment's first label column is ignored,
        K = audio_logits.shape[-1]  # so shifting across a segment boundary trains nothing
        audio = F.cross_entropy(audio_logits[:-1].reshape(-1, K).float(),
                                label_audio[:, 1:].transpose(0, 1).reshape(-1), ignore_index=IGNORE)
        loss = self.text_weight * text + self.audio_weight * audio
        self.clock.micro_losses.append(loss.detach())
        if self.clock.first_micro_loss is None:
            self.clock.first_micro_loss = loss.detach()
        return (loss, outputs) if return_outputs else loss


def run_peer(cfg: Config, env: DistEnv, data: Data, steps: int, warmup: int) -> dict:
    """Train ``warmup + steps`` optimizer steps with the peer; returns tokens_per_s (global: all ranks'
    text + audio positions), step_time_s (median of the timed steps), peak_memory_bytes (CUDA, timed steps;
    None on CPU), losses (per step, this rank), first_micro_loss, gradient_checkpointing."""
    t, cuda = cfg.train, env.device.type == "cuda"
    if steps < 1:
        raise ValueError(f"run_peer needs steps >= 1, got {steps}")
    if cfg.data.max_tokens_per_batch:  # ours would batch by token budget, the peer by count: unlike batches
        raise ConfigError("the peer takes train.micro_batch_size samples per micro-batch, as the public "
                          "trainers do; compare with data.max_tokens_per_batch=0")
    use_bf16 = uses_bf16(cfg, env.device.type)  # as ours: bf16 autocast on a GPU or a CPU
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    tokenizer = load_tokenizer(cfg)
    model = build_for_training(cfg, tokenizer, weight_dtype(cfg, env.device), device=env.device)  # exactly our Trainer's
    raw = unwrap(model)
    if cuda:
        enable_tf32()  # ours turns it on too (process-wide flags)
    # The public trainers set gradient_checkpointing=True. HiggsAudioModel's decoder loop never calls
    # _gradient_checkpointing_func, so transformers can only flag modules carrying a `gradient_checkpointing`
    # attribute: the Whisper audio tower (never run in TTS), saving nothing; without the tower it raises
    # ValueError. So we ask for it exactly where transformers accepts it, and report whether it was on.
    ckpt = t.activation_checkpointing and any(hasattr(m, "gradient_checkpointing") for m in raw.modules())
    workers = cfg.data.num_workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as ours: tokenized before the workers fork
    clock = _Clock(warmup, env.device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            # num_train_epochs=0: max_steps alone decides, without Trainer's "max_steps overrides" warning.
            output_dir=out, max_steps=warmup + steps, num_train_epochs=0,
            per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum_steps,
            learning_rate=t.lr, warmup_steps=t.warmup_steps,
            # Ours, except that HF's warmup starts at lr 0 (ours at lr / warmup_steps): the same cost.
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
            weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
            max_grad_norm=t.max_grad_norm, bf16=use_bf16, use_cpu=not cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_num_workers=workers,
            dataloader_prefetch_factor=cfg.data.prefetch_factor if workers else None,
            dataloader_persistent_workers=workers > 0, dataloader_pin_memory=cuda, remove_unused_columns=False,
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=t.seed,
            gradient_checkpointing=ckpt, ddp_find_unused_parameters=False if env.world_size > 1 else None)
        # One process drives one GPU: with several visible, Trainer would wrap the model in DataParallel.
        args._n_gpu = min(args.n_gpu, 1)
        if (args.device.type, args.device.index or 0) != (env.device.type, env.device.index or 0):
            raise RuntimeError(f"transformers.Trainer would train on {args.device}, this rank runs on {env.device}")
        trainer = PeerTrainer(model=model, args=args, train_dataset=ManifestDataset(data.train),
                              data_collator=_DictCollator(HiggsCollator.for_model(raw.config)), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # prints every step's logs (with tqdm off)
        trainer.clock, trainer.text_weight, trainer.audio_weight = clock, t.text_weight, t.audio_weight
        trainer.train()
    peak = torch.cuda.max_memory_allocated(env.device) if cuda else None
    positions = all_reduce_sum(torch.tensor([clock.positions], dtype=torch.float64, device=env.device)).item()
    losses = torch.stack(clock.losses).tolist()
    step_time = statistics.median(clock.times)  # medians, as the benchmark reports ours
    result = {"tokens_per_s": positions / len(clock.times) / step_time, "step_time_s": step_time,
              "peak_memory_bytes": peak, "losses": losses, "first_micro_loss": clock.first_micro_loss.item(),
              "gradient_checkpointing": ckpt}
    del trainer, model, raw, clock
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    transformers.logging.set_verbosity(verbosity)
    return result
