#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian's slurmctld + slurmd + munge), for CI
# and for running the SLURM tests by hand. Needs root (slurmd runs jobs as their user).
#
#   bash tools/slurm_local.sh start [DIR]   # install if missing, configure, start; prints the
#                                            # environment to use it: eval "$(... start)"
#   bash tools/slurm_local.sh env [DIR]     # the environment again (export SLURM_CONF=...)
#   bash tools/slurm_local.sh status [DIR]  # exit 0 when the controller answers and the node is up
#   bash tools/slurm_local.sh stop [DIR]    # cancel its jobs, stop the daemons
#
# DIR (default $MCL_DET_SLURM_DIR, else $TMPDIR/mcl_det_slurm) holds everything: slurm.conf, the
# munge key and socket, controller state, slurmd spool, logs, pid files. Nothing under /etc is
# read or written, so the system's own munge/SLURM (if any) are untouched. `start` on a running
# cluster says so and changes nothing. stdout carries only the export lines; messages go to stderr.
#
# Why it is configured as it is (slurm.conf below):
# - proctrack/linuxproc + task/none: no cgroups (containers often have no writable cgroupfs);
#   signals still reach every process of a job step (linuxproc follows the process tree), which
#   is what a clean stop of tools/submit.py's StageJob and its training child relies on.
# - select/cons_tres with CR_Core: the node's real cores (slurmd -C) are what jobs share; memory
#   is checked against RealMemory but not consumed, so jobs without --mem don't block each other.
# - One partition, MaxTime=INFINITE: tools/submit.py asks for --time 1440 by default.
# - JobRequeue=1 (scontrol requeue, and the requeue submitit does itself on its signal).
# - Accounting: accounting_storage/none. submitit polls job states with `sacct`, which needs
#   slurmdbd + a MariaDB server (tens of MB to install, seconds more to start); SLURM 22.05 has no
#   file-based accounting that sacct reads. Without it submitit logs "Bypassing sacct error ...,
#   status may be inaccurate" and learns that a job ended from its result pickle only, which every
#   job that ends normally or raises writes. Only a job killed from outside without one (scancel)
#   would leave job.result() waiting, so the tests wait with a deadline and ask squeue/scontrol.
#   jobcomp/filetxt keeps a one-line record of each finished job in DIR/log/jobcomp.txt.
# - Preemption: partition "preempt" (PriorityTier 2) preempts jobs of partition "main" with
#   PreemptMode=REQUEUE; SlurmctldParameters=preempt_send_user_signal makes SLURM send the job's --signal
#   (USR2, from submitit's sbatch script) at preemption time, so submitit's handler checkpoints
#   and requeues; GraceTime gives it time to do so before SIGTERM/SIGKILL.
# - Requeue latency: a requeued job may start again cred_expire seconds later (AuthInfo, default
#   120) and is picked up by the next scheduling pass (sched_interval, default 60 s); 10 s and 2 s
#   here bring a requeue-and-resume down from ~3 minutes to ~15 s. The credential only has to
#   live from step creation to its launch on this same machine.
set -euo pipefail

cmd=${1:-start}
DIR=${2:-${MCL_DET_SLURM_DIR:-${TMPDIR:-/tmp}/mcl_det_slurm}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
WAIT_S=${MCL_DET_SLURM_WAIT_S:-60}
export SLURM_CONF=$CONF

say() { echo "[slurm_local] $*" >&2; }
die() { echo "error: $*" >&2; exit 2; }
print_env() { echo "export SLURM_CONF=$CONF"; }

# The node's state as sinfo reports it ("idle", "mixed", "down*", ...), empty if no controller.
node_state() {
  [ -f "$CONF" ] || return 0
  timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1 || true
}

is_up() {
  pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" || return 1
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

# A live process (not a zombie) whose pid is in file $1.
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    ! grep -q '^[^)]*) Z' "/proc/$pid/stat" 2>/dev/null
}

install_packages() {
  local missing=0 b
  for b in slurmctld slurmd sinfo sbatch srun scontrol munged; do
    command -v "$b" >/dev/null || missing=1
  done
  [ "$missing" = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "SLURM is not installed and this is not root: run as root, or" \
    "apt-get install slurmctld slurmd slurm-client munge"
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  local pkgs="slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  if ! apt-get install -y -q --no-install-recommends $pkgs >"$DIR/apt.log" 2>&1; then
    apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends $pkgs >>"$DIR/apt.log" 2>&1 ||
      die "apt-get install $pkgs failed; see $DIR/apt.log"
  fi
}

write_conf() {
  # The node as slurmd sees it: NodeName=... CPUs=... Boards=... RealMemory=...
  local hw
  hw=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*//")
  [ -n "$hw" ] || die "slurmd -C did not describe this machine"
  mkdir -p "$DIR"/{state,spool,log,run}
  cat >"$CONF.tmp" <<EOF
# Written by tools/slurm_local.sh: a single-node cluster for tests (see the comments there).
ClusterName=mcl_det_local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${MCL_DET_SLURMCTLD_PORT:-6817}
SlurmdPort=${MCL_DET_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=preempt Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  local m=$DIR/munge
  mkdir -p "$m"
  chmod 711 "$m"  # munged: clients need execute on the socket folder
  if [ ! -s "$m/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom >"$m/munge.key")
  fi
  pid_alive "$m/munged.pid" && return 0
  munged --force --socket="$m/munge.socket" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$m/munged.seed" ||
    die "munged did not start; see $DIR/log/munged.log"
}

start() {
  if is_up; then
    say "already up (node $NODE: $(node_state)); $CONF"
    print_env
    return 0
  fi
  install_packages
  [ "$(id -u)" = 0 ] || die "slurmd must run as root (it starts jobs as their user)"
  local t0=$SECONDS
  write_conf
  start_munge
  pid_alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" ||
    die "slurmctld did not start; see $DIR/log/slurmctld.log"
  pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" ||
    die "slurmd did not start; see $DIR/log/slurmd.log"
  local state=""
  while [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated | completing)
        say "up in $((SECONDS - t0)) s: node $NODE $state, partitions main (default), preempt"
        print_env
        return 0
        ;;
      down* | drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  die "node $NODE not idle after $WAIT_S s (sinfo says '${state:-no controller}'); see" \
    "$DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

wait_gone() {  # pid file, seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    pid_alive "$1" || return 0
    sleep 0.1
  done
  return 1
}

stop() {
  if [ -f "$CONF" ] && timeout 10 scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$jobs" ] || timeout 10 scancel $jobs 2>/dev/null || true
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and slurmd
  fi
  local f
  for f in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
    [ "$f" != "$DIR/munge/munged.pid" ] || ! pid_alive "$f" || kill "$(cat "$f")" 2>/dev/null || true
    if ! wait_gone "$f" 15; then
      say "$(basename "$f" .pid) (pid $(cat "$f")) still running after 15 s: SIGKILL"
      kill -9 "$(cat "$f")" 2>/dev/null || true
    fi
  done
  say "stopped ($DIR)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  status)
    if is_up; then
      say "up: node $NODE $(node_state); $CONF"
    else
      say "not running ($CONF)"
      exit 1
    fi
    ;;
  *) die "unknown command '$cmd' (use: start, stop, status, env)" ;;
esac
