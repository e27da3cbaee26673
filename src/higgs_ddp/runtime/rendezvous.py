"""How long the nodes of a job wait for each other, and what to say when they stop waiting.

torchrun's defaults hang for 10 minutes for a node that never arrives (c10d's join_timeout, static's
timeout) and a node given a wrong endpoint retries for 60 s; our process group then waits for a rank up
to its collective timeout. ``HIGGS_RDZV_TIMEOUT`` (seconds) bounds all of it: ``higgs-ddp train|prepare
|bench`` pass it to torchrun as ``--rdzv-conf`` (keys the user gives there win), the ranks use it while
they connect, and a rendezvous that fails ends with one line naming the endpoint and what to check.

No torch import here: the launcher reads this before torchrun starts.
"""

from __future__ import annotations

import os
import re

from higgs_ddp.errors import HiggsError

ENV = "HIGGS_RDZV_TIMEOUT"
DEFAULT_S = 300  # a Slurm allocation's nodes start their steps within seconds; 5 minutes is generous
CONNECT_S = 60  # c10d's read_timeout: connecting to the endpoint and every store operation (torchrun's default)


class RendezvousConfigError(HiggsError, ValueError):
    pass


def timeout_s() -> int:
    raw = os.environ.get(ENV, "")
    if not raw:
        return DEFAULT_S
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise RendezvousConfigError(f"{ENV}={raw!r} must be a whole number of seconds > 0")
    return value


def conf_items(launch: list) -> tuple[dict, list]:
    """(--rdzv-conf's key=value pairs, the other launch options)."""
    conf, rest, i = {}, [], 0
    while i < len(launch):
        arg = launch[i]
        if arg == "--rdzv-conf" or arg.startswith("--rdzv-conf="):
            value = arg.split("=", 1)[1] if "=" in arg else launch[i + 1]
            i += 0 if "=" in arg else 1
            for item in filter(None, value.split(",")):
                key, _, v = item.partition("=")
                conf[key.strip()] = v.strip()
        else:
            rest.append(arg)
        i += 1
    return conf, rest


def with_timeouts(launch: list) -> list:
    """torchrun's options with ``--rdzv-conf`` completed by our timeouts: c10d's join_timeout (all nodes
    joined) and read_timeout (reaching the endpoint; at most torchrun's own 60 s), static's timeout."""
    conf, rest = conf_items(launch)
    t = timeout_s()
    ours = {"join_timeout": t, "read_timeout": min(t, CONNECT_S), "timeout": t}
    merged = {**{k: str(v) for k, v in ours.items()}, **conf}
    return [*rest, "--rdzv-conf", ",".join(f"{k}={v}" for k, v in merged.items())]


def option(launch: list, name: str, default: str = "") -> str:
    for i, arg in enumerate(launch):
        if arg == name and i + 1 < len(launch):
            return launch[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def explain_failure(torchrun_output: str, launch: list) -> str | None:
    """One line for a rendezvous that failed (torchrun printed a traceback for it), else None."""
    conf, _ = conf_items(launch)
    endpoint = option(launch, "--rdzv-endpoint") or \
        f"{option(launch, '--master-addr', '127.0.0.1')}:{option(launch, '--master-port', '29500')}"
    nodes = option(launch, "--nnodes", "1")
    same = f"--nnodes {nodes} --rdzv-endpoint {endpoint}" + (f" --rdzv-id {option(launch, '--rdzv-id')}"
                                                              if option(launch, "--rdzv-id") else "")
    if "RendezvousTimeoutError" in torchrun_output or re.search(r"waiting for clients\. \d+/\d+ clients joined",
                                                                torchrun_output):
        waited = conf.get("join_timeout") or conf.get("timeout")
        return (f"higgs-ddp: error: rendezvous at {endpoint}: not all {nodes} nodes joined within {waited} s; "
                f"start the same command on every node ({same}), check each node's log for an earlier failure, "
                f"or wait longer ({ENV}=SECONDS)")
    if "RendezvousConnectionError" in torchrun_output or re.search(r"timed out after \d+ms while trying to connect",
                                                                   torchrun_output):
        waited = conf.get("read_timeout") or conf.get("timeout")
        return (f"higgs-ddp: error: rendezvous at {endpoint}: could not connect within {waited} s; "
                f"--rdzv-endpoint must be the first node's address (reachable from this node: the right "
                f"interface, no firewall on the port) and that node's launcher must be running")
    return None
