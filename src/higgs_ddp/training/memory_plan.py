"""Model state per GPU by arithmetic, before any weight is built: will this run fit?

Per parameter: a frozen weight costs 2 bytes under bf16 (4 in fp32); a trainable one 16 (its fp32 weight,
fp32 gradient and AdamW's two fp32 moments), or 10.03 with ``train.optimizer=adamw8bit`` (each moment a uint8
code and an fp32 scale per 256 values: 1 + 4/256 bytes; the few tensors under 4096 values that keep fp32
moments, norms and biases, are under 0.01 % of the model and not counted). Under DDP every GPU holds all of it; under FSDP each of N GPUs
holds 1/N of it (frozen weights too), plus the largest sharding unit gathered whole while it computes (its
weights, and their gradients in backward). With ``train.fsdp.cpu_offload`` the shards live in host memory
and only the gathered unit is on the GPU. Activations are not modelled: they depend on the sequence length
and activation checkpointing (BENCHMARKS.md measures them), so a plan that fits can still run out.
train.objective=dpo with train.mode=audio_ffn or full adds the reference, a frozen copy of the starting model in the
policy's dtypes (training/preference.py): 4 bytes per trained parameter; the weights the policy does not train are
shared with it, except under FSDP, where the copy holds its own (2 bytes each in bf16, 4 in fp32) and each GPU 1/N of
the whole copy (none with cpu_offload: host memory). LoRA's reference is the adapter switched off: nothing more.
``speak`` and ``score`` hold the merged model's weights: 2 bytes each in bf16 (a GPU's default), 4 in fp32.

With model.quantize=nf4 (quantize.py) each frozen decoder-layer linear weight and the text head's cost 4 bits plus
their scales: an int8 per 64 weights, a second-level scale (the base's dtype) per 64 x 256 weights, and per tensor
the scales' mean and a 16-entry code table. In bf16 that is 0.5 + 1/64 + 2/16384 = 0.51575 bytes a weight; the rest of the
frozen base (embeddings, the audio head, norms) keeps 2.

    higgs-ddp bench --config configs/bench_3b.yaml --memory-table     # the table for the 5.8B model
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from higgs_ddp.config import Config, ConfigError

GB = 1e9
# Bytes per trained parameter besides its fp32 weight and fp32 gradient (8): AdamW's two moments.
MOMENT_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256)}


def trained_bytes(cfg: Config) -> float:
    """Bytes of one trained parameter: fp32 weight + fp32 gradient + the optimizer's two moments."""
    return 8 + MOMENT_BYTES[cfg.train.optimizer]


