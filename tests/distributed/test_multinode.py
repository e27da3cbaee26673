"""Two launchers on this machine as two nodes train bit-identically what one node's 2 ranks train, and fail in one line.

Two "nodes" on this machine: two `higgs-ddp train` launchers (torchrun underneath) meeting at a c10d
rendezvous on a loopback address, one rank each.

- Every rank checks at start that it sees rank 0's output_dir (and code cache): a node given another
  directory stops all ranks on both nodes with one line naming it, not a hang or a checkpoint missing
  one node's shards later.
- A rendezvous that cannot complete (a node never started, an unreachable endpoint) ends within
  HIGGS_RDZV_TIMEOUT with one line.
- The two nodes train exactly what one node with 2 ranks trains (ddp on the user's whole path, fsdp);
  global rank 0 alone writes the run files, each rank its shards, both nodes encode the audio.
- A rank killed on one node under --max-restarts 1: both nodes restart and the run ends exactly as an
  uninterrupted one (which needs a store per restart: torchrun's shared one is refused at start).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import (
    FSDP, ROOT, TORCHRUN_ENV, assert_same_user_path_outputs, assert_same_weights, children, final_weights, free_port,
    rows, tiny_config, torchrun, wait_for, workers, write_config, write_user_config,
)
from safetensors import safe_open


def node_cmd(node_rank: int, port: int, config, *overrides, nproc=1, launch=()) -> list:
    return [sys.executable, "-m", "higgs_ddp", "train", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "higgs-test", *launch, "--config", str(config), *map(str, overrides)]


class Nodes:
    """Launchers started together, their output in files (a full pipe would block one node while the other
    waits for it in a collective); whatever still runs at the end is stopped, with its whole session."""

    def __init__(self, cmds, env=None, logs=None):
        import tempfile

        self.logs = [Path(tempfile.mkstemp(prefix=f"node{i}-", suffix=".log", dir=logs)[1]) for i in range(len(cmds))]
        self.procs = []
        for cmd, log in zip(cmds, self.logs):
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                                   env=env or TORCHRUN_ENV, start_new_session=True))

    def wait(self, timeout) -> list:
        """[(returncode, output)] of each launcher; fails (after stopping them) past the timeout."""
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the nodes did not end within {timeout} s:\n" + self.output()) from None
        return [(p.returncode, log.read_text(errors="replace").replace("\r", "\n"))
                for p, log in zip(self.procs, self.logs)]

    def output(self) -> str:
        return "\n".join(f"--- node {i} ---\n" + log.read_text(errors="replace")[-3000:]
                         for i, log in enumerate(self.logs))

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


def write(tmp_path, name, *overrides, samples=16, audio=False):
    cfg = tiny_config(tmp_path / name, *overrides, samples=samples, audio=audio)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("setting", ["output_dir", pytest.param("data.cache_dir", marks=pytest.mark.extended)])
def test_a_node_that_does_not_share_the_directory_stops_every_rank_with_one_line(tmp_path, setting):
    """Node 1 is given its own output_dir (or cache): a local disk where a shared filesystem belongs."""
    config = write(tmp_path, "run", "train.max_steps=2", audio=setting == "data.cache_dir")
    elsewhere = tmp_path / "node1-local-disk"
    port = free_port()
    nodes = Nodes([node_cmd(0, port, config), node_cmd(1, port, config, f"{setting}={elsewhere}")], logs=tmp_path)
    results = nodes.wait(timeout=120)
    for code, out in results:
        last = out.rstrip().splitlines()[-1]
        assert code != 0, out[-3000:]
        assert last.startswith(f"higgs-ddp: error: {setting} is not the same directory on every node: "), out[-3000:]
        # c10d numbers the nodes as they join: whichever got rank 1 holds the other's directory
        assert f"(rank 1: {elsewhere})" in last or f"(rank 1: {tmp_path / 'run'}" in last, last
        assert f"put {setting} on a filesystem every node mounts" in last, last
    for run in (tmp_path / "run" / "run", elsewhere):  # stopped before training: rank 0 only records why
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
        if (run / "status.json").exists():
            assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_rendezvous_timeouts_reach_torchrun_and_the_users_own_win(monkeypatch):
    from higgs_ddp.cli import torchrun_argv
    from higgs_ddp.runtime.rendezvous import conf_items

    monkeypatch.setenv("HIGGS_RDZV_TIMEOUT", "42")
    cmd = torchrun_argv("train", ["--nnodes", "2", "--rdzv-conf=read_timeout=7,keep_alive_interval=2"], [])
    conf, _ = conf_items(cmd)
    assert conf == {"join_timeout": "42", "read_timeout": "7", "timeout": "42", "keep_alive_interval": "2"}
    assert "--rdzv-conf" not in torchrun_argv("train", ["--nproc-per-node", "2"], [])  # one node: nothing to wait for
    monkeypatch.setenv("HIGGS_RDZV_TIMEOUT", "soon")
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "train", "--nnodes", "2", "--config", "x.yaml"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "higgs-ddp: error: HIGGS_RDZV_TIMEOUT='soon' must be a whole number of seconds > 0\n"


RDZV_TIMEOUT = 5


@pytest.mark.parametrize("fault", ["node-never-arrives", pytest.param("wrong-endpoint", marks=pytest.mark.extended)])
def test_a_rendezvous_that_fails_ends_within_the_timeout_with_one_line(tmp_path, fault):
    """The other node is never started (static rendezvous, as `--node-rank` without a backend gives), or the
    endpoint is an address nobody listens on (c10d, as launch/multi_node.sbatch uses): no 10-minute hang."""
    config = write(tmp_path, "run")
    port = free_port()
    if fault == "node-never-arrives":
        launch = ["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{port}"]
        expected = (f"higgs-ddp: error: rendezvous at 127.0.0.1:{port}: not all 2 nodes joined within "
                    f"{RDZV_TIMEOUT} s; start the same command on every node (--nnodes 2 --rdzv-endpoint "
                    f"127.0.0.1:{port}), ")
    else:  # TEST-NET-1 (RFC 5737): never a host
        launch = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"192.0.2.1:{port}"]
        expected = f"higgs-ddp: error: rendezvous at 192.0.2.1:{port}: could not connect within {RDZV_TIMEOUT} s; "
    t0 = time.time()
    nodes = Nodes([[sys.executable, "-m", "higgs_ddp", "train", *launch, "--config", str(config)]],
                  env={**TORCHRUN_ENV, "HIGGS_RDZV_TIMEOUT": str(RDZV_TIMEOUT)}, logs=tmp_path)
    ((code, out),) = nodes.wait(timeout=RDZV_TIMEOUT + 60)
    elapsed = time.time() - t0
    assert code != 0, out[-3000:]
    assert out.rstrip().splitlines()[-1].startswith(expected), out[-3000:]
    assert elapsed < RDZV_TIMEOUT + 45, elapsed  # torchrun's start and its own imports, then our timeout
    assert not (tmp_path / "run" / "run").exists()  # no rank ever started


def run_as_two_nodes(config, tmp_path, launch=(), timeout=600) -> str:
    """Two launchers, one rank each: the same job as `--standalone --nproc-per-node 2`. Their output, joined."""
    port = free_port()
    nodes = Nodes([node_cmd(i, port, config, launch=launch) for i in (0, 1)], logs=tmp_path)
    results = nodes.wait(timeout)
    assert all(code == 0 for code, _ in results), nodes.output()
    joined = "\n".join(out for _, out in results)
    # Global rank 0 alone prints the run card and the summary, whichever node it is on.
    assert joined.count("higgs-ddp run card") == 1 and joined.count("done: final loss") == 1, nodes.output()
    return joined


def run_files(run: Path) -> list:
    """The files a run wrote, TensorBoard's named by kind (their names hold the host, pid and time)."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", p.relative_to(run).as_posix())
                  for p in run.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_nodes_train_what_one_node_trains_on_the_users_path(tmp_path, uninterrupted_user_path):
    """DataLoader workers, validation, listening samples, TensorBoard, token budgets, WAV clips encoded on the
    way in: two launchers as two nodes end with the standalone 2-rank run's weights, metrics, samples and
    TensorBoard scalars, the same files (rank 0 wrote them, once), and a code cache both nodes encoded."""
    config = write_user_config(tmp_path, "run")
    run_as_two_nodes(config, tmp_path)
    run = tmp_path / "run" / "run"
    assert_same_weights(final_weights(run), final_weights(uninterrupted_user_path))
    assert_same_user_path_outputs(run, uninterrupted_user_path)
    assert run_files(run) == run_files(uninterrupted_user_path)
    # prepare split the clips over the ranks of both nodes (in pieces: a shard per piece), no clip twice
    (cache,) = [d for d in (tmp_path / "run" / "cache").iterdir() if (d / "codec.json").is_file()]
    shards = [set(safe_open(str(p), framework="np").keys()) for p in sorted(cache.glob("part-*.safetensors"))]
    assert len(shards) >= 2 and all(shards) and sum(map(len, shards)) == len(set().union(*shards)), \
        [len(s) for s in shards]
    assert len(json.loads((cache / "index.json").read_text())["entries"]) == len(set().union(*shards))


