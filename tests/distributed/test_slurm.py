"""A real two-node Slurm runs launch/multi_node.sbatch, preempts and requeues it, and it resumes exactly.

The launch scripts under a real Slurm cluster of two nodes on this machine (slurmctld, two slurmd in
namespaces of their own, higgs-node1 and higgs-node2, and munge, brought up by tests/slurm/local_slurm.sh):
launch/multi_node.sbatch, unchanged but for its GPU lines given on the command line (--gpus-per-node=0,
NPROC=1: one CPU process per node), runs one torchrun per node joined by its c10d rendezvous, and
launch/single_node_cpu.sbatch runs on one node. Each is stopped, requeued by Slurm, restarted, resumes from
its checkpoint and ends with exactly the weights and losses of an uninterrupted run of the same world size.

- The preemption warning (`#SBATCH --signal=B:USR1@N`, forced with `scancel --signal=USR1 --batch`):
  the launcher passes USR1 to the workers, they save and exit 0, the launcher requeues the job.
- A real preemption: a job in the high partition needs the node that a low-partition job holds
  (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, GraceTime): the workers get SIGTERM and
  save, the job is requeued, waits for the high job, and restarts.

Both signals reach every process of the job step, DataLoader workers included: the runs have them (the
preemption runs the user's whole path: helpers.write_user_config).

Needs root (slurmd and munged); installs the Slurm packages with apt if they are missing.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    MAX_STEPS, ROOT, assert_same_user_path_outputs, assert_same_weights, final_weights, free_port, rows, write_config,
    write_user_config,
)

from higgs_ddp.training.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow

LOCAL_SLURM = ROOT / "tests" / "slurm" / "local_slurm.sh"
SBATCH = "launch/single_node_cpu.sbatch"
MULTI_NODE = "launch/multi_node.sbatch"
NODES = ("higgs-node1", "higgs-node2")
# write_config's run (tiny model, 24 samples, a checkpoint every 4 steps, MAX_STEPS steps: about 5 s at 30
# steps/s, so the stop signal surely arrives before the run is over), compared with conftest's uninterrupted.
OVERRIDES = ("data.num_workers=1",)  # the step's signal reaches the workers too
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Cluster:
    state_dir: Path
    env: dict

    def run(self, *cmd, timeout=60, env=None) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})},
                              cwd=ROOT)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def sbatch(self, *args, env=None) -> str:
        return self.run("sbatch", "--parsable", *map(str, args), env=env).strip().split(";")[0]

    def sbatch_multi_node(self, *args) -> str:
        """launch/multi_node.sbatch on both nodes, its GPU lines overridden for CPU: no GPUs, 2 CPUs a node,
        one process a node (NPROC), the rendezvous on a port free here (MASTER_PORT)."""
        return self.sbatch("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", *args,
                           env={"NPROC": "1", "MASTER_PORT": str(free_port())})

    def job(self, job_id) -> dict:
        """`scontrol show job` as a dict (finished jobs stay for MinJobAge; there is no sacct)."""
        text = self.run("scontrol", "--oneliner", "show", "job", job_id)
        return dict(re.findall(r"(?:^|\s)([A-Za-z/:]+)=(\S*)", text))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: tests/slurm/local_slurm.sh runs slurmd and munged (and may apt-get install them)")
    state = Path(tempfile.mkdtemp(prefix="higgs-ddp-slurm-", dir="/tmp"))
    # Nothing from an enclosing Slurm job or the launcher's knobs (TORCHRUN, NPROC) leaks into the jobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("TORCHRUN", "NPROC")}
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    try:
        start = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(state), str(len(NODES))],
                               capture_output=True, text=True, timeout=600, env=env)
        if start.returncode != 0:  # as root the cluster must come up: fail loudly, never skip
            pytest.fail(f"local_slurm.sh start failed ({start.returncode}):\n{start.stdout}{start.stderr}"
                        f"{_log_tails(state)}")
        yield Cluster(state, env)
    finally:
        logs = tmp_path_factory.mktemp("slurm-logs")
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in NODES), "slurm.conf", "munge/munged.log",
                     "apt.log"):
            if (state / name).is_file():
                shutil.copy(state / name, logs / name.replace("/", "-"))
        stop = subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(state)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert stop.returncode == 0, f"local_slurm.sh stop failed:\n{stop.stdout}{stop.stderr}"


def _log_tails(state: Path, lines=30) -> str:
    out = ""
    for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in NODES)):
        if (state / name).is_file():
            out += f"\n--- {name} ---\n" + "\n".join((state / name).read_text(errors="replace").splitlines()[-lines:])
    return out


def job_output(path: Path) -> str:
    """The job's output (both runs: --open-mode=append), tqdm's redrawn progress bars on lines of their own."""
    return path.read_text(errors="replace").replace("\r", "\n") if path.exists() else ""


def diagnosis(cluster: Cluster, out: Path, *jobs) -> str:
    lines = [line for line in job_output(out).splitlines() if line.strip() and "it/s" not in line]
    text = f"\n--- job output {out} (tail, without progress bars) ---\n" + "\n".join(lines[-60:])
    for job in jobs:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=cluster.env)
        text += f"\n--- scontrol show job {job} ---\n{shown.stdout}{shown.stderr}"
    return text + _log_tails(cluster.state_dir, 15)


def wait_job(cluster, job, until, what, out, timeout=240):
    """Poll `scontrol show job` until until(fields); fail at once (with the job's story) if it ended otherwise."""
    deadline = time.time() + timeout
    while True:
        fields = cluster.job(job)
        if until(fields):
            return fields
        state = fields.get("JobState")
        if state in FAILED_STATES or (state == "COMPLETED" and fields.get("Restarts") == "0"):
            raise AssertionError(f"job {job} is {state} (Restarts={fields.get('Restarts')}) while waiting for "
                                 f"{what}" + diagnosis(cluster, out, job))
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}" + diagnosis(cluster, out, job))
        time.sleep(0.5)


