"""`higgs-ddp plot`: metrics.jsonl -> a 4-panel PNG (more for listening samples and DPO rewards), one-line errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from higgs_ddp.tools.plot import PlotError, ema, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_row(step: int, split: bool = True, loss: float | None = None) -> dict:
    total = 10.0 / math.sqrt(step) if loss is None else loss
    row = {"step": step, "loss": total, "text_loss": 0.4 * total, "audio_loss": 0.6 * total,
           "per_codebook_loss": [0.6 * total * (1 + k / 10) for k in range(4)],
           "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 1.0, "tokens": 500,
           "tokens_per_s": 8000.0 + 10 * step, "step_time_s": 0.06, "skipped": False, "skipped_steps": 0}
    if split:
        row["split"] = "train"
    return row


def val_row(step: int) -> dict:
    total = 12.0 / math.sqrt(step)
    return {"step": step, "split": "val", "loss": total, "text_loss": 0.4 * total, "audio_loss": 0.6 * total,
            "per_codebook_loss": [0.6 * total] * 4, "per_codebook_acc": [min(1.0, 0.01 * step * (k + 1))
                                                                        for k in range(4)]}


def write_metrics(run: Path, rows: list, tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "metrics.jsonl"
    # json.dumps writes float("nan") as NaN, exactly as the trainer's json.dumps does for a skipped step
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert 800 <= width <= 4000 and 500 <= height <= 4000, (width, height)
    # not a blank canvas: a figure with curves has many distinct colours
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97].tolist()}) > 20
    return width, height


def test_plot_train_val_and_nan(tmp_path):
    rows = [train_row(s) for s in range(1, 61)]
    rows[29] = {**train_row(30, loss=float("nan")), "text_loss": float("nan"), "audio_loss": float("nan"),
                "skipped": True, "skipped_steps": 1}
    for s in (20, 40, 60):
        rows.append(val_row(s))
    write_metrics(tmp_path / "run", rows)

    train, val = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(train.rows) == 60 and len(val.rows) == 3
    assert math.isnan(train.col("loss")[29])
    assert len(val.lists("per_codebook_acc")) == 4

    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "training.png"
    assert_png(out)
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the temporary file was renamed into place


def test_plot_only_train_rows_without_split_key(tmp_path):
    write_metrics(tmp_path / "run", [train_row(s, split=False) for s in range(1, 31)])
    train, val = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(train.rows) == 30 and not val.rows
    out = plot_run(tmp_path / "run", out=tmp_path / "elsewhere" / "curves.png")
    assert out == tmp_path / "elsewhere" / "curves.png"
    assert_png(out)
    assert not (tmp_path / "run" / "training.png").exists()


@pytest.fixture
def cli(capsys, monkeypatch):
    """`higgs-ddp plot ARGS` through the CLI's main in this process (its exit code, stdout, stderr): the command's
    output is the point here, and a new interpreter costs seconds (test_layout.py runs the entry point itself)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main names argparse's prog through sys.argv[0]

    def run(*args):
        from higgs_ddp.cli import main

        capsys.readouterr()
        try:
            code = main(["plot", *map(str, args)])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_cli_writes_png_and_prints_its_path(tmp_path, cli):
    write_metrics(tmp_path / "run", [train_row(s) for s in range(1, 11)])
    r = cli(tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "run" / "training.png")
    assert_png(tmp_path / "run" / "training.png")


def test_cli_corrupt_line_exits_2_with_one_line(tmp_path, cli):
    rows = [json.dumps(train_row(s)) for s in range(1, 6)]
    rows.insert(3, '{"step": 4, "loss": 1.0,')  # line 4 is cut off
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    r = cli(tmp_path / "run")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"higgs-ddp: error: {tmp_path / 'run' / 'metrics.jsonl'} line 4: not JSON"]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "run" / "training.png").exists()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "no metrics rows yet"),
    ("\n\n", "no metrics rows yet"),
    ('[1, 2]\n', "line 1: not a metrics row"),
    ('{"loss": 1.0}\n', "line 1: not a metrics row"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(PlotError, match=message) as e:
        plot_run(run)
    assert "\n" not in str(e.value) and str(run / "metrics.jsonl") in str(e.value)


def test_unfinished_last_line_of_a_live_run_is_left_out(tmp_path):
    write_metrics(tmp_path / "run", [train_row(s) for s in range(1, 6)], tail='{"step": 6, "lo')
    train, _ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in train.rows] == [1, 2, 3, 4, 5]
    assert_png(plot_run(tmp_path / "run"))


def test_ema_starts_at_first_value_and_steps_over_nan():
    out = ema([4.0, math.nan, 2.0], span=3)  # alpha 0.5
    assert out == [4.0, 4.0, 3.0]
    assert math.isnan(ema([math.nan, 1.0])[0])