@pytest.mark.slow
@pytest.mark.extended  # FSDP's equality to one process is test_fsdp's; two nodes on the user's path above
def test_two_nodes_train_what_one_node_trains_under_fsdp(tmp_path):
    """train.parallel=fsdp across the two nodes: each rank writes its own shard of every checkpoint. (24 steps,
    two epochs and six checkpoints: the fault tests' 160 are for a signal to land mid-run.)"""
    short = (*FSDP, "train.max_steps=24")
    reference = torchrun(2, "--config", write_config(tmp_path, "ref", *short))
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = tmp_path / "ref" / "run"
    run_as_two_nodes(write_config(tmp_path, "run", *short), tmp_path)
    run = tmp_path / "run" / "run"
    assert_same_weights(final_weights(run), final_weights(ref))
    assert rows(run) == rows(ref) and len(rows(run)) == 24
    assert run_files(run) == run_files(ref)
    for step in (run / "checkpoints").iterdir():
        assert sorted(p.name for p in (step / "shards").iterdir()) == ["rank_00000.safetensors",
                                                                        "rank_00001.safetensors"]


def launcher_workers(launcher_pid: int) -> dict:
    """rank -> pid of the training processes under a `higgs-ddp train` launcher (its child is torchrun)."""
    return {rank: pid for torchrun in children(launcher_pid) for rank, pid in workers(torchrun).items()}