def wait_for_checkpoint(cluster, job, run: Path, out: Path, step=8):
    """Until a checkpoint of step >= `step` exists: the workers are training and have their signal handlers."""
    def progressed(fields):
        done = complete_checkpoints(run)
        return bool(done) and int(done[-1].name.split("_")[1]) >= step
    wait_job(cluster, job, progressed, f"a checkpoint of step >= {step}", out, timeout=180)


def requeued_and_finished(fields) -> bool:
    return fields.get("JobState") == "COMPLETED" and fields.get("Restarts") == "1"


def check_resumed_exactly(cluster, job, run: Path, out: Path, signal: str, uninterrupted: Path, before, after):
    """The job stopped on `signal` (the launcher saying `before` first and `after` then), the rerun (restart
    1) resumed from the checkpoint it saved and finished with the uninterrupted run's weights and losses."""
    text = job_output(out)
    why = diagnosis(cluster, out, job)
    stopped = re.search(rf"stopped by {signal} after step (\d+)", text)
    assert stopped, f"no 'stopped by {signal}' in the job output" + why
    step = int(stopped.group(1))
    assert step < MAX_STEPS, "the run was over before the signal arrived; raise MAX_STEPS" + why
    resumed = f"resuming from {run / 'checkpoints' / f'step_{step:06d}'} (step {step};"
    expected = [f"higgs-ddp launch: job {job}, restart 0", before, stopped.group(0), after,
                f"higgs-ddp launch: job {job}, restart 1", resumed, "done: final loss"]
    position = 0
    for line in expected:
        found = text.find(line, position)
        assert found >= 0, f"missing (in this order): {line!r}" + why
        position = found + len(line)
    assert text.count("resuming from") == 1, why
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == MAX_STEPS, f"{status}" + why
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    if (uninterrupted / "samples").is_dir():  # the user's path
        assert_same_user_path_outputs(run, uninterrupted)
    else:
        assert rows(run) == rows(uninterrupted)


