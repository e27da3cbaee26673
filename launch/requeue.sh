# Sourced by the sbatch scripts:  run_requeueable srun [srun options] TORCHRUN_COMMAND...
#
# The run is preemptible without losing work:
# - `#SBATCH --signal=B:USR1@N` sends USR1 to this shell N s before the time limit (as does
#   `scancel --signal=USR1 --batch JOB` when an operator wants the node back). The trap passes it to
#   every process of the job's steps with `scancel --signal=USR1 JOB`, which reaches the training workers
#   on all nodes; they finish the current optimizer step, save a checkpoint and exit 0. Then this shell
#   requeues the job, and the restarted job resumes from that checkpoint (train.resume=auto).
# - torchrun itself would die of USR1 (it only handles TERM/INT/HUP/QUIT) and orphan its workers, so
#   it starts with USR1 ignored; the workers install their own handler.
# - SIGTERM (preemption by Slurm, scancel) reaches the workers straight from Slurm: they save within
#   KillWait (GraceTime for a preemption). This shell keeps waiting for them meanwhile (if it exited,
#   Slurm would kill the step at once). torchrun exits 1 on SIGTERM (after its workers exit), so rc
#   says nothing here.
# - Preemption with PreemptMode=REQUEUE and a GraceTime: Slurm signals only the steps' tasks and
#   requeues the job when the grace time ends, but a job that ends before that (the workers saved
#   and exited) just ends: FAILED, never requeued. So when `scontrol show job` says this run was
#   preempted (PreemptTime at or after its StartTime) and the partition's PreemptMode requeues, this
#   shell requeues the job itself. A plain `scancel` (no PreemptTime) is not requeued.
HIGGS_STOP=""

_higgs_usr1() {
  HIGGS_STOP=USR1
  echo "higgs-ddp launch: USR1 at $(date +%T): workers save and stop, then the job is requeued"
  scancel --signal=USR1 "$SLURM_JOB_ID"   # job steps only: every process in them, not this shell
}

_higgs_term() {
  HIGGS_STOP=${HIGGS_STOP:-TERM}
  echo "higgs-ddp launch: TERM at $(date +%T): waiting for the workers to save"
}

# Slurm chose this run (not an earlier one of the requeued job) for preemption, and requeues preempted jobs.
_higgs_preempted() {
  local job part pt st
  job=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || return 1
  pt=$(grep -oE '(^| )PreemptTime=[^ ]+' <<<"$job" | head -n 1) || return 1
  st=$(grep -oE '(^| )StartTime=[^ ]+' <<<"$job" | head -n 1) || return 1
  pt=${pt#*=}; st=${st#*=}
  [ "$pt" != None ] && [ -n "$st" ] && [[ ! "$pt" < "$st" ]] || return 1
  part=$(scontrol show partition "${SLURM_JOB_PARTITION:-}" 2>/dev/null) || return 1
  grep -qE '(^| )PreemptMode=[A-Z,]*REQUEUE' <<<"$part"
}

run_requeueable() {
  local srun_cmd=() rc
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do srun_cmd+=("$1"); shift; done
  shift  # the "--" between srun and the torchrun command
  trap _higgs_usr1 USR1
  trap _higgs_term TERM
  echo "higgs-ddp launch: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, $(date +%F\ %T)"
  "${srun_cmd[@]}" bash -c 'trap "" USR1; exec "$@"' torchrun-under-srun "$@" &
  local pid=$!
  # A trapped signal interrupts `wait` (status > 128) while the step still runs: wait again.
  while :; do
    rc=0; wait "$pid" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [ "$HIGGS_STOP" = USR1 ] && [ "$rc" -eq 0 ]; then
    echo "higgs-ddp launch: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint just saved"
    scontrol requeue "$SLURM_JOB_ID"
  elif _higgs_preempted; then
    echo "higgs-ddp launch: job $SLURM_JOB_ID was preempted (step exit $rc); requeueing it now, before" \
      "its grace time ends; it resumes from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