@pytest.mark.slow
def test_a_node_whose_rank_is_killed_restarts_with_the_other_and_ends_exactly(tmp_path, uninterrupted_user_path):
    """--max-restarts 1 on both nodes; node 1's training process is SIGKILLed after the second checkpoint. Its
    launcher restarts it, node 0's launcher sees a node waiting and restarts its own rank too, and the run
    resumes from the last checkpoint: the same weights, metrics, samples and scalars as never stopping."""
    config = write_user_config(tmp_path, "run")
    run = tmp_path / "run" / "run"
    port = free_port()
    nodes = Nodes([node_cmd(i, port, config, launch=("--max-restarts", "1")) for i in (0, 1)], logs=tmp_path,
                  env={**TORCHRUN_ENV, "LOGLEVEL": "INFO"})  # torchrun's agents say why they restart
    try:
        wait_for(lambda: (run / "checkpoints" / "step_000008").is_dir(), "the second checkpoint", timeout=300)
        (killed,) = launcher_workers(nodes.procs[1].pid).values()
        os.kill(killed, signal.SIGKILL)
        results = nodes.wait(timeout=400)
    finally:
        nodes.kill()
    assert all(code == 0 for code, _ in results), nodes.output()
    joined = "\n".join(out for _, out in results)
    assert joined.count("resuming from") == 1, nodes.output()  # rank 0 of the second attempt, from a checkpoint
    (_, out0), (_, out1) = results
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in out1, nodes.output()
    assert re.search(r"Detected 1 new nodes from group_rank=\d; will restart worker group", out0), nodes.output()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(uninterrupted_user_path))
    assert_same_user_path_outputs(run, uninterrupted_user_path)


@pytest.mark.slow
def test_torchrun_sharing_one_store_across_restarts_on_several_nodes_is_refused(tmp_path):
    """What `higgs-ddp train --nnodes` and launch/multi_node.sbatch avoid (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1):
    torchrun's shared store with --max-restarts on several nodes. A restart on one node would hang the ranks
    (the test above measured it); so they refuse it at start, in one line."""
    config = write(tmp_path, "run")
    port = free_port()
    nodes = Nodes([node_cmd(i, port, config, launch=("--max-restarts", "1")) for i in (0, 1)], logs=tmp_path,
                  env={**TORCHRUN_ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})
    results = nodes.wait(timeout=120)
    assert all(code != 0 for code, _ in results), nodes.output()
    assert any(out.rstrip().splitlines()[-1].startswith(
        "higgs-ddp: error: torchrun on several nodes with --max-restarts shares one store between restarts")
        for _, out in results), nodes.output()


def test_rank_zero_names_the_host_of_every_rank():
    """The trainer's 'world:' line: what the launchers made of the allocation, per node."""
    from higgs_ddp.runtime.shared_fs import describe_nodes

    assert describe_nodes(["a"] * 8 + ["b"] * 8) == "16 rank(s) on 2 node(s): a (ranks 0-7), b (ranks 8-15)"
    assert describe_nodes(["n2", "n1"]) == "2 rank(s) on 2 node(s): n2 (rank 0), n1 (rank 1)"
    assert describe_nodes(["a", "b", "a"]) == "3 rank(s) on 2 node(s): a (ranks 0,2), b (rank 1)"
