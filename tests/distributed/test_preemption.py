"""Stop signals, a killed rank or worker, diverged ranks under torchrun: an uninterrupted run's weights, or a loud stop.

Faults under torchrun with 2 gloo ranks: a stop signal to every process of the job step (as Slurm sends
it), to torchrun's process group or to one rank; a worker killed outright; ranks whose weights diverged.
Each ends with the same weights as an uninterrupted run, or stops loudly.

The runs use DataLoader workers (what every real config does), and one of each kind takes the user's
whole path: workers, validation, listening samples, TensorBoard, token-budget batches, WAV input."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    FSDP, MAX_STEPS, ROOT, TORCHRUN_ENV, assert_same_user_path_outputs, assert_same_weights, children, final_weights,
    rows, tiny_config, torchrun, torchrun_cmd, wait_for, workers, write_config, write_user_config,
)

pytestmark = pytest.mark.slow


def step_processes(launcher_pid: int) -> list:
    """torchrun and everything under it (the training processes, their DataLoader workers): the processes
    of a Slurm job step, which `scancel` and a preemption signal all of, whatever their process group."""
    found, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children(pid))
    return found


def start_step(config, launcher=()) -> subprocess.Popen:
    """torchrun as launch/requeue.sh starts it under srun: USR1 ignored (torchrun would die of it); in a
    session of its own, so that the test can signal its process group as a terminal or `kill -- -PGID` does."""
    cmd = ["bash", "-c", 'trap "" USR1; exec "$@"', "torchrun-step", *torchrun_cmd(2, "--config", config, launcher=launcher)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TORCHRUN_ENV,
                            cwd=ROOT, start_new_session=True)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def send_from_another_process(pid: int, sig: signal.Signals) -> None:
    """As Slurm or torchrun do: a DataLoader worker tells its parent's signals from anyone else's."""
    subprocess.run(["kill", f"-{sig.name[3:]}", str(pid)], check=True)


def worker_survives_stop_signals(worker_init_fn) -> bool:
    """A DataLoader worker (of this process) gets SIGTERM and SIGUSR1 from elsewhere: does it live on, serving
    the next batches in order?"""
    import multiprocessing

    from torch.utils.data import DataLoader

    before = set(multiprocessing.active_children())
    it = iter(DataLoader(range(10_000), batch_size=2, num_workers=1, worker_init_fn=worker_init_fn))
    try:
        assert next(it).tolist() == [0, 1]  # the worker has run its worker_init_fn
        (worker,) = set(multiprocessing.active_children()) - before
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            send_from_another_process(worker.pid, sig)
        time.sleep(1)
        alive = worker.is_alive()
        if alive:
            assert [next(it).tolist() for _ in range(3)] == [[2, 3], [4, 5], [6, 7]]
            worker.terminate()  # the parent's own SIGTERM (DataLoader's last resort; multiprocessing at exit)
            worker.join(timeout=10)
            assert worker.exitcode == 0  # ended at once, and not reported as a failure
        return alive
    finally:
        del it  # its shutdown unregisters the worker from the DataLoader's SIGCHLD check


def test_dataloader_workers_leave_stop_signals_to_the_training_process():
    from higgs_ddp.training.preemption import leave_stop_signals_to_parent

    assert worker_survives_stop_signals(leave_stop_signals_to_parent)
    # The negative control: torch's own worker dies of the same signals, and the SIGCHLD handler it sets
    # in the training process raises wherever that process is at that moment (issue 19: in the save).
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid \d+\) is killed by signal: Terminated"):
        worker_survives_stop_signals(None)


def test_a_worker_that_dies_while_stopping_is_left_to_the_next_fetch():
    """Once a stop signal came, a DataLoader worker's death raises nothing mid-step: the next fetch reports it
    (train.py stops every rank before that step and saves). Without a stop it raises at once, as torch does."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from higgs_ddp.training.preemption import StopRequest

    def kill_the_worker(stopping: bool) -> None:
        before = set(multiprocessing.active_children())
        with StopRequest() as stop:
            it = iter(DataLoader(range(10_000), batch_size=2, num_workers=1))
            try:
                next(it)
                (worker,) = set(multiprocessing.active_children()) - before
                if stopping:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    assert stop.signum == signal.SIGUSR1
                os.kill(worker.pid, signal.SIGKILL)
                time.sleep(1)  # the SIGCHLD arrives meanwhile
                with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
                    for _ in range(10_000):
                        next(it)
            finally:
                del it

    kill_the_worker(stopping=True)
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid \d+\) is killed by signal: Killed"):
        kill_the_worker(stopping=False)


