"""One run per output_dir (a lock a killed run does not leave), and an unwritable folder is one line.

Where runs and commands write: one run at a time in an output_dir (a lock that a killed run does not leave
behind), and a folder that cannot be written is one line before any expensive work, never a traceback.

Tests run as root, whom permission bits do not stop: a folder is made unwritable by putting it under a regular
file (every test), or, where mount namespaces are allowed (root on Linux), by a read-only bind mount in a
namespace of the command's own (`unshare -m`), which is what a read-only share is."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import yaml
from helpers import ROOT, TINY, TORCHRUN_ENV, reaped, tiny_config, wait_for

LOCK_FILE = "run.lock"  # training/run_lock.py
ENV = {**TORCHRUN_ENV, "PYTHONPATH": str(ROOT / "src")}


def write_config(tmp_path, *overrides) -> Path:
    cfg = tiny_config(tmp_path, *overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def higgs_ddp(*args) -> list:
    return [sys.executable, "-m", "higgs_ddp", *map(str, args)]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_a_second_run_into_a_held_output_dir_is_refused_and_a_killed_run_frees_it(tmp_path):
    """Two identical commands: the second, alone or launched on 2 ranks, is refused in one line naming the first
    (host, pid, start) and touches nothing of it; once the first is SIGKILLed the same command gets in at once
    and resumes from its checkpoint."""
    config = write_config(tmp_path, "train.max_steps=200", "train.save_every=5", "train.log_every=1")
    out = tmp_path / "run"
    cmd = higgs_ddp("train", "--config", config)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    with reaped(first):
        wait_for(lambda: logged_steps(out) >= 6 or first.poll() is not None, "the first run's step 6", timeout=180)
        first.send_signal(signal.SIGSTOP)  # it holds the folder, frozen mid-run (past its checkpoint at step 5)
        assert first.poll() is None, first.stdout.read()[-3000:]
        before = {p: (out / p).read_bytes() for p in ("status.json", "metrics.jsonl", LOCK_FILE)}
        started = json.loads(before[LOCK_FILE])["started"]
        line = (f"higgs-ddp: error: output_dir {out} is in use by another run (pid {first.pid} on "
                f"{socket.gethostname()}, started {started}); two runs in one output_dir would write the same "
                f"checkpoints and metrics: wait for it to end or stop it, or set another output_dir\n")
        second = run(cmd)
        assert (second.returncode, second.stderr) == (2, line), second.stderr[-3000:]
        launched = run(higgs_ddp("train", "--nproc-per-node", "2", "--config", config))  # refused before torchrun
        assert (launched.returncode, launched.stderr) == (2, line), launched.stderr[-3000:]
        assert {p: (out / p).read_bytes() for p in before} == before  # not a byte of the first run's records
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "done: final loss" in again.stdout


def test_a_config_error_under_nproc_per_node_is_one_line_before_launching(tmp_path):
    """The ranks would each fail inside torchrun's report (exit 1): the launcher reads the config first."""
    proc = run(higgs_ddp("train", "--nproc-per-node", "2", "--config", TINY, f"output_dir={tmp_path / 'run'}",
                         "train.lr=-1"), timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "higgs-ddp: error: config key 'train.lr' must be >= 0, got -1.0\n")
    assert not (tmp_path / "run").exists()


def a_file(tmp_path) -> Path:
    """A regular file: a folder under it cannot be written, by root either."""
    path = tmp_path / "a_file"
    path.write_text("")
    return path


def test_train_into_an_output_dir_it_cannot_write_is_one_line(tmp_path, capsys):
    from higgs_ddp.train import main

    blocker = a_file(tmp_path)
    config = write_config(tmp_path, f"output_dir={blocker / 'run'}")
    assert main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"higgs-ddp: error: output_dir {blocker / 'run'} cannot be written ({blocker} "
                                       f"is a file, not a folder); set output_dir to a folder you can write\n")


def test_a_code_cache_beside_the_manifest_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys):
    from higgs_ddp.train import main

    config = write_config(tmp_path, "data.cache_dir=null")  # the default: .higgs_codes beside the manifest
    cache = tmp_path / "data" / ".higgs_codes"
    cache.write_text("")  # in the way
    assert main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"higgs-ddp: error: data.cache_dir {cache} cannot be written ({cache} is a "
                                       f"file, not a folder); set data.cache_dir to a folder you can write\n")


def ljspeech(root: Path) -> Path:
    (root / "wavs").mkdir(parents=True)
    soundfile.write(str(root / "wavs" / "a.wav"), [0.1] * 8000, 16000)
    (root / "metadata.csv").write_text("a|hello there|hello there\n")
    return root


def test_manifest_import_to_a_place_it_cannot_write_is_one_line(tmp_path, capsys):
    from higgs_ddp.tools.manifest_cmd import main

    blocker = a_file(tmp_path)
    out = blocker / "train.jsonl"
    assert main(["import", "--format", "ljspeech", str(ljspeech(tmp_path / "lj")), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"higgs-ddp: error: --out {out}: {blocker} cannot be written ({blocker} is a "
                                       f"file, not a folder)\n")


def test_speak_checks_its_out_before_it_loads_the_model(tmp_path, capsys):
    from higgs_ddp.tools.speak import main

    blocker = a_file(tmp_path)
    out = blocker / "hello.wav"
    assert main(["--model", str(tmp_path / "no_model"), "--text", "hello", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"higgs-ddp: error: --out {out}: {blocker} cannot be written ({blocker} is a "
                                       f"file, not a folder)\n")


def read_only(folder: Path, cmd: list) -> list:
    """``cmd`` with ``folder`` read-only for it alone: a read-only bind mount in a mount namespace of its own."""
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder), *cmd]


def can_mount_read_only() -> bool:
    try:
        return subprocess.run(read_only(Path("/tmp"), ["true"]), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_mount_read_only(), reason="needs mount namespaces (root on Linux)")
def test_read_only_shares_are_one_line_each(tmp_path):
    """The issue's cases on a real read-only filesystem: train's output_dir, the code cache beside the
    manifest, manifest import --out, speak --out."""
    share = tmp_path / "share"
    share.mkdir()
    config = write_config(tmp_path, f"output_dir={share / 'run'}")
    proc = run(read_only(share, higgs_ddp("train", "--config", config)))
    assert (proc.returncode, proc.stderr) == (2, f"higgs-ddp: error: output_dir {share / 'run'} cannot be written "
                                                 f"(Read-only file system); set output_dir to a folder you can write\n")
    config = write_config(tmp_path, "data.cache_dir=null")
    data = tmp_path / "data"
    proc = run(read_only(data, higgs_ddp("train", "--config", config)))
    assert (proc.returncode, proc.stderr) == (2, f"higgs-ddp: error: data.cache_dir {data / '.higgs_codes'} cannot be "
                                                 f"written (Read-only file system); set data.cache_dir to a folder "
                                                 f"you can write\n")
    src = ljspeech(tmp_path / "lj")
    proc = run(read_only(share, higgs_ddp("manifest", "import", src, "--out", share / "train.jsonl")))
    assert (proc.returncode, proc.stderr) == (2, f"higgs-ddp: error: --out {share / 'train.jsonl'}: {share} cannot be "
                                                 f"written (Read-only file system)\n")
    proc = run(read_only(share, higgs_ddp("speak", "--model", tmp_path / "run", "--text", "hi", "--out",
                                          share / "hi.wav")))
    assert (proc.returncode, proc.stderr) == (2, f"higgs-ddp: error: --out {share / 'hi.wav'}: {share} cannot be "
                                                 f"written (Read-only file system)\n")
    assert not os.listdir(share)
