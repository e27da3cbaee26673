"""higgs-ddp plot RUN_DIR [--out FILE]: a run's training curves as one PNG.

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per optimizer step; validation rows carry
``"split": "val"``, rows without ``split`` are training rows) and writes ``RUN_DIR/training.png``:

(a) loss: train total / text / audio, a smoothed train total, and the validation losses;
(b) per-codebook validation accuracy (or, without validation rows, per-codebook train loss);
(c) learning rate; (d) throughput in tokens/s; and, when the run scored listening samples (``split``
= samples rows): (e) the share of samples that stopped by themselves and that are silent, with the mean
silence and clipped fractions; (f) WER, CER and speaker similarity; and, for a DPO run (rows with
``rewards/*``), two more: the implicit rewards of the chosen and rejected candidates with their margin, and
the preference accuracy, train (EMA) and validation.

It renders with matplotlib's Agg canvas and never touches pyplot, so it runs on a headless node and can
be called from a live training process (``plot_run``) without changing its matplotlib backend. A step
whose loss was not finite (a skipped step) is drawn as a gap and marked, not as a spike or a zero.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from higgs_ddp.errors import HiggsError, report
from higgs_ddp.runtime.files import atomic_file
from higgs_ddp.runtime.layout import METRICS

DEFAULT_OUT = "training.png"


class PlotError(HiggsError, ValueError):
    pass


@dataclass
class Series:
    """The rows of one split, as columns; a missing or non-finite value is NaN (a gap in the line)."""

    rows: list = field(default_factory=list)

    def steps(self) -> list:
        return [float(r["step"]) for r in self.rows]

    def col(self, key: str) -> list:
        return [_num(r.get(key)) for r in self.rows]

    def has(self, key: str) -> bool:
        return any(math.isfinite(v) for v in self.col(key))

    def lists(self, key: str) -> list:
        """Per-codebook columns: one list of values per codebook (rows without the key give NaN)."""
        width = max((len(r[key]) for r in self.rows if isinstance(r.get(key), list)), default=0)
        return [[_num(r[key][k]) if isinstance(r.get(key), list) and k < len(r[key]) else math.nan
                 for r in self.rows] for k in range(width)]


def _num(value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def read_metrics(path: Path) -> tuple[Series, Series]:
    """-> (train, val); see read_splits."""
    splits = read_splits(path)
    return splits["train"], splits["val"]


def read_splits(path: Path) -> dict[str, Series]:
    """-> {"train", "val", "samples": Series}. Every row must be a JSON object with a numeric ``step``.

    A last line without its newline is a row the trainer is still writing: it is left out rather than
    reported, so a live run can be plotted."""
    if not path.is_file():
        raise PlotError(f"{path}: not found (is this a run's output_dir?)")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    splits = {"train": Series(), "val": Series(), "samples": Series()}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        unfinished = lineno == len(lines)  # text did not end with "\n"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if unfinished:
                continue
            raise PlotError(f"{path} line {lineno}: not JSON") from None
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) \
                or not isinstance(row.get("step"), (int, float)):
            raise PlotError(f"{path} line {lineno}: not a metrics row (a JSON object with a numeric step)")
        split = row.get("split", "train")
        if split in splits:
            splits[split].rows.append(row)
        # other splits (none are written today) are ignored rather than mixed into the training curves
    if not splits["train"].rows and not splits["val"].rows:
        raise PlotError(f"{path}: no metrics rows yet")
    return splits


def ema(values: list, span: Optional[float] = None) -> list:
    """Exponential moving average that starts at the first finite value (no pull towards 0) and steps
    over NaN (a skipped step keeps the previous average)."""
    n = sum(math.isfinite(v) for v in values)
    span = span or min(max(n / 20, 1.0), 100.0)
    alpha = 2.0 / (span + 1.0)
    out, avg = [], math.nan
    for v in values:
        if math.isfinite(v):
            avg = v if not math.isfinite(avg) else avg + alpha * (v - avg)
        out.append(avg)
    return out


COLORS = {"loss": "C0", "text_loss": "C1", "audio_loss": "C2"}
NAMES = {"loss": "total", "text_loss": "text", "audio_loss": "audio"}


def _isolated(ys: list) -> list:
    """The finite values without a finite neighbour (NaN elsewhere): a line alone would not show them
    (a run's first row, a step between two skipped ones)."""
    ok = [math.isfinite(v) for v in ys]
    return [v if ok[i] and not (i > 0 and ok[i - 1]) and not (i + 1 < len(ys) and ok[i + 1]) else math.nan
            for i, v in enumerate(ys)]


def _line(ax, x: list, ys: list, **style) -> None:
    """A line, with a dot on each point it cannot draw."""
    (line,) = ax.plot(x, ys, **style)
    lone = _isolated(ys)
    if any(math.isfinite(v) for v in lone):
        ax.plot(x, lone, ls="none", marker="o", ms=3, color=line.get_color(), alpha=style.get("alpha"))


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in metrics.jsonl", ha="center", va="center", transform=ax.transAxes,
            color="0.5")


