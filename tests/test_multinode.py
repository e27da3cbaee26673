"""Two "nodes" on this machine: two `higgs-ddp train` launchers (torchrun underneath) meeting at a c10d
rendezvous on a loopback address, one rank each.

- Every rank checks at start that it sees rank 0's output_dir (and code cache): a node given another
  directory stops all ranks on both nodes with one line naming it, not a hang or a checkpoint missing
  one node's shards later.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, TORCHRUN_ENV, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(node_rank: int, port: int, config, *overrides, nproc=1, launch=()) -> list:
    return [sys.executable, "-m", "higgs_ddp", "train", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "higgs-test", *launch, "--config", str(config), *map(str, overrides)]


class Nodes:
    """Launchers started together; whatever is still running at the end is stopped (the whole session)."""

    def __init__(self, cmds, env=None):
        self.procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                       env=env or TORCHRUN_ENV, start_new_session=True) for c in cmds]

    def wait(self, timeout) -> list:
        """[(returncode, stdout, stderr)] of each launcher; fails (after stopping them) past the timeout."""
        deadline, out = time.time() + timeout, []
        try:
            for p in self.procs:
                o, e = p.communicate(timeout=max(1, deadline - time.time()))
                out.append((p.returncode, o, e))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the nodes did not end within {timeout} s") from None
        return out

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.communicate()


def write(tmp_path, name, *overrides, samples=16, audio=False):
    cfg = tiny_config(tmp_path / name, *overrides, samples=samples, audio=audio)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("setting", ["output_dir", pytest.param("data.cache_dir", marks=pytest.mark.slow)])
def test_a_node_that_does_not_share_the_directory_stops_every_rank_with_one_line(tmp_path, setting):
    """Node 1 is given its own output_dir (or cache): a local disk where a shared filesystem belongs."""
    config = write(tmp_path, "run", "train.max_steps=2", audio=setting == "data.cache_dir")
    elsewhere = tmp_path / "node1-local-disk"
    port = free_port()
    nodes = Nodes([node_cmd(0, port, config), node_cmd(1, port, config, f"{setting}={elsewhere}")])
    results = nodes.wait(timeout=120)
    for code, out, err in results:
        last = err.rstrip().splitlines()[-1]
        assert code != 0, err[-3000:]
        assert last.startswith(f"higgs-ddp: error: {setting} is not the same directory on every node: "), err[-3000:]
        # c10d numbers the nodes as they join: whichever got rank 1 holds the other's directory
        assert f"(rank 1: {elsewhere})" in last or f"(rank 1: {tmp_path / 'run'}" in last, last
        assert f"put {setting} on a filesystem every node mounts" in last, last
    for run in (tmp_path / "run" / "run", elsewhere):  # stopped before training: rank 0 only records why
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
        if (run / "status.json").exists():
            assert json.loads((run / "status.json").read_text())["state"] == "failed"