def test_out_may_be_a_folder_and_a_failed_write_leaves_no_temporary(tmp_path, cli):
    write_metrics(tmp_path / "run", [train_row(s) for s in range(1, 11)])
    figures = tmp_path / "figures"
    figures.mkdir()
    r = cli(tmp_path / "run", "--out", figures)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(figures / "training.png")
    assert_png(figures / "training.png")
    assert sorted(p.name for p in figures.iterdir()) == ["training.png"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from higgs_ddp.runtime import files

    write_metrics(tmp_path / "run", [train_row(s) for s in range(1, 11)])

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", disk_full)  # the rename into place fails: one line, nothing left
    with pytest.raises(PlotError, match="training.png cannot be written: .*No space left"):
        plot_run(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def _visible(ax) -> bool:
    """Something is drawn: a marker on a finite point, or a line between two finite neighbours."""
    for line in ax.lines:
        ys = [float(y) for y in line.get_ydata()]
        finite = [math.isfinite(y) for y in ys]
        if line.get_marker() not in (None, "None", "none", "", " ") and any(finite):
            return True
        if line.get_linestyle() not in ("None", "none", "", " ") and any(a and b for a, b in zip(finite, finite[1:])):
            return True
    return False


def test_a_single_row_is_drawn_in_every_panel(tmp_path):
    from higgs_ddp.tools.plot import figure

    write_metrics(tmp_path / "run", [train_row(1)])
    train, val = read_metrics(tmp_path / "run" / "metrics.jsonl")
    fig = figure(tmp_path / "run", train, val)
    panels = fig.axes
    empty = [ax.get_title() for ax in panels if not _visible(ax)]
    assert len(panels) == 4 and not empty, empty


def test_scored_listening_samples_get_two_more_panels(tmp_path):
    from higgs_ddp.tools.plot import figure, read_splits

    samples = [{"step": s, "split": "samples", "samples": 4, "seconds": 2.0, "silence_fraction": 0.8 - 0.2 * i,
                "silent_samples": 3 - i, "stopped_samples": i + 1, "chars_per_second": 12.0,
                "clipped_fraction": 0.0, "wer": 0.9 - 0.3 * i, "cer": 0.5 - 0.1 * i, "speaker_sim": 0.2 + 0.2 * i}
               for i, s in enumerate((2, 4, 6))]
    write_metrics(tmp_path / "run", [train_row(s) for s in range(1, 7)] + samples)
    splits = read_splits(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in splits["samples"].rows] == [2, 4, 6] and len(splits["train"].rows) == 6
    fig = figure(tmp_path / "run", splits["train"], splits["val"], splits["samples"])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6 and titles[4].startswith("(e)") and titles[5].startswith("(f)")
    stopped, silent = (line.get_ydata() for line in fig.axes[4].lines[:2])
    assert list(stopped) == [0.25, 0.5, 0.75] and list(silent) == [0.75, 0.5, 0.25]
    assert [line.get_label() for line in fig.axes[5].lines][0].startswith("WER")
    assert plot_run(tmp_path / "run").read_bytes().startswith(PNG_MAGIC)
    # without sample rows: the four panels as before
    assert len(figure(tmp_path / "run", splits["train"], splits["val"]).axes) == 4


def test_a_dpo_run_gets_a_rewards_and_an_accuracy_panel(tmp_path):
    from higgs_ddp.tools.plot import figure, read_splits

    def dpo_row(step, split=None, margin=0.0):
        row = {"step": step, "loss": math.log(2) - margin / 4, "rewards/chosen": margin / 2,
               "rewards/rejected": -margin / 2, "rewards/margins": margin, "rewards/accuracies": min(1.0, margin)}
        return {**row, "split": split} if split else row

    rows = [dpo_row(s, margin=0.1 * (s - 1)) for s in range(1, 9)] + [dpo_row(4, "val", 0.2), dpo_row(8, "val", 0.5)]
    write_metrics(tmp_path / "run", rows)
    splits = read_splits(tmp_path / "run" / "metrics.jsonl")
    fig = figure(tmp_path / "run", splits["train"], splits["val"], splits["samples"])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6 and titles[4].startswith("(e) DPO implicit rewards") and titles[5].startswith("(f)")
    drawn = {line.get_label(): list(line.get_ydata()) for line in fig.axes[4].lines}
    assert drawn["val margin (chosen - rejected)"] == [0.2, 0.5] and drawn["val chosen"] == [0.1, 0.25]
    assert {"train chosen (EMA)", "train rejected (EMA)", "train margin (chosen - rejected) (EMA)"} <= set(drawn)
    accuracy = {line.get_label(): list(line.get_ydata()) for line in fig.axes[5].lines}
    assert accuracy["val accuracy"] == [0.2, 0.5] and fig.axes[5].get_ylim() == (-0.05, 1.05)
    with_samples = figure(tmp_path / "run", splits["train"], splits["val"],
                          read_splits(write_metrics(tmp_path / "heard", rows + [
                              {"step": 4, "split": "samples", "samples": 2, "stopped_samples": 1}]))["samples"])
    assert [ax.get_title()[:3] for ax in with_samples.axes][4:] == ["(e)", "(f)", "(g)", "(h)"]
    assert len(figure(tmp_path / "run", splits["train"], splits["val"]).axes) == 6