def _loss_panel(ax, train: Series, val: Series) -> None:
    x = train.steps()
    for key, color in COLORS.items():
        if train.has(key):
            _line(ax, x, train.col(key), color=color, lw=0.8, alpha=0.35, label=f"train {NAMES[key]}")
    if train.has("loss"):
        _line(ax, x, ema(train.col("loss")), color=COLORS["loss"], lw=2.0, label="train total (EMA)")
    for key, color in COLORS.items():
        if val.has(key):
            ax.plot(val.steps(), val.col(key), color=color, lw=1.4, ls="--", marker="o", ms=4,
                    label=f"val {NAMES[key]}")
    skipped = [s for s, v in zip(x, train.col("loss")) if not math.isfinite(v)]
    for i, s in enumerate(skipped):
        ax.axvline(s, color="red", lw=0.8, alpha=0.5, label="skipped step (non-finite)" if i == 0 else None)
    if not ax.lines:
        _no_data(ax, "losses")
    else:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title("(a) loss")
    ax.set_ylabel("cross-entropy (nats/token)")


def _codebook_panel(ax, train: Series, val: Series) -> None:
    acc = val.lists("per_codebook_acc")
    if acc:
        for k, ys in enumerate(acc):
            ax.plot(val.steps(), ys, marker="o", ms=3, lw=1.2, label=f"codebook {k}")
        ax.set_title("(b) validation accuracy per codebook")
        ax.set_ylabel("top-1 accuracy")
    else:
        losses = train.lists("per_codebook_loss")
        for k, ys in enumerate(losses):
            _line(ax, train.steps(), ema(ys), lw=1.2, label=f"codebook {k}")
        ax.set_title("(b) train loss per codebook (EMA)" + ("" if val.rows else "; no validation rows"))
        ax.set_ylabel("cross-entropy")
        if not losses:
            _no_data(ax, "per-codebook metrics")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)


def _line_panel(ax, series: Series, key: str, title: str, ylabel: str, smooth: bool) -> None:
    if not series.has(key):
        _no_data(ax, key)
    else:
        ys = series.col(key)
        _line(ax, series.steps(), ys, color="C4", lw=0.8 if smooth else 1.4, alpha=0.4 if smooth else 1.0)
        if smooth:
            _line(ax, series.steps(), ema(ys), color="C4", lw=2.0, label="EMA")
            ax.legend(fontsize=7)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def _share(series: Series, key: str) -> list:
    return [_num(r.get(key)) / r["samples"] if r.get("samples") else math.nan for r in series.rows]


def _detector_panel(ax, samples: Series) -> None:
    x = samples.steps()
    for ys, label, color in ((_share(samples, "stopped_samples"), "stopped by itself (share)", "C2"),
                             (_share(samples, "silent_samples"), "silent (share)", "C3"),
                             (samples.col("silence_fraction"), "silence fraction (mean)", "C7"),
                             (samples.col("clipped_fraction"), "clipped fraction (mean)", "C1")):
        ax.plot(x, ys, marker="o", ms=3, lw=1.2, color=color, label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("(e) listening samples: detectors")
    ax.set_ylabel("fraction")


def _score_panel(ax, samples: Series) -> None:
    for key, label, color in (("wer", "WER (lower is better)", "C0"), ("cer", "CER", "C9"),
                              ("speaker_sim", "speaker similarity (higher is better)", "C4")):
        if samples.has(key):
            ax.plot(samples.steps(), samples.col(key), marker="o", ms=3, lw=1.2, color=color, label=label)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no model scores (eval.asr_model, eval.speaker_model)", ha="center", va="center",
                transform=ax.transAxes, color="0.5")
    ax.set_title("(f) listening samples: intelligibility and voice")


# A DPO run's rows (training/preference.py, TRL's names): what the rewards panel draws
REWARDS = (("rewards/chosen", "chosen", "C2"), ("rewards/rejected", "rejected", "C3"),
           ("rewards/margins", "margin (chosen - rejected)", "C0"))
ACCURACY = "rewards/accuracies"


