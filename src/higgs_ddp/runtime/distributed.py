"""Process-group setup from torchrun's environment: NCCL on GPUs, gloo on CPU, chosen automatically."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from higgs_ddp.runtime import rendezvous


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


_used_process_group = False  # set by setup_distributed; read by exit_process


def setup_distributed(timeout_minutes: int = 30) -> DistEnv:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        # More ranks on a node than GPUs: rank N would ask for cuda:N and fail deep inside CUDA. Every local
        # rank sees the same counts, so rank 0 reports it too (only rank 0 prints a config error).
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
        if per_node > gpus:
            from higgs_ddp.config import ConfigError

            raise ConfigError(f"{per_node} processes per node but {gpus} GPU(s) visible: start one per GPU "
                              f"(--nproc-per-node {gpus}), or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    env = DistEnv(rank, world, local, device, backend)
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, timeout=timeout, **_restart_safe_store(rank, world), **kwargs)
        global _used_process_group
        _used_process_group = True
    return env


def _restart_safe_store(rank: int, world: int) -> dict:
    """torchrun keeps one TCPStore for all restarts (``--max-restarts``) and workers reuse its keys without
    a per-attempt prefix, so restarted gloo ranks read their dead predecessors' addresses and fail with
    "connectFullMesh failed ... Connection refused" (measured, torch 2.11). A prefix per restart fixes it
    on one node. Across nodes it cannot: after one node's rank fails, only that node's restart count goes
    up (the others restart for the membership change, at their old count), so the prefixes differ and the
    ranks wait for each other for the collective timeout (measured). There torchrun must give each attempt
    a store of its own: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which ``higgs-ddp train --nnodes`` and
    launch/multi_node.sbatch set."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # plain env:// (no torchrun, or a fresh store per attempt)
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise rendezvous.RendezvousConfigError(
            "torchrun on several nodes with --max-restarts shares one store between restarts, which a restart "
            "on one node only cannot use: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
            "environment (higgs-ddp train and launch/multi_node.sbatch do)")
    # The wait for the other ranks' addresses (a rank that died before connecting) ends after HIGGS_RDZV_TIMEOUT.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=rendezvous.timeout_s()))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"higgs_ddp/attempt_{attempt}", store), "rank": rank, "world_size": world}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (small, picklable, our own data), in rank order."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """``sys.exit(code)``, minus Python's interpreter finalization in a process that used a process group.

    Even after ``destroy_process_group``, gloo's C++ threads can still own work holding Python objects;
    freeing them while the interpreter shuts down aborts a finished run with "terminate called without an
    active exception" (exit -6; pytorch/pytorch#179291). Measured here: 5 of 15 runs of two concurrent
    2-rank jobs before, 0 of 40 after. Call this last, with every file closed and every DataLoader worker
    stopped: only the standard streams are flushed here."""
    if not _used_process_group:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