def signal_the_step(proc, how: str, sig: signal.Signals, num_workers: int) -> None:
    if how == "rank1":  # the other rank learns it through the all-reduce
        os.kill(workers(proc.pid)[1], sig)
        return
    everyone = step_processes(proc.pid)
    assert len(everyone) == 1 + 2 * (1 + num_workers), everyone  # the DataLoader workers are up: they get it too
    if how == "step":  # Slurm: scancel, preemption
        for pid in everyone:
            os.kill(pid, sig)
    else:  # torchrun's process group: torchrun passes SIGTERM on to each rank's whole process group
        os.killpg(proc.pid, sig)


def assert_only_torchrun_complained(out: str, returncode: int, torchrun_signalled: bool) -> None:
    """The training processes exited 0 without a traceback (no "worker killed by signal"). torchrun itself,
    given SIGTERM, passes it on, waits for them, then raises its SignalException and exits 1."""
    assert "killed by signal" not in out and "ChildFailedError" not in out, out[-3000:]
    if torchrun_signalled:
        assert out.count("Traceback") == 1 and "SignalException" in out and returncode == 1, out[-3000:]
    else:
        assert "Traceback" not in out and returncode == 0, out[-3000:]


STOPS = [  # signal, sent to, DataLoader workers, the user's whole path
    pytest.param(signal.SIGTERM, "step", 2, True, id="term-step-user-path"),
    pytest.param(signal.SIGUSR1, "step", 1, False, id="usr1-step", marks=pytest.mark.extended),
    pytest.param(signal.SIGTERM, "group", 1, False, id="term-torchrun-group", marks=pytest.mark.extended),
    pytest.param(signal.SIGUSR1, "rank1", 0, False, id="usr1-rank1-no-workers"),
]


@pytest.mark.parametrize("sig,how,num_workers,user_path", STOPS)
def test_stop_signal_saves_then_the_same_command_resumes_exactly(request, tmp_path, sig, how, num_workers,
                                                                 user_path):
    if user_path:
        assert num_workers == 2  # USER_PATH's
        config, ref = write_user_config(tmp_path, "run"), request.getfixturevalue("uninterrupted_user_path")
    else:
        config = write_config(tmp_path, "run", f"data.num_workers={num_workers}")
        ref = request.getfixturevalue("uninterrupted")
    run = tmp_path / "run" / "run"
    proc = start_step(config)
    wait_for(lambda: logged_steps(run) >= 5, "training to start")
    signal_the_step(proc, how, sig, num_workers)
    out, _ = proc.communicate(timeout=120)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == sig.name, out[-3000:]
    stopped_at = status["step"]
    assert stopped_at < MAX_STEPS and f"stopped by {sig.name} after step {stopped_at}" in out, out[-3000:]
    assert (run / "checkpoints" / f"step_{stopped_at:06d}").is_dir()
    assert_only_torchrun_complained(out, proc.returncode, torchrun_signalled=sig == signal.SIGTERM and how != "rank1")

    again = torchrun(2, "--config", config)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped_at:06d}'}" in again.stdout
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(ref))
    if user_path:
        assert_same_user_path_outputs(run, ref)
    else:
        assert rows(run) == rows(ref)


