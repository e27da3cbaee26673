"""Fine-tune Higgs Audio v2 with a hand-written loop (DDP or FSDP2: train.parallel).

    higgs-ddp train --nproc-per-node N --config FILE [dotted.key=value ...]
    torchrun --nproc_per_node N src/higgs_ddp/train.py --config FILE [dotted.key=value ...]   # the same run

setup -> train -> save. The loop below is the whole training procedure; the pieces live in training/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (torchrun src/higgs_ddp/train.py): import the package, not its modules as top-level names.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from higgs_ddp.config import Config, load_config  # noqa: E402
from higgs_ddp.dual_loss import AlignmentError  # noqa: E402
from higgs_ddp.errors import HiggsError  # noqa: E402
from higgs_ddp.runtime.distributed import barrier, cleanup, exit_process, setup_distributed  # noqa: E402
from higgs_ddp.runtime.shared_fs import SharedFilesystemError  # noqa: E402


def train(cfg: Config) -> dict:
    from tqdm import tqdm

    from higgs_ddp.evaluation.listening import progress_fields

    from higgs_ddp.data.dataset import check_manifests
    from higgs_ddp.training.checkpoint import remove_stale_temporaries, resume_from
    from higgs_ddp.training.preemption import StopRequest, signal_name, write_failure, write_status
    from higgs_ddp.training.run_lock import hold_output_dir
    from higgs_ddp.training.runlog import RunLog
    from higgs_ddp.training.run_files import write_run_files
    from higgs_ddp.training.trainer import Trainer

    env = setup_distributed()
    log = batches = step = lock = None  # step: the one a failure happened at (None: before the first)
    held = False  # this run holds output_dir: only then may it write there, a failure included
    with StopRequest() as stop:  # from here on SIGTERM / SIGUSR1 mean: finish the step, save, exit
        try:
            check_manifests(cfg)  # a missing manifest makes no folder
            lock = hold_output_dir(cfg.output_dir, env)  # before anything is written there (rank 0 holds it)
            held = True
            trainer = Trainer(cfg, env, base=starting_base(cfg))  # setup
            t = cfg.train
            ckpt, note, start = resume_from(cfg.output_dir, t.resume, env, load=trainer.resume)
            start = start if ckpt else 0  # what trainer.resume returned: the checkpoint's step
            if env.is_main:
                remove_stale_temporaries(cfg.output_dir)
                write_run_files(cfg)
                write_status(cfg.output_dir, "running", start)
                print(trainer.run_card(), flush=True)
                if note:
                    print(note, flush=True)
                if ckpt:
                    epoch, offset = trainer.sampler.position(start)
                    print(f"resuming from {ckpt} (step {start}; epoch {epoch}, {offset} micro-batches into it)",
                          flush=True)
            log = RunLog(cfg.output_dir, start, cfg.logging.tensorboard) if env.is_main else None
            bar = tqdm(total=t.max_steps, initial=start, disable=not env.is_main, dynamic_ncols=True, desc="train")
            batches = trainer.batches()
            last, val, heard, signum, t_start = {}, {}, {}, 0, time.perf_counter()
            done = saved = start  # steps trained; the last one with a checkpoint (start's was loaded, or none)
            for step in range(start + 1, t.max_steps + 1):  # train
                if trainer.tracker.exhausted:  # eval.early_stop_patience (identical on every rank)
                    break
                t0 = time.perf_counter()
                micro = next_micro_batches(batches, t.grad_accum_steps, stop)
                # Every rank, every step, before the step's collectives: they all stop before the same step,
                # a rank whose batches could not be fetched while it was stopping included.
                signum = stop.agreed(env.device)
                if signum:
                    break
                lr = trainer.optimizer.param_groups[0]["lr"]
                r = trainer.train_step(micro)
                done = step
                dt = time.perf_counter() - t0
                last = {"step": step, **r.row(), "lr": lr, "tokens_per_s": r.tokens / dt, "step_time_s": dt,
                        "skipped_steps": trainer.skipped_steps, **trainer.memory()}
                evaluated = between_steps(trainer, log, step)  # validation, listening samples, best/
                val, heard = evaluated["val"] or val, evaluated["samples"] or heard
                if env.is_main:
                    log.train(last, write=step % t.log_every == 0 or step == t.max_steps)
                    if r.skipped:
                        tqdm.write(f"step {step}: non-finite loss or gradient, step skipped "
                                   f"({trainer.skipped_steps} so far)")
                    bar.set_postfix(loss=f"{r.loss:.3f}", **r.progress(),
                                    **({"val": f"{val['loss']:.3f}"} if val else {}), **progress_fields(heard),
                                    lr=f"{lr:.2e}", tok_s=f"{r.tokens / dt:,.0f}")
                    bar.update(1)
                if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                    saved = save(trainer)
            bar.close()
            # The workers end before the last save: a worker's death can no longer raise inside it.
            batches.close()
            if done > saved:  # the step the run stopped after, or the last one
                saved = save(trainer)
            if signum:
                if env.is_main:
                    write_status(cfg.output_dir, "stopped", done, signal=signal_name(signum))
                    print(f"stopped by {signal_name(signum)} after step {done}; "
                          + ("the checkpoint is saved. " if done else "nothing to save. ")
                          + "Run the same command again to resume.", flush=True)
            else:
                final = trainer.save_final()  # save
                if env.is_main:
                    early = trainer.tracker.exhausted
                    write_status(cfg.output_dir, "finished", done if early else t.max_steps,
                                 **({"early_stop": trainer.tracker.state_dict()} if early else {}))
                    if early:
                        kept = trainer.best_folder()
                        print(f"early stop after step {done}: eval.best_by={trainer.tracker.metric} has not improved "
                              f"for eval.early_stop_patience={cfg.eval.early_stop_patience} "
                              f"evaluations; {trainer.tracker.describe()}"
                              + (f" (weights in {kept})" if kept else " (no best/ was written)"), flush=True)
                    done_note = f"final loss {last['loss']:.4f}" if last else f"already finished at step {done}"
                    print(f"done: {done_note}; weights in {final}", flush=True)
            if env.is_main:
                kept = trainer.best_folder()
                best = (trainer.tracker.describe(), kept) if kept else None
                print(log.summary(done - start, time.perf_counter() - t_start, None if signum else final, best),
                      flush=True)
            barrier()  # tearing down gloo while a peer is still saving aborts that peer
            return last
        except BaseException as e:  # a crash must not leave status.json saying "running"
            if env.is_main and held:  # (a run refused the folder leaves its holder's status alone)
                write_failure(cfg.output_dir, step, failure_reason(e))
            raise
        finally:  # closed here on errors too: the process ends without interpreter finalization (exit_process)
            # (inside StopRequest: the DataLoader's SIGCHLD handler it sets aside while stopping comes back
            # only after the workers are gone)
            if batches:
                batches.close()
            if log:
                log.close()
            if lock:  # last: everything this run writes is written
                lock.release()
            cleanup()


def starting_base(cfg: Config):
    """train.init_from: (tokenizer, dtype) -> the earlier fine-tune merged into its base, as export --merge
    builds it (and as export and speak rebuild this run's base); None without it."""
    if not cfg.train.init_from:
        return None
    from higgs_ddp.tools.export import base_model
    return lambda tokenizer, dtype: base_model(cfg, tokenizer, dtype)


def next_micro_batches(batches, n: int, stop) -> list | None:
    """The step's micro-batches; None when they could not be fetched while this rank is stopping (a
    DataLoader worker died of the same signal, say): the ranks then stop before this step and save."""
    try:
        return [next(batches) for _ in range(n)]
    except Exception as e:  # noqa: BLE001 - whatever it was, this step's batches will not be trained on
        if not stop.signum:
            raise
        print(f"higgs-ddp: while stopping, this rank's next batches could not be fetched ({e}); "
              f"stopping before that step", file=sys.stderr, flush=True)
        return None


def save(trainer) -> int:
    """A checkpoint after the steps the trainer has taken; returns their number."""
    path = trainer.save_checkpoint()
    if trainer.env.is_main:
        from tqdm import tqdm
        tqdm.write(f"step {trainer.step}: checkpoint {path}")
    return trainer.step


def between_steps(trainer, log, step: int) -> dict:
    """Validation every ``eval.every`` steps and at the end, listening samples (with their detectors and
    scores) every ``eval.samples_every`` (both shared by all ranks), and ``best/`` when ``eval.best_by``
    improved. None of it touches the training RNG, so a run with them ends with the same weights as one
    without. -> {"val": the validation row, "samples": the samples' summary} (rank 0; each {} when not run)."""
    from tqdm import tqdm

    cfg, env = trainer.cfg, trainer.env
    e, last_step = cfg.eval, step == cfg.train.max_steps
    val, summary = {}, {}
    if len(trainer.val_dataset) and (last_step or (e.every and step % e.every == 0)):
        row, line = trainer.validate()
        val = {"step": step, **row}
        if env.is_main:
            log.val(val)
            tqdm.write(f"step {step}: {line}")
        if e.best_by == "val_loss":  # all-reduced: the same number on every rank
            trainer.evaluated(step, val["loss"])
    every = e.samples_every or e.every
    if e.prompts and (last_step or (every and step % every == 0)):
        from higgs_ddp.evaluation.detectors import warnings_for
        from higgs_ddp.evaluation.listening import describe_summary, sample_summary, write_samples
        from higgs_ddp.runtime.distributed import all_gather_objects

        results = write_samples(trainer.raw, trainer.tokenizer, lambda: trainer.codec, cfg, step,
                                Path(cfg.output_dir) / "samples",
                                lockstep=trainer.strategy.lockstep_generation(trainer.wrapped), scorer=trainer.scorer)
        if env.is_main:
            summary = {"step": step, **sample_summary(results)}
            log.samples(summary)
            log.audio(step, results)
            tqdm.write(f"step {step}: {len(results)} listening samples in {Path(cfg.output_dir) / 'samples'}: "
                       f"{describe_summary(summary)}")
            for line in warnings_for(summary):
                tqdm.write(f"step {step}: warning: {line}")
        if e.best_by in ("wer", "speaker_sim"):  # rank 0 holds the scores: every rank decides on its number
            # (with why it is missing, when it is: scoring.mean_scores' speaker_sim_unmeasured)
            trainer.evaluated(step, *all_gather_objects((summary.get(e.best_by),
                                                         summary.get(f"{e.best_by}_unmeasured", "")))[0])
    return {"val": val, "samples": summary}


def user_errors() -> tuple:
    """The errors that end a run with our one-line message; anything else is a bug (a traceback). The
    standalone loss's AlignmentError is one: dual_loss.py imports nothing of ours, so it is named here."""
    return (HiggsError, AlignmentError)


def failure_reason(e: BaseException) -> str:
    """One line: the message main prints for our errors, the exception's type and message for others."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGINT): a hard stop, nothing saved since the last checkpoint"
    text = " ".join(str(e).split())
    return text if isinstance(e, user_errors()) else ": ".join(filter(None, (type(e).__name__, text)))


HELP = """Fine-tune Higgs Audio v2 on a config's data: LoRA, the audio FFN or the full model (train.mode),
DDP or FSDP2 (train.parallel), on one process or several.

    higgs-ddp train --config configs/tiny.yaml
    higgs-ddp train --nproc-per-node 8 --config configs/higgs_v2_3b_lora.yaml train.lr=1e-4

Checkpoints, metrics, samples and status.json go to output_dir. The same command again resumes from the
latest complete checkpoint there (train.resume to choose one). SIGTERM or SIGUSR1 finish the step, save
and exit 0; Ctrl-C stops at once, saving nothing. higgs-ddp doctor checks a config before a run."""


def main(argv=None) -> int:
    from higgs_ddp.runtime.launch_options import LAUNCH_HELP

    parser = argparse.ArgumentParser(description=HELP, epilog=LAUNCH_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    from higgs_ddp.training.trainer import TrainingError

    try:
        train(load_config(args.config, args.overrides))
    except user_errors() as e:
        # Rank 0 speaks for all, except where each rank has its own story (or another node must hear it).
        if int(os.environ.get("RANK", 0)) == 0 or isinstance(e, (TrainingError, SharedFilesystemError)):
            print(f"higgs-ddp: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # SIGINT (Ctrl-C) is a hard stop, unlike SIGTERM / SIGUSR1 (preemption.py)
        if int(os.environ.get("RANK", 0)) == 0:
            print("higgs-ddp: error: interrupted (SIGINT): stopped at once, nothing saved since the last "
                  "checkpoint; run the same command to resume from it (SIGTERM or SIGUSR1 finish the step and "
                  "save first)", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    exit_process(main())
