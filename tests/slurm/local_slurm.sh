#!/bin/bash
# A Slurm cluster on this machine (Debian 12, slurm-wlm 22.05) for the project's Slurm tests; no systemd.
# Usage: local_slurm.sh start|stop|status [STATE_DIR] [NODES]
#        (default STATE_DIR=/tmp/higgs-ddp-slurm, NODES=1)
# Everything (conf, munge socket, state, logs, pid files) lives under STATE_DIR, so it never touches
# /etc/slurm or a system munged. Callers must `export SLURM_CONF=STATE_DIR/slurm.conf` (start prints it).
#
# NODES=1: one node, this machine under its own hostname, on 127.0.0.1.
# NODES>1: that many nodes, higgs-node1..N, each a slurmd of its own in its own UTS and mount namespace:
# its own hostname, an /etc/hosts (bind-mounted over the real one, in that namespace only) that
# resolves every node name, its own loopback address 127.0.1.i and its own slurmd port. Jobs inherit
# their slurmd's namespaces, so a job step on higgs-node2 sees `hostname` = higgs-node2 and reaches
# higgs-node1 by name, as on a cluster; the filesystem is this machine's (a shared filesystem, as a
# cluster's output_dir must be). The real /etc/hosts and hostname are never changed.
set -euo pipefail
CMD=${1:-}; D=${2:-/tmp/higgs-ddp-slurm}; NODES=${3:-1}
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "local_slurm.sh: error: NODES must be 1-99, not '$NODES'" >&2; exit 2; }
export SLURM_CONF=$D/slurm.conf
die() { echo "local_slurm.sh: error: $*" >&2; exit 1; }
# a pid-file's process is alive and not a zombie (our PID 1 may reap exited daemons late)
running() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1")" != Z* ]]; }
alive() { [ -s "$1" ] && running "$(cat "$1")"; }
answers() { [ -f "$SLURM_CONF" ] && alive "$D/slurmctld.pid" && timeout 10 sinfo -h >/dev/null 2>&1; }
any_slurmd() { local f; for f in "$D"/slurmd*.pid; do alive "$f" && return 0; done; return 1; }
# a TCP port some socket on this machine uses (local or remote end; conservative)
port_used() { grep -qi -- "$(printf ':%04X ' "$1")" /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
# "idle" once every node is idle (sinfo prints a line per state)
node_state() { timeout 10 sinfo -h -o %T 2>/dev/null | sort -u | paste -sd, || true; }

start() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd and munged need it)"
  if answers; then   # idempotent: already up (maybe running jobs), nothing to do
    echo "slurm already running in $D"; echo "export SLURM_CONF=$SLURM_CONF"; return 0
  fi
  alive "$D/slurmctld.pid" || any_slurmd && stop >/dev/null   # half-up: restart cleanly
  local t0=$SECONDS
  mkdir -p "$D"
  # Only the four packages needed (slurm-wlm pulls in much more); quiet and non-interactive.
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || \
     ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >"$D/apt.log" 2>&1 \
      || die "apt-get install of slurmctld slurmd slurm-client munge failed (see $D/apt.log)"
  fi
  # munged: our own instance with its own socket (AuthInfo=socket= below), run as the munge user
  # (owner of /etc/munge/munge.key, which the package creates; created here only if missing).
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key \
      && chmod 400 /etc/munge/munge.key || die "cannot create /etc/munge/munge.key"
  fi
  mkdir -p "$D/munge" "$D/spool/ctld" "$D/spool/d" && chown munge:munge "$D/munge" && chmod 755 "$D" "$D/munge"
  if ! alive "$D/munge/munged.pid"; then
    rm -f "$D/munge/sock" "$D/munge/sock.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$D/munge/sock" --pid-file="$D/munge/munged.pid" \
      --log-file="$D/munge/munged.log" --seed-file="$D/munge/seed" || die "munged failed to start"
  fi
  for _ in $(seq 50); do munge -S "$D/munge/sock" -n 2>/dev/null | unmunge -S "$D/munge/sock" \
    >/dev/null 2>&1 && break; sleep 0.1; done
  munge -S "$D/munge/sock" -n | unmunge -S "$D/munge/sock" >/dev/null 2>&1 \
    || die "munge does not work (see $D/munge/munged.log)"
  # CPU layout exactly as slurmd detects it, else slurmd registers with a mismatch and the node drains.
  # With NODES>1 every node claims this machine's CPUs (they share them) and a share of its memory.
  local hw node mem nodelist nodes_conf i
  hw=$(slurmd -C | head -1); node=$(hostname -s)
  mem=$(( $(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw") * 85 / 100 / NODES ))
  hw=$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw")
  # The first free port pair from 6817 (Slurm's default): a second cluster on this machine (another
  # STATE_DIR) would otherwise fail to bind, and our sinfo/sbatch would talk to the other's slurmctld.
  local port=6817
  # (NODES>1: slurmctld on port, node i's slurmd on port+i.)
  ports_used() { local p; for p in $(seq "$1" $(($1 + NODES))); do port_used "$p" && return 0; done; return 1; }
  while ports_used $port; do
    port=$((port + NODES + 1)); [ $port -lt 6917 ] || die "no free ports for slurmctld/slurmd in 6817-6916"
  done
  if [ "$NODES" = 1 ]; then
    nodelist=$node
    nodes_conf="NodeName=$node NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN"
  else
    nodelist=higgs-node[1-$NODES]; nodes_conf=""
    cp /etc/hosts "$D/hosts"
    for i in $(seq "$NODES"); do
      echo "127.0.1.$i higgs-node$i" >>"$D/hosts"
      nodes_conf+="NodeName=higgs-node$i NodeAddr=127.0.1.$i NodeHostname=higgs-node$i Port=$((port + i)) $hw"
      nodes_conf+=" RealMemory=$mem State=UNKNOWN"$'\n'
    done
  fi
  # NodeAddr/SlurmctldHost on 127.0.0.1 so the hostname need not resolve (no /etc/hosts edit).
  # cred_expire=10: a requeued job otherwise waits ~120 s; fast sched/bf intervals: else 30-60 s.
  # MinJobAge=600: `scontrol show job` keeps finished jobs (there is no accounting/sacct).
  # linuxproc + task/none: the sandbox has no cgroups.
  cat >"$SLURM_CONF" <<EOF
ClusterName=higgsddp
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/sock,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd$([ "$NODES" = 1 ] || echo -%n).pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd$([ "$NODES" = 1 ] || echo -%n).log
$nodes_conf
# Partitions: debug (default, never preempted); low and high for a real preemption: a job in high
# (higher PriorityTier) preempts a low one, which gets SIGTERM, GraceTime s to save, and is requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF
PartitionName=low Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  slurmctld -i -f "$SLURM_CONF" || die "slurmctld failed to start (see $D/slurmctld.log)"  # -i: no old state
  if [ "$NODES" = 1 ]; then
    slurmd -f "$SLURM_CONF" || die "slurmd failed to start (see $D/slurmd.log)"
  else
    for i in $(seq "$NODES"); do   # -N: the node this slurmd is; it daemonizes inside its namespaces
      unshare --uts --mount --propagation private -- bash -c 'mount --bind "$1" /etc/hosts && hostname "$2" &&
        exec slurmd -N "$2" -f "$3"' slurmd-node "$D/hosts" "higgs-node$i" "$SLURM_CONF" \
        || die "slurmd for higgs-node$i failed to start (see $D/slurmd-higgs-node$i.log)"
    done
  fi
  for _ in $(seq 60); do [ "$(node_state)" = idle ] && break; sleep 0.5; done
  [ "$(node_state)" = idle ] || die "nodes not idle after 30 s (state '$(node_state)'; see $D/*.log)"
  echo "slurm up in $((SECONDS - t0)) s ($NODES node(s) $nodelist, each $hw)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  if answers; then   # cancel jobs first so no slurmstepd or job process outlives the cluster
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      scancel --full $(squeue -h -o %i) 2>/dev/null || true
      for _ in $(seq 90); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  local g f p ps
  local slurmds; slurmds=$(cd "$D" 2>/dev/null && ls slurmd*.pid 2>/dev/null | sed 's/\.pid$//' | paste -sd' ' || true)
  for g in "$slurmds slurmctld" munge/munged; do   # only the pids we recorded, never by name; munge last
    ps=""; for f in $g; do alive "$D/$f.pid" && ps="$ps $(cat "$D/$f.pid")"; done
    [ -n "$ps" ] || continue; kill -TERM $ps 2>/dev/null || true
    for p in $ps; do
      for _ in $(seq 100); do running "$p" || break; sleep 0.1; done
      running "$p" && kill -KILL "$p" 2>/dev/null || true
    done
  done
  [[ "$D" == /tmp/* ]] && rm -rf "$D"   # state is disposable; refuse to rm outside /tmp
  echo "slurm stopped"
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "slurm up: $(sinfo -h -o '%N %T' | paste -sd' ')"; else echo "slurm not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status [STATE_DIR] [NODES]" >&2; exit 2 ;;
esac
