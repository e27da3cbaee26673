"""higgs-ddp <command>: every tool of the project behind one command line (also ``python -m higgs_ddp``).

    higgs-ddp train --nproc-per-node 8 --config configs/higgs_v2_3b_lora.yaml train.lr=1e-4
    higgs-ddp prepare --nproc-per-node 8 --config configs/higgs_v2_3b_lora.yaml
    higgs-ddp export --checkpoint runs/higgs_v2_3b_lora --out exported/adapter
    higgs-ddp doctor --config configs/higgs_v2_3b_lora.yaml
    higgs-ddp speak --model runs/higgs_v2_3b_lora --text "Hello there." --out hello.wav

``train``, ``prepare`` and ``bench`` run on several processes: given ``--nproc-per-node N`` (or any of
torchrun's node and rendezvous options) this command starts torchrun with them, which starts this same
command once per rank. Stop signals reach the ranks as they would under torchrun directly, and a failed
run still ends with its one-line ``higgs-ddp: error: ...`` as the last line, below torchrun's report.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from higgs_ddp.runtime.launch_options import LAUNCH_FLAGS, LAUNCH_HELP, LAUNCH_OPTIONS


@dataclass(frozen=True)
class Command:
    target: str  # "module:function" taking argv, returning the exit code
    summary: str
    launched: bool = False  # runs once per rank under torchrun


COMMANDS = {
    "train": Command("higgs_ddp.train:main", "fine-tune (the same run as torchrun src/higgs_ddp/train.py)", True),
    "prepare": Command("higgs_ddp.cli:prepare", "encode a config's audio into the code cache and write the "
                       "prepared index before training", True),
    "export": Command("higgs_ddp.tools.export:main", "a checkpoint's weights as an adapter, tensors or a merged model"),
    "doctor": Command("higgs_ddp.tools.doctor:main", "check a config, its data, the machine and the resume before a run"),
    "plot": Command("higgs_ddp.tools.plot:main", "a run's curves (losses, validation, accuracy, lr, speed) as a PNG"),
    "bench": Command("higgs_ddp.tools.bench.benchmark:main",
                     "time training steps, or the start-up on N cached clips, on synthetic data (last line JSON)", True),
    "manifest": Command("higgs_ddp.tools.manifest_cmd:main",
                        "import a corpus (LJSpeech, LibriTTS, VCTK, CSV, ...) as a manifest; a manifest's stats"),
    "smoke": Command("higgs_ddp.tools.smoke:main", "the real architecture end to end on a CPU: build, load, train, "
                     "resume, export, reload"),
    "demo-data": Command("higgs_ddp.tools.demo_data:main", "write the demo's synthetic corpus (WAV clips or codes)"),
    "speak": Command("higgs_ddp.tools.speak:main", "text to speech with a run, checkpoint, adapter or merged export"),
    "score": Command("higgs_ddp.tools.score:main", "compare models on the same prompts: WER, speaker similarity, "
                     "silence, stopping"),
    "prefs": Command("higgs_ddp.tools.prefs:main", "preference pairs for DPO: K candidates per prompt, scored, the "
                     "best valid one against the worst", True),
}


def prepare(argv=None) -> int:
    """higgs-ddp prepare [--nproc-per-node N] --config FILE [dotted.key=value ...]

    Decode, resample and encode the training (and validation) audio of a config into its code cache, the
    ranks sharing the work, tokenize its prompts and write the prepared index ({cache_dir}/index/): the first
    training start after it maps the index instead of loading the data. Training does the same first when
    nothing is prepared, so this only moves that work ahead of time."""
    from higgs_ddp.config import load_config
    from higgs_ddp.data.dataset import cache_dir, load_data
    from higgs_ddp.errors import HiggsError
    from higgs_ddp.model import load_tokenizer, model_config
    from higgs_ddp.runtime.distributed import barrier, cleanup, setup_distributed
    from higgs_ddp.runtime.shared_fs import SharedFilesystemError

    p = argparse.ArgumentParser(description=prepare.__doc__, epilog=LAUNCH_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file (the training config)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = p.parse_args(argv)
    env = None
    try:
        cfg = load_config(args.config, args.overrides)
        env = setup_distributed()
        tokenizer = load_tokenizer(cfg)
        # Its report goes beside the codes, not into output_dir: that may hold a run whose records it is not.
        load_data(cfg, env, tokenizer, model_config(cfg, tokenizer),
                  report_path=Path(cache_dir(cfg)) / "prepare_report.json")  # prints the summary and the report
        barrier()
    except HiggsError as e:
        if env is None or env.is_main or isinstance(e, SharedFilesystemError):  # other nodes must hear it too
            print(f"higgs-ddp: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup()
    return 0


def check_before_launch(name: str, rest: list) -> str | None:
    """What every rank of train or prepare would refuse at once, found here before torchrun starts them (the
    config; for train, an output_dir it cannot write or that another run holds, and a DPO run's pairs files): one
    line and exit 2, not each rank's error inside torchrun's report. -> the error, or None. Arguments this cannot
    read are left to the ranks. (No torch here but for DPO's pairs: it would add its import time to every launch.)"""
    from higgs_ddp.config import ConfigError, load_config

    if name not in ("train", "prepare"):
        return None
    p = argparse.ArgumentParser(add_help=False)  # both take: --config FILE [dotted.key=value ...]
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args, unknown = p.parse_known_args(rest)
    if unknown:
        return None
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return str(e)
    if name == "train":
        from higgs_ddp.training.run_lock import refusal

        return refusal(cfg.output_dir) or (pairs_problem(cfg) if cfg.train.objective == "dpo" else None)
    return None


def pairs_problem(cfg) -> str | None:
    """The pairs files checked as the trainer checks them (``read_run_pairs``), but for the tokenizer and the
    model's codebooks, which the ranks load and compare before any weight is built."""
    from higgs_ddp.data.preferences import launch_identity, read_run_pairs
    from higgs_ddp.errors import HiggsError

    try:
        read_run_pairs(cfg.data.preferences, cfg.data.val_preferences,
                       launch_identity(cfg.data.codec, cfg.data.codec_revision))
    except HiggsError as e:
        return str(e)
    return None


def split_launch_options(argv: list) -> tuple[list, list]:
    """(torchrun options, the rest). Accepts --opt value, --opt=value and the underscore spellings."""
    launch, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0].replace("_", "-")
        if name in LAUNCH_FLAGS:
            launch.append(name)
        elif name in LAUNCH_OPTIONS:
            if "=" in arg:
                launch.append(f"{name}={arg.split('=', 1)[1]}")
            elif i + 1 < len(argv):
                launch += [name, argv[i + 1]]
                i += 1
            else:
                raise SystemExit(f"higgs-ddp: error: {arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return launch, rest


def needs_launcher(launch: list) -> bool:
    """Outside torchrun, any launch option but a single local process means starting torchrun."""
    if "LOCAL_RANK" in os.environ:  # this process is a rank already
        return False
    values = dict(zip(launch[::2], launch[1::2])) if all("=" not in a for a in launch) else {}
    single = launch in ([], ["--nproc-per-node", "1"]) or values == {"--nproc-per-node": "1"}
    return not single


def torchrun_argv(name: str, launch: list, rest: list) -> list:
    """The torchrun command; across nodes with our rendezvous timeouts (runtime/rendezvous.py)."""
    from higgs_ddp.runtime.rendezvous import with_timeouts

    rendezvous = across_nodes(launch)
    standalone = [] if rendezvous or "--standalone" in launch else ["--standalone"]
    if rendezvous:
        launch = with_timeouts(launch)
    return [sys.executable, "-m", "torch.distributed.run", *standalone, *launch, "-m", "higgs_ddp", name, *rest]


def across_nodes(launch: list) -> bool:
    return any(a.split("=")[0] in ("--nnodes", "--rdzv-endpoint", "--rdzv-backend", "--master-addr") for a in launch)


def launch_ranks(cmd: list) -> int:
    """Run torchrun, passing its output through and stop signals on to the ranks, and repeating the ranks'
    last one-line error below torchrun's own report of the failure (or, when the nodes never met, one line
    saying which rendezvous failed and what to check).

    A stop signal (SIGTERM, SIGUSR1) to this command is sent on to every rank as it came, so that the run
    records the signal the user sent: each rank finishes its step, saves and exits 0, so torchrun ends with 0
    too (SIGTERM to torchrun itself would make it exit 1, and USR1 would kill it: it starts with USR1
    ignored, as launch/requeue.sh starts it). SIGINT stays a hard stop, for torchrun to pass on. torchrun
    gets a session of its own, so a signal to this command's process group (Ctrl-C in a terminal) reaches it
    once, from here. (The sbatch scripts start torchrun
    themselves: Slurm signals every process of a step, and must not stop a rank twice.)"""
    def ignore_usr1():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=ignore_usr1)

    def forward(signum, frame):
        ranks = children(proc.pid)
        if signum == signal.SIGINT or not ranks:  # a hard stop, or no rank started yet
            proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        for pid in ranks if signum != signal.SIGINT else ():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    last_error, tail = None, b""
    try:
        while True:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail = (tail + chunk)[-65536:]
            for line in tail.splitlines():
                text = line.decode(errors="replace")
                if "higgs-ddp" in text and "error:" in text:
                    last_error = text[text.index("higgs-ddp"):]
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code and not last_error:
        from higgs_ddp.runtime.rendezvous import explain_failure

        last_error = explain_failure(tail.decode(errors="replace"), cmd[cmd.index("torch.distributed.run") + 1:])
    if code and last_error:
        print(last_error, file=sys.stderr, flush=True)
    return code


def children(pid: int) -> list:
    """The processes whose parent is ``pid`` (torchrun's ranks), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    return (f"usage: higgs-ddp <command> [options]\n\ncommands:\n{rows}\n\n"
            f"higgs-ddp <command> --help shows a command's options and an example.\n"
            f"train, prepare and bench take torchrun's options too: --nproc-per-node N, --nnodes, --node-rank,\n"
            f"--rdzv-backend, --rdzv-endpoint, --rdzv-id, --max-restarts, ...")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"higgs-ddp: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    if command.launched:
        launch, rest = split_launch_options(rest)
        if needs_launcher(launch) and not {"-h", "--help"} & set(rest):
            from higgs_ddp.runtime.rendezvous import RendezvousConfigError

            sys.argv[0] = f"higgs-ddp {name}"  # argparse's prog in usage and errors
            try:
                problem = check_before_launch(name, rest)
                cmd = torchrun_argv(name, launch, rest)
            except RendezvousConfigError as e:
                problem = str(e)
            if problem:
                print(f"higgs-ddp: error: {problem}", file=sys.stderr)
                return 2
            if across_nodes(launch):  # a store per restart (runtime/distributed.py: _restart_safe_store)
                os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
            return launch_ranks(cmd)
    module, function = command.target.split(":")
    sys.argv[0] = f"higgs-ddp {name}"  # argparse's prog in usage and errors
    from higgs_ddp.errors import HiggsError, report

    try:
        return getattr(importlib.import_module(module), function)(rest)
    except HiggsError as e:  # a user error a command left to us: one line; anything else keeps its traceback
        return report(e)


def console() -> None:
    """The ``higgs-ddp`` console script."""
    from higgs_ddp.runtime.distributed import exit_process

    exit_process(main())
