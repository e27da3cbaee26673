"""Every command that writes says in one line, before its work, that it cannot write where it was told.

Issue 30, item 9: export, demo-data, plot and score joined train, prepare, manifest import and speak. The place is under a
regular file: that stops root too, as a read-only mount would."""

import pytest

from higgs_ddp.cli import main


@pytest.mark.parametrize("command", ["export", "demo-data", "plot", "score"])
def test_an_output_under_a_file_is_one_line_before_any_work(command, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"
    argv = {"export": ["export", "--checkpoint", str(tmp_path / "no_run"), "--out", str(out)],
            "demo-data": ["demo-data", str(out)],
            "plot": ["plot", str(tmp_path / "no_run"), "--out", str(out / "p.png")],
            "score": ["score", "--model", str(tmp_path / "no_run"), "--prompts", str(tmp_path / "p.jsonl"),
                      "--out", str(out)]}[command]
    if command == "plot":  # plot reads its metrics first: give it some
        (tmp_path / "no_run").mkdir()
        (tmp_path / "no_run" / "metrics.jsonl").write_text(
            '{"step": 1, "loss": 1.0, "text_loss": 0.5, "audio_loss": 0.5, "lr": 0.001}\n')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("higgs-ddp: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot be written" in err, err