def has_rewards(train: Series, val: Series) -> bool:
    return any(s.has(key) for s in (train, val) for key in (*(k for k, _, _ in REWARDS), ACCURACY))


def _train_and_val(ax, train: Series, val: Series, key: str, label: str, color: str) -> None:
    """A training column faint with its EMA, and the validation points dashed."""
    if train.has(key):
        ys = train.col(key)
        _line(ax, train.steps(), ys, color=color, lw=0.8, alpha=0.35)
        _line(ax, train.steps(), ema(ys), color=color, lw=2.0, label=f"train {label} (EMA)")
    if val.has(key):
        ax.plot(val.steps(), val.col(key), color=color, lw=1.4, ls="--", marker="o", ms=4, label=f"val {label}")


def _reward_panel(ax, train: Series, val: Series, letter: str) -> None:
    for key, label, color in REWARDS:
        _train_and_val(ax, train, val, key, label, color)
    ax.axhline(0.0, color="0.5", lw=0.8)  # the reference's own level: where every reward starts
    ax.legend(fontsize=7)
    ax.set_title(f"({letter}) DPO implicit rewards: beta x (log pi - log ref)")
    ax.set_ylabel("reward")


def _accuracy_panel(ax, train: Series, val: Series, letter: str) -> None:
    _train_and_val(ax, train, val, ACCURACY, "accuracy", "C4")
    if not ax.lines:
        _no_data(ax, ACCURACY)
    else:
        ax.legend(fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"({letter}) DPO preference accuracy (chosen reward > rejected)")
    ax.set_ylabel("share of pairs")


def _title(run_dir: Path, train: Series, val: Series) -> str:
    parts = [str(run_dir)]
    if train.rows:
        last = next((v for v in reversed(train.col("loss")) if math.isfinite(v)), math.nan)
        parts.append(f"{len(train.rows)} train rows to step {int(train.steps()[-1])}, last loss {last:.4g}")
    if val.rows:
        last = next((v for v in reversed(val.col("loss")) if math.isfinite(v)), math.nan)
        parts.append(f"{len(val.rows)} validations, last val loss {last:.4g}")
    return "  |  ".join(parts)


def figure(run_dir: Path, train: Series, val: Series, samples: Optional[Series] = None):
    """The four panels (two more with scored listening samples, two more for a DPO run's rewards), on a
    matplotlib Figure of its own (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    heard = samples is not None and bool(samples.rows)
    dpo = has_rewards(train, val)
    rows = 2 + heard + dpo
    fig = Figure(figsize=(13, 4.25 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (a, b), (c, d), *more = fig.subplots(rows, 2, sharex=True)
    letters = iter("efgh")
    if heard:
        _detector_panel(more[0][0], samples)
        _score_panel(more[0][1], samples)
        next(letters), next(letters)
    if dpo:
        _reward_panel(more[-1][0], train, val, next(letters))
        _accuracy_panel(more[-1][1], train, val, next(letters))
    for ax in (ax for row in more for ax in row):
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("optimizer step")
    _loss_panel(a, train, val)
    _codebook_panel(b, train, val)
    _line_panel(c, train, "lr", "(c) learning rate", "lr", smooth=False)
    c.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _line_panel(d, train, "tokens_per_s", "(d) throughput", "tokens/s", smooth=True)
    d.yaxis.set_major_formatter(EngFormatter())
    for ax in (a, b, c, d):
        ax.grid(True, alpha=0.3)
    for ax in (c, d):
        ax.set_xlabel("optimizer step")
    fig.suptitle(_title(run_dir, train, val), fontsize=10)
    return fig


def plot_run(run_dir, out=None) -> Path:
    """Plot ``run_dir/metrics.jsonl`` into ``out`` (default ``run_dir/training.png``; a folder: the default
    name inside it); returns the path. Raises PlotError (one line) for a missing, empty or corrupt
    metrics file."""
    run_dir = Path(run_dir)
    splits = read_splits(run_dir / METRICS)
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT
    if out.is_dir():
        out = out / DEFAULT_OUT
    fig = figure(run_dir, splits["train"], splits["val"], splits["samples"])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:  # an image viewer never sees a half-written file
            fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    except (OSError, ValueError) as e:  # an unwritable --out, an unknown image format (matplotlib's ValueError)
        raise PlotError(f"--out {out} cannot be written: {' '.join(str(e).split())}") from None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="higgs-ddp plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", help=f"image to write (default: RUN_DIR/{DEFAULT_OUT}; .png, .pdf or .svg)")
    args = p.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except HiggsError as e:
        return report(e)
    print(path)
    return 0