def submit(cluster: Cluster, launcher: str, config: Path, *args) -> str:
    if launcher == "multi-node":
        return cluster.sbatch_multi_node(*args, MULTI_NODE, config)
    return cluster.sbatch(*args, SBATCH, config)


def check_nodes(cluster: Cluster, launcher: str, job: str, out: Path) -> None:
    """The multi-node job ran on both nodes, one torchrun (and so one rank) on each, both runs of it; the
    single-node one on one node with its 2 ranks (the trainer's 'world:' line names each rank's host)."""
    fields, why = cluster.job(job), diagnosis(cluster, out, job)
    worlds = re.findall(r"world: 2 rank\(s\) on (\d) node\(s\): (.*)", job_output(out))
    assert len(worlds) == 2, why  # the first run and the requeued one
    if launcher == "multi-node":
        assert fields["NumNodes"] == "2" and fields["NodeList"] == "higgs-node[1-2]", why
        for count, hosts in worlds:
            assert count == "2" and sorted(re.findall(r"(higgs-node\d) \(rank \d\)", hosts)) == list(NODES), why
    else:
        assert fields["NumNodes"] == "1" and all(count == "1" for count, _ in worlds), why


LAUNCHERS = [pytest.param("single-node", marks=pytest.mark.extended), "multi-node"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_preemption_warning_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path, launcher):
    """USR1 to the batch shell (what `#SBATCH --signal=B:USR1@120` sends before the time limit)."""
    config = write_config(tmp_path, "run", *OVERRIDES)
    run, out = tmp_path / "run" / "run", tmp_path / "job.out"
    job = submit(cluster, launcher, config, "--output", out)  # the default partition, as submitted by hand
    wait_for_checkpoint(cluster, job, run, out)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    fields = wait_job(cluster, job, requeued_and_finished, "the requeued job to finish (COMPLETED, Restarts=1)", out)
    assert fields["ExitCode"] == "0:0", diagnosis(cluster, out, job)
    check_resumed_exactly(cluster, job, run, out, "SIGUSR1", uninterrupted, before="higgs-ddp launch: USR1 at",
                          after=f"higgs-ddp launch: requeueing job {job}")
    check_nodes(cluster, launcher, job, out)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_real_preemption_by_a_higher_priority_job_requeues_and_resumes_exactly(cluster, uninterrupted_user_path,
                                                                                tmp_path, launcher):
    """A job in the high partition needing both nodes takes them from the low-partition training job
    (local_slurm.sh: preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=30 on low). Slurm sends SIGTERM
    to the job's tasks (on every node); the workers save and exit; the launcher sees the preemption and
    requeues the job (a job that ends within its grace time is otherwise just FAILED); it restarts once the
    high job is done."""
    config = write_user_config(tmp_path, "run")
    run, out, high_out = tmp_path / "run" / "run", tmp_path / "job.out", tmp_path / "high.out"
    job = submit(cluster, launcher, config, "--partition=low", "--exclusive", "--output", out)
    wait_for_checkpoint(cluster, job, run, out)
    high = cluster.sbatch("--partition=high", f"--nodes={len(NODES)}", "--exclusive", "--output", high_out,
                          "--job-name=higgs-ddp-high", "--wrap", "echo high-priority job ran on $(hostname); sleep 5")
    wait_job(cluster, job, requeued_and_finished, "the preempted job to be requeued and finish", out)
    check_resumed_exactly(cluster, job, run, out, "SIGTERM", uninterrupted_user_path, before="",
                          after=f"higgs-ddp launch: job {job} was preempted")
    check_nodes(cluster, launcher, job, out)
    low, hi = cluster.job(job), cluster.job(high)
    why = diagnosis(cluster, out, job, high)
    assert hi["JobState"] == "COMPLETED" and hi["Partition"] == "high", why
    assert "high-priority job ran" in high_out.read_text(), why
    # The high job ran while the low one was requeued: it ended before the low job's second start.
    assert hi["StartTime"] <= hi["EndTime"] <= low["StartTime"], why
