"""`higgs-ddp prefs build` on 2 ranks, killed mid-build and run again, writes exactly what 1 rank writes uninterrupted.

The 2-rank build (torchrun through `higgs-ddp prefs build --nproc-per-node 2`) is killed with SIGKILL as soon
as the first prompt's candidates are on disk; the same command again generates only the prompts not yet done,
and its pairs, candidates, codes and prefs.json equal those of conftest's 1-rank build (prefs_built): the
candidates' seeds depend on the prompt, never on the rank, the order or the interruption."""

import os
import signal
import subprocess
import sys

import pytest
from helpers import PREFS_SETTINGS, ROOT, TORCHRUN_ENV, children, prefs_files, wait_for


def records(out):
    """The prompts whose candidates are on disk (work/ holds their records beside its two settings files)."""
    return [p for p in (out / "work").glob("*.json") if p.name not in ("settings.json", "identity.json")]


def kill_tree(pid: int) -> None:
    """SIGKILL to the ranks, then torchrun, then the launcher (which starts torchrun in a session of its own,
    so a signal to the launcher's process group would not reach them)."""
    launched = children(pid)
    for p in [r for t in launched for r in children(t)] + launched + [pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_two_ranks_killed_and_run_again_write_what_one_rank_writes(prefs_built, tmp_path):
    ckpt, prompts, reference = prefs_built
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "higgs_ddp", "prefs", "build", "--nproc-per-node", "2", "--model", str(ckpt),
           "--prompts", str(prompts), "--out", str(out), *PREFS_SETTINGS]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=TORCHRUN_ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: records(out) or proc.poll() is not None, "the first prompt's candidates", timeout=300)
        finally:
            kill_tree(proc.pid)
            proc.wait()
    done = len(records(out))
    assert 1 <= done < 4, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (out / "prefs.json").exists()  # written last: the folder says it is not whole
    again = subprocess.run(cmd, env=TORCHRUN_ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"4 prompts x 3 candidates on 2 ranks; {done} already built" in again.stdout
    assert prefs_files(out) == prefs_files(reference)