def inference_bytes(total_parameters: int, dtype: str) -> float:
    """What speak / score hold of the merged model: every weight in ``dtype`` (activations not counted)."""
    return total_parameters * (2 if dtype == "bf16" else 4)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    largest_unit: int  # parameters of the largest FSDP unit: a decoder layer, the embeddings or the heads
    # model.quantize=nf4: frozen weights stored in NF4, their int8 scales (one per 64), their second-level
    # scales, and how many tensors (each also holds a mean and a 16-entry table in the base dtype)
    nf4: int = 0
    nf4_blocks: int = 0
    nf4_scaler_blocks: int = 0
    nf4_tensors: int = 0

    def nf4_bytes(self, dtype_bytes: int) -> int:
        return (self.nf4 // 2 + self.nf4_blocks
                + (self.nf4_scaler_blocks + 17 * self.nf4_tensors) * dtype_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    parallel: str
    world_size: int
    frozen_bytes: float  # per GPU
    trainable_bytes: float  # weights + gradients + AdamW moments, per GPU
    gathered_bytes: float  # FSDP: one unit gathered whole, with its gradients
    nf4_bytes: float = 0.0  # of frozen_bytes, the NF4 weights' (model.quantize=nf4)
    optimizer: str = "adamw"
    reference_bytes: float = 0.0  # DPO's frozen reference copy (audio_ffn / full), per GPU

    @property
    def per_gpu_bytes(self) -> float:
        return self.frozen_bytes + self.trainable_bytes + self.reference_bytes + self.gathered_bytes

    def describe(self) -> str:
        extra = f" + {self.gathered_bytes / GB:.1f} gathered" if self.gathered_bytes else ""
        if self.reference_bytes:
            extra = f" + {self.reference_bytes / GB:.1f} DPO reference{extra}"
        nf4 = f" (of which {self.nf4_bytes / GB:.2f} NF4)" if self.nf4_bytes else ""
        moments = " with 8-bit AdamW moments" if self.optimizer == "adamw8bit" else ""
        return (f"{self.per_gpu_bytes / GB:.1f} GB of model state per GPU ({self.parallel} on {self.world_size}: "
                f"{self.frozen_bytes / GB:.1f} frozen{nf4} + {self.trainable_bytes / GB:.1f} trained{moments}{extra}; "
                f"activations not counted)")


def count_parameters(cfg: Config, model_config) -> ParameterCounts:
    """Counted on the meta device: the model as train.mode wraps it, without a single weight."""
    import torch

    from higgs_ddp.model import _import_higgs, apply_training_mode, unwrap

    _, HiggsAudioModel = _import_higgs()
    config = copy.deepcopy(model_config)
    with torch.device("meta"):
        model = apply_training_mode(HiggsAudioModel(config), cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    raw = unwrap(model)
    units = [*raw.layers, raw.embed_tokens, raw.audio_decoder_proj]
    largest = max(sum(p.numel() for p in u.parameters()) for u in units)
    if cfg.model.quantize != "nf4" or cfg.train.mode != "lora":
        return ParameterCounts(total, trainable, largest)
    from higgs_ddp.quantize import BLOCK, scaler_block, targets

    sizes = [m.weight.numel() for _, m in targets(raw)]
    return ParameterCounts(total, trainable, largest, nf4=sum(sizes), nf4_blocks=sum(n // BLOCK for n in sizes),
                           nf4_scaler_blocks=sum(n // BLOCK // scaler_block(n) for n in sizes),
                           nf4_tensors=len(sizes))


def reference_bytes(counts: ParameterCounts, cfg: Config, bf16: bool, sharded: bool) -> float:
    """DPO's frozen reference copy, whole: the starting weights the policy trains, in fp32, and unless ``sharded``
    (then it holds all its own) none of the others: they are the policy's tensors."""
    if cfg.train.objective != "dpo" or cfg.train.mode == "lora":
        return 0.0
    return counts.trainable * 4 + (counts.total - counts.trainable) * (2 if bf16 else 4) * sharded


def plan(counts: ParameterCounts, cfg: Config, world_size: int, bf16: bool) -> MemoryPlan:
    t = cfg.train
    dtype_bytes = 2 if bf16 else 4
    nf4 = counts.nf4_bytes(dtype_bytes)
    frozen = (counts.total - counts.trainable - counts.nf4) * dtype_bytes + nf4
    trained = counts.trainable * trained_bytes(cfg)
    if t.parallel != "fsdp" or (world_size == 1 and not t.fsdp.cpu_offload):
        return MemoryPlan("ddp" if world_size > 1 else "one device", world_size, frozen, trained, 0.0, nf4,
                          t.optimizer, reference_bytes(counts, cfg, bf16, sharded=False))
    # The unit's weights as gathered (bf16: the policy's, or frozen weights stored in bf16), and in backward
    # the fp32 gradients of its trained share.
    weight = 2 if t.fsdp.mixed_precision == "bf16" or (bf16 and counts.trainable < counts.total) else 4
    gathered = counts.largest_unit * (weight + 4 * counts.trainable / counts.total)
    if t.fsdp.cpu_offload:
        return MemoryPlan("fsdp, cpu_offload", world_size, 0.0, 0.0, gathered)
    return MemoryPlan("fsdp", world_size, frozen / world_size, trained / world_size, gathered, nf4 / world_size,
                      t.optimizer, reference_bytes(counts, cfg, bf16, sharded=True) / world_size)


def check_fits(memory_plan: MemoryPlan, gpu_bytes: float, cfg: Config, counts: ParameterCounts, bf16: bool) -> None:
    """ConfigError in one line when the model state alone exceeds a GPU, naming a setting that fits."""
    if memory_plan.per_gpu_bytes <= gpu_bytes:
        return
    fix = suggest(cfg, counts, memory_plan.world_size, gpu_bytes, bf16)
    raise ConfigError(f"this run needs {memory_plan.describe()}, more than the {gpu_bytes / GB:.0f} GB a GPU here "
                      f"holds: {fix}; or set train.check_memory=false to try anyway")


def suggest(cfg: Config, counts: ParameterCounts, world_size: int, gpu_bytes: float, bf16: bool) -> str:
    fix = _suggest_sharding(cfg, counts, gpu_bytes, bf16)
    if cfg.train.optimizer == "adamw" and cfg.train.parallel != "fsdp":
        eight_bit = plan(counts, _with(cfg, optimizer="adamw8bit"), world_size, bf16)
        if eight_bit.per_gpu_bytes <= gpu_bytes:
            fix = f"{fix}, or train.optimizer=adamw8bit would fit ({eight_bit.per_gpu_bytes / GB:.1f} GB each)"
    return fix


def _suggest_sharding(cfg: Config, counts: ParameterCounts, gpu_bytes: float, bf16: bool) -> str:
    whole = plan(counts, _with(cfg, parallel="fsdp"), 1, bf16)  # what all ranks together must hold
    state = whole.frozen_bytes + whole.trainable_bytes + whole.reference_bytes
    gathered = plan(counts, _with(cfg, parallel="fsdp"), 2, bf16).gathered_bytes
    room = gpu_bytes - gathered
    if room <= 0:
        return "train.mode=lora trains far fewer weights"
    gpus = max(2, math.ceil(state / room))
    offload = "train.fsdp.cpu_offload=true (the shards in host memory)"
    fits = f"train.parallel=fsdp on {gpus} or more GPUs would fit ({(state / gpus + gathered) / GB:.1f} GB each)"
    return fits if cfg.train.parallel != "fsdp" else f"{fits}, or {offload}"


def _with(cfg: Config, **train) -> Config:
    out = copy.deepcopy(cfg)
    for k, v in train.items():
        setattr(out.train, k, v)
    return out


def check_memory(cfg: Config, env, model_config, bf16: bool) -> None:
    """The run's check (GPU only; train.check_memory=false skips it): before any weight is built."""
    if env.device.type != "cuda" or not cfg.train.check_memory:
        return
    import torch

    counts = count_parameters(cfg, model_config)
    gpu = torch.cuda.get_device_properties(env.device).total_memory
    check_fits(plan(counts, cfg, env.world_size, bf16), gpu, cfg, counts, bf16)


def table(cfg: Config, model_config, gpu_counts=(1, 2, 4, 8)) -> str:
    """BENCHMARKS.md's rows: GB of model state per GPU, bf16 weights, for each mode x strategy x GPU count; then
    8-bit AdamW's (ddp), LoRA over an NF4 base and, in the first column, what speak / score hold of the merged
    model."""
    cfg = copy.deepcopy(cfg)
    cfg.model.quantize = "none"  # the rows below say where it is on
    rows = ["| mode | strategy | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpu_counts) + " |",
            "|---|---|" + "---|" * len(gpu_counts)]
    eight_bit, total = [], 0
    for mode in ("full", "audio_ffn", "lora"):
        counts = count_parameters(_with(cfg, mode=mode), model_config)
        for parallel in ("ddp", "fsdp"):
            c = _with(cfg, mode=mode, parallel=parallel, optimizer="adamw")
            cells = [f"{plan(counts, c, n, bf16=True).per_gpu_bytes / GB:.1f}" for n in gpu_counts]
            rows.append(f"| {mode} | {parallel} | " + " | ".join(cells) + " |")
        c = _with(cfg, mode=mode, parallel="ddp", optimizer="adamw8bit")  # not under fsdp (config.py)
        cells = [f"{plan(counts, c, n, bf16=True).per_gpu_bytes / GB:.1f}" for n in gpu_counts]
        eight_bit.append(f"| {mode} | ddp, adamw8bit | " + " | ".join(cells) + " |")
        total = counts.total if mode == "full" else total  # the merged model: no adapter weights
    blank = " |" * (len(gpu_counts) - 1)
    inference = [f"| speak / score | {dtype} weights | {inference_bytes(total, dtype) / GB:.1f} |{blank}"
                 for dtype in ("fp32", "bf16")]
    nf4 = _with(cfg, mode="lora", optimizer="adamw")
    nf4.model.quantize = "nf4"
    counts = count_parameters(nf4, model_config)
    nf4_rows = []
    for parallel in ("ddp", "fsdp"):
        c = _with(nf4, parallel=parallel)
        cells = [f"{plan(counts, c, n, bf16=True).per_gpu_bytes / GB:.1f}" for n in gpu_counts]
        nf4_rows.append(f"| lora, model.quantize=nf4 | {parallel} | " + " | ".join(cells) + " |")
    return "\n".join(rows + eight_bit + nf4_rows + inference)
