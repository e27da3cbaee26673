"""Rank 0's record of a run: ``metrics.jsonl`` (one JSON object per logged step, ``split`` = train or
val) and, with ``logging.tensorboard``, the same numbers plus the listening samples in TensorBoard.

A resumed run drops what was logged after its checkpoint (those steps are about to be redone), in
both, so the files read as if the run had never stopped."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from higgs_ddp.errors import HiggsError
from higgs_ddp.runtime.layout import METRICS


class RunLogError(HiggsError, RuntimeError):
    pass


def rows_to_keep(path: Path, resume_step: int) -> list:
    """The lines of ``path`` logged at or before ``resume_step``.

    A last line without its newline is a row that a kill or a full disk cut short: its step comes after
    the checkpoint, so it is dropped like the other rows the resumed run redoes."""
    lines = path.read_text(encoding="utf-8").split("\n")
    kept = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the text does not end with "\n": an unfinished row
                continue
            raise RunLogError(f"{path}:{lineno}: not a metrics row ({e.msg}); repair or delete that line "
                              f"to resume") from None
        if not isinstance(row, dict):
            raise RunLogError(f"{path}:{lineno}: not a metrics row (a JSON object); repair or delete that "
                              f"line to resume")
        if row.get("step", 0) <= resume_step:
            kept.append(line)
    return kept


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        kept = rows_to_keep(path, resume_step) if resume_step and path.is_file() else []
        self.f = open(path, "w", encoding="utf-8")
        self.f.writelines(line + "\n" for line in kept)
        self.kept = [json.loads(line) for line in kept]
        self.t_last = time.perf_counter()

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class RunLog:
    """metrics.jsonl, and TensorBoard when asked for; tracks what the end-of-run summary reports."""

    SCALARS = ("loss", "text_loss", "audio_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
               "padding_fraction", "gpu_memory_gb")
    # train.objective=dpo's (training/preference.py), train/ and val/ alike
    PREFERENCE = ("dpo_loss", "sft_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "rewards/accuracies")

    def __init__(self, output_dir: str, resume_step: int, tensorboard: bool):
        self.dir = Path(output_dir)
        self.metrics = MetricsLog(self.dir / METRICS, resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events at or after it, from a run that stopped later, are dropped on resume
            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.best_val, self.best_val_step, self.tokens = math.inf, None, 0
        for row in self.metrics.kept:  # a resumed run remembers its best validation so far
            if row.get("split") == "val" and row["loss"] < self.best_val:
                self.best_val, self.best_val_step = row["loss"], row["step"]

    def train(self, row: dict, write: bool = True) -> None:
        self.tokens += row["tokens"]
        if write:
            self.metrics.write({"split": "train", **row})
        if self.tb:
            for key in self.SCALARS + self.PREFERENCE:
                if row.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])
            for k, v in enumerate(row.get("per_codebook_loss") or []):
                self.tb.add_scalar(f"train_codebook/loss_{k}", v, row["step"])

    def val(self, row: dict) -> None:
        self.metrics.write(row)
        if row["loss"] < self.best_val:
            self.best_val, self.best_val_step = row["loss"], row["step"]
        if self.tb:
            for key in ("loss", "text_loss", "audio_loss") + self.PREFERENCE:
                if row.get(key) is not None:
                    self.tb.add_scalar(f"val/{key}", row[key], row["step"])
            for k, (loss, acc) in enumerate(zip(row.get("per_codebook_loss", []), row.get("per_codebook_acc", []))):
                self.tb.add_scalar(f"val_codebook/loss_{k}", loss, row["step"])
                self.tb.add_scalar(f"val_codebook/acc_{k}", acc, row["step"])

    SAMPLE_SCALARS = ("seconds", "silence_fraction", "silent_samples", "stopped_samples", "chars_per_second",
                      "clipped_fraction", "wer", "cer", "speaker_sim")

    def samples(self, row: dict) -> None:
        """A listening step's summary (evaluation/listening.sample_summary): a ``split: samples`` row."""
        self.metrics.write({"split": "samples", **row})
        if self.tb:
            for key in self.SAMPLE_SCALARS:
                if row.get(key) is not None:
                    self.tb.add_scalar(f"samples/{key}", row[key], row["step"])

    def audio(self, step: int, results: list) -> None:
        if not self.tb:
            return
        import soundfile
        import torch

        for i, r in enumerate(results):
            wav, rate = soundfile.read(str(r.path), dtype="float32", always_2d=True)
            if not len(wav):  # the stream EOS came first: nothing to listen to (samples.json says so)
                continue
            self.tb.add_audio(f"samples/{i:02d}", torch.from_numpy(wav[:, 0]), step, sample_rate=rate)

    def summary(self, steps: int, seconds: float, final: Path | None, kept: tuple | None = None) -> str:
        """``kept``: (what eval.best_by kept, its folder), if anything."""
        d = self.dir
        best = (f"best validation loss {self.best_val:.4f} at step {self.best_val_step}"
                if self.best_val_step is not None else "no validation")
        rows = [("metrics", f"{d / 'metrics.jsonl'}   (plot: higgs-ddp plot {d})")]
        if self.tb:
            rows.append(("tensorboard", f"tensorboard --logdir {d / 'tensorboard'}"))
        if (d / "samples").is_dir():
            rows.append(("samples", f"{d / 'samples'}/step_N/*.wav"))
        rows.append(("checkpoints", f"{d / 'checkpoints'}"))
        if final is not None:
            rows.append(("weights", f"{final}"))
        if kept is not None:
            rows.append(("best", f"{kept[1]}   ({kept[0]})"))
        return (f"summary: {steps} steps in {seconds / 60:.1f} min, {self.tokens:,} positions trained on; {best}\n"
                + "\n".join(f"  {k:<11} {v}" for k, v in rows))

    def close(self) -> None:
        self.metrics.close()
        if self.tb:
            self.tb.close()
