"""The peers' data path beside ours: ``higgs-ddp bench --nproc-per-node 2 --config configs/tiny.yaml --data-peer N``.

The public Higgs trainers encode every clip with the codec in their Dataset's ``__getitem__``, on every
epoch. This mode writes the demo's WAV corpus of N clips, and on the same model, codec, sampler,
collator and step runs ``bench.steps`` optimizer steps twice, end to end:

- ours: the whole start-up from an empty code cache (every clip encoded once, the prompts tokenized),
  then the steps, batches built from the codes in memory;
- theirs: reading the manifest and loading the codec, then the same steps with a Dataset that reads,
  resamples and encodes each clip and tokenizes its prompt whenever the sampler asks for it.

Ours pays for the encoding once, theirs once per epoch: the ratio grows with the epochs (``bench.steps``).

The last line is one JSON object: samples/s of both and ours over theirs (``data_peer_ratio``).
"""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path

import torch

from higgs_ddp.config import Config
from higgs_ddp.data.audio import read_audio, resample
from higgs_ddp.data.manifest import read_manifest
from higgs_ddp.data.prefetch import Prefetcher
from higgs_ddp.data.prompt import tokenize_chatml
from higgs_ddp.runtime.distributed import DistEnv, barrier


class EncodeOnFetch(torch.utils.data.Dataset):
    """The peers' Dataset: the codec runs on every fetch of every clip."""

    def __init__(self, records: list, entries: dict, codec, tokenizer, max_seconds: float):
        self.records, self.entries, self.codec = records, entries, codec
        self.tokenizer, self.max_seconds = tokenizer, max_seconds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        e = self.entries[self.records[i].id]
        codes = []
        for ref in e.audio:
            wave, sr = read_audio(ref.path, ref.shown, self.max_seconds, self.codec.min_seconds)
            codes.append(self.codec.encode(resample(torch.from_numpy(wave), sr, self.codec.sample_rate)))
        return tokenize_chatml(self.tokenizer, e.chatml, codes, e.id)


def steps(trainer, batches, n: int) -> int:
    """n optimizer steps; -> the samples they trained on (all ranks)."""
    samples = 0
    for _ in range(n):
        samples += trainer.train_step([next(batches) for _ in range(trainer.cfg.train.grad_accum_steps)]).samples
    batches.close()
    return samples


def run(cfg: Config, env: DistEnv, clips: int, source: str = "") -> dict:
    from higgs_ddp.data.codec import load_codec
    from higgs_ddp.tools.demo_data import write_demo_corpus
    from higgs_ddp.training.trainer import Trainer

    root = Path(cfg.output_dir) / f"peer-corpus-{clips}"
    cfg.data.manifest, cfg.data.val_manifest, cfg.data.val_fraction = [str(root / "manifest.jsonl")], [], 0.0
    cfg.data.cache_dir = str(root / ".higgs_codes")
    cfg.eval.every, cfg.eval.prompts, cfg.logging.tensorboard = 0, [], False
    if env.is_main:
        shutil.rmtree(root, ignore_errors=True)  # ours starts from an empty code cache
        write_demo_corpus(root, samples=clips, with_reference_every=0, audio=True)
    barrier()
    n = cfg.bench.steps
    barrier()
    t0 = time.perf_counter()
    trainer = Trainer(cfg, env)  # prepare: every clip encoded once, then tokenized
    ours = steps(trainer, trainer.batches(), n)
    ours_s = time.perf_counter() - t0

    barrier()
    t0 = time.perf_counter()  # their start-up: the manifest and the codec (ours loaded it to encode)
    entries = {e.id: e for e in read_manifest(cfg.data.manifest[0])[0]}
    codec = load_codec(cfg.data.codec, cfg.data.codec_revision, device=env.device)
    dataset = EncodeOnFetch(trainer.data.train, entries, codec, trainer.tokenizer, cfg.data.max_audio_seconds)
    w = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=trainer.sampler, collate_fn=trainer.collator,
                                         num_workers=w, prefetch_factor=cfg.data.prefetch_factor if w else None)
    theirs = steps(trainer, Prefetcher(iter(loader), env.device), n)
    theirs_s = time.perf_counter() - t0
    return {
        "data_peer": clips, "config": source, "date": datetime.date.today().isoformat(),
        "device": "cpu" if env.device.type == "cpu" else torch.cuda.get_device_name(env.device),
        "world_size": env.world_size, "steps": n, "epochs": ours / len(trainer.dataset),
        "audio_hours": trainer.data.report["train_audio_hours"],
        "ours": {"samples": ours, "seconds": ours_s, "samples_per_s": ours / ours_s},
        "theirs": {"samples": theirs, "seconds": theirs_s, "samples_per_s": theirs / theirs_s},
        "data_peer_ratio": (ours / ours_s) / (theirs / theirs_s),
    }


def table_rows(results: list) -> str:
    """BENCHMARKS.md rows from data-peer JSON results."""
    return "\n".join(
        f"| {r['data_peer']} WAV clips, {r['audio_hours'] * 3600:,.0f} s of audio | {r['device']} ×{r['world_size']} | "
        f"{r['date']} | `{r['config']}` | {r['steps']} steps ({r['epochs']:.1f} epochs) | "
        f"{r['ours']['samples_per_s']:,.1f} ({r['ours']['seconds']:.1f} s) | "
        f"{r['theirs']['samples_per_s']:,.1f} ({r['theirs']['seconds']:.1f} s) | {r['data_peer_ratio']:.1f}× |"
        for r in results)