def test_a_dataloader_worker_killed_while_stopping_loses_no_checkpoint(tmp_path, uninterrupted):
    """SIGTERM to the step, then one rank's DataLoader worker dies of something else (SIGKILL) before the
    ranks agree to stop: that rank must neither raise mid-step (its peers wait in a collective) nor lose
    the save."""
    config = write_config(tmp_path, "run", "data.num_workers=1")
    run = tmp_path / "run" / "run"
    proc = start_step(config)
    wait_for(lambda: logged_steps(run) >= 5, "training to start")
    (loader_worker,) = children(workers(proc.pid)[1])
    signal_the_step(proc, "step", signal.SIGTERM, num_workers=1)
    os.kill(loader_worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == "SIGTERM", out[-3000:]
    assert_only_torchrun_complained(out, proc.returncode, torchrun_signalled=True)
    stopped_at = status["step"]
    assert (run / "checkpoints" / f"step_{stopped_at:06d}").is_dir()
    again = torchrun(2, "--config", config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped_at:06d}'}" in again.stdout
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    assert rows(run) == rows(uninterrupted)


@pytest.mark.extended  # test_multinode's killed rank restarts both nodes on the same user path
def test_sigkill_under_max_restarts_resumes_from_last_checkpoint(tmp_path, uninterrupted_user_path):
    """On the user's path: the restart drops the metrics, TensorBoard events and listening samples of the
    steps after its checkpoint and redoes them."""
    config = write_user_config(tmp_path, "run")
    run = tmp_path / "run" / "run"
    proc = start_step(config, launcher=("--max-restarts=1",))
    wait_for(lambda: (run / "checkpoints" / "step_000008").is_dir(), "the second checkpoint")
    killed = workers(proc.pid)[1]
    assert len(children(killed)) == 2  # its DataLoader workers: orphaned, they notice and end on their own
    os.kill(killed, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    resumed = [line for line in out.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1, out[-4000:]  # the restart continued from a checkpoint, not from scratch
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(uninterrupted_user_path))
    assert_same_user_path_outputs(run, uninterrupted_user_path)


def test_a_stop_signal_to_the_higgs_ddp_command_stops_the_ranks_cleanly(tmp_path, uninterrupted):
    """`higgs-ddp train --nproc-per-node 2` (what `make train` runs) passes a SIGTERM it gets on to the ranks
    as a clean stop: they save, everything exits 0, status.json and the last line name the SIGTERM that was
    sent, and the same command resumes exactly."""
    config = write_config(tmp_path, "run", "data.num_workers=1")
    run = tmp_path / "run" / "run"
    cmd = [sys.executable, "-m", "higgs_ddp", "train", "--nproc-per-node", "2", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TORCHRUN_ENV,
                            cwd=ROOT)
    wait_for(lambda: logged_steps(run) >= 5, "training to start")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] < MAX_STEPS, out[-3000:]
    assert status["signal"] == "SIGTERM" and f"stopped by SIGTERM after step {status['step']}" in out, out[-3000:]
    again = subprocess.run(cmd, capture_output=True, text=True, env=TORCHRUN_ENV, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    assert rows(run) == rows(uninterrupted)


# extended: the stop machinery is the ddp runs' above, fsdp's exact resume test_fsdp's, both together the nodes'
@pytest.mark.extended
@pytest.mark.parametrize("fault", ["sigterm-step", "sigkill-max-restarts"])
def test_fsdp_stop_and_restart_resume_exactly(tmp_path, uninterrupted_fsdp, fault):
    """Under train.parallel=fsdp (sharded checkpoints, each rank writing its rows): SIGTERM to every process
    of the step saves and the same command resumes; a rank SIGKILLed under --max-restarts restarts from the
    last checkpoint. Both end bit-identical to the uninterrupted fsdp run."""
    config = write_config(tmp_path, "run", *FSDP)
    run = tmp_path / "run" / "run"
    if fault == "sigterm-step":
        proc = start_step(config)
        wait_for(lambda: logged_steps(run) >= 5, "training to start")
        signal_the_step(proc, "step", signal.SIGTERM, num_workers=1)
        out, _ = proc.communicate(timeout=120)
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "stopped", out[-3000:]
        saved = run / "checkpoints" / f"step_{status['step']:06d}"
        assert (saved / "shards").is_dir()
        again = torchrun(2, "--config", config)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming from {saved}" in again.stdout
    else:
        proc = start_step(config, launcher=("--max-restarts=1",))
        wait_for(lambda: (run / "checkpoints" / "step_000008").is_dir(), "the second checkpoint")
        os.kill(workers(proc.pid)[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        assert len([line for line in out.splitlines() if line.startswith("resuming from")]) == 1, out[-4000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert_same_weights(final_weights(run), final_weights(uninterrupted_fsdp))
    assert rows(run) == rows(uninterrupted_fsdp)


def test_a_batch_that_cannot_be_fetched_while_stopping_stops_the_run_before_its_step():
    """train.py's fetch: while this rank is stopping anyway, a loader error (a dead worker) means "stop before
    this step", agreed with the other ranks before any of the step's collectives; otherwise it is raised."""
    from higgs_ddp.data.prefetch import Prefetcher
    from higgs_ddp.train import next_micro_batches

    def failing():
        yield from range(2)
        raise RuntimeError("DataLoader worker (pid 1) exited unexpectedly")

    for stopping in (True, False):
        batches = Prefetcher(failing(), torch.device("cpu"))
        stop = types.SimpleNamespace(signum=signal.SIGTERM if stopping else 0)
        assert next_micro_batches(batches, 2, stop) == [0, 1]
        if stopping:
            assert next_micro_batches(batches, 2, stop) is None
        else:
            with pytest.raises(RuntimeError, match="exited unexpectedly"):
                next_micro_batches(batches, 2, stop)
        batches.close()


def test_ranks_with_different_weights_refuse_to_checkpoint(tmp_path):
    """Bypass DDP for one step (what public trainers did): the checkpoint's checksum all-reduce catches it."""
    cfg = tiny_config(tmp_path, "train.micro_batch_size=1", "train.lr=1e-2")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "rank_sync_worker.py"), str(path), str(out), "bypass", "checkpoint"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=TORCHRUN_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_param_diff"] > 0
    assert "ranks hold different trainable weights at step 1" in result["checkpoint_error"]
    assert "gradients were not synchronised" in result["checkpoint_error"]
    assert not (tmp_path / "run" / "checkpoints" / "step_000001").exists()
