#!/usr/bin/env bash
# A real single-node SLURM (slurmctld + slurmd + munged, no accounting database) on 127.0.0.1, for tests of the
# SLURM profile. Debian bookworm: apt-get install -y slurm-wlm munge. Needs root.
#   SLURM_CI_DIR=/tmp/x bash tests/cluster/slurm_ci.sh start   # idempotent; waits until the node is idle
#   SLURM_CI_DIR=/tmp/x bash tests/cluster/slurm_ci.sh stop    # stops the daemons by PID file only
# SLURM_CI_DIR (required): config, state, logs and PID files. SLURM_CI_CPUS (default 2): CPUs the node advertises.
# Without slurmdbd there is no sacct: run Snakemake with --slurm-status-command squeue (MinJobAge below keeps
# finished jobs visible to squeue). batch_sched_delay=0: a batch job starts about 1 s after sbatch, not up to 3 s
# (SLURM's default delay for high-throughput sites).
set -euo pipefail
D=${SLURM_CI_DIR:?set SLURM_CI_DIR to a folder for the test cluster state, e.g. SLURM_CI_DIR=\$(mktemp -d)}
CPUS=${SLURM_CI_CPUS:-2}
N=$(hostname -s)
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 3 / 4 ))

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() {
  if alive "$1"; then
    local p; p=$(cat "$1"); kill "$p"
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
}

check() {
  [ "$(id -u)" = 0 ] || { echo "slurm_ci.sh: needs root (the daemons run as root)" >&2; exit 2; }
  for b in slurmctld slurmd munged mungekey sinfo; do
    command -v "$b" >/dev/null || { echo "slurm_ci.sh: $b not found: apt-get install -y slurm-wlm munge" >&2; exit 2; }
  done
}

write_conf() {
  mkdir -p "$D"/{etc,state,spool,log,run,munge}
  : > "$D/etc/gres.conf"
  cat > "$D/etc/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$N(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=1000
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
NodeName=$N NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$N Default=YES MaxTime=INFINITE State=UP
CONF
  # The jobstep plugin drops SLURM_CONF before its inner srun: the config must be at the default /etc/slurm/.
  mkdir -p /etc/slurm
  for f in slurm.conf gres.conf; do
    if [ -e "/etc/slurm/$f" ] && [ ! -L "/etc/slurm/$f" ]; then
      echo "slurm_ci.sh: /etc/slurm/$f is a real file (a SLURM of this machine?); not replacing it" >&2; exit 2
    fi
    ln -sfn "$D/etc/$f" "/etc/slurm/$f"
  done
}

start() {
  check
  for d in slurmctld:6817 slurmd:6818; do  # another SLURM on this machine would answer in our place
    if ! alive "$D/run/${d%%:*}.pid" && (exec 3<>"/dev/tcp/127.0.0.1/${d##*:}") 2>/dev/null; then
      echo "slurm_ci.sh: port ${d##*:} (${d%%:*}) is taken by another process: stop that SLURM first" >&2; exit 2
    fi
  done
  write_conf
  chown munge:munge "$D/munge"; chmod 755 "$D/munge"
  runuser -u munge -- test -w "$D/munge" || {
    echo "slurm_ci.sh: user munge cannot reach $D/munge: SLURM_CI_DIR and its parents must be searchable (chmod o+x)" >&2
    exit 2; }
  [ -s "$D/munge/munge.key" ] || { mungekey -c -k "$D/munge/munge.key"; chown munge:munge "$D/munge/munge.key"; }
  alive "$D/munge/munged.pid" || runuser -u munge -- munged --socket="$D/munge/munge.socket" \
      --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
      --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"
  for _ in $(seq 50); do munge -n -S "$D/munge/munge.socket" >/dev/null 2>&1 && break; sleep 0.1; done
  alive "$D/run/slurmctld.pid" || slurmctld -f "$D/etc/slurm.conf"
  alive "$D/run/slurmd.pid"    || slurmd -f "$D/etc/slurm.conf"
  local st=""
  for i in $(seq 120); do
    if [ "$i" -gt 10 ] && { ! alive "$D/run/slurmctld.pid" || ! alive "$D/run/slurmd.pid"; }; then
      sleep 1  # a daemon that just exited may still be writing its log
      echo "slurm_ci.sh: a SLURM daemon exited; daemon logs:" >&2; tail -n 20 "$D"/log/*.log >&2; return 1
    fi
    st=$(timeout 5 sinfo -h -N -o %t 2>/dev/null || true)
    case "$st" in
      idle) echo "slurm up: node $N idle, $CPUS CPUs, after $i poll(s)"; return 0;;
      drain*|inval*|down*) scontrol update nodename="$N" state=resume 2>/dev/null || true;;
    esac
    sleep 0.5
  done
  echo "slurm_ci.sh: the node is not idle (state '$st'); daemon logs:" >&2
  tail -n 20 "$D"/log/*.log >&2
  return 1
}

stop() {  # by PID file only, never by process name
  stop_pid "$D/run/slurmd.pid"; stop_pid "$D/run/slurmctld.pid"; stop_pid "$D/munge/munged.pid"
  for f in slurm.conf gres.conf; do  # our links only
    if [ "$(readlink "/etc/slurm/$f" 2>/dev/null)" = "$D/etc/$f" ]; then rm -f "/etc/slurm/$f"; fi
  done
}

case "${1:-}" in
  start|stop) "$1";;
  *) echo "usage: SLURM_CI_DIR=<dir> $0 start|stop" >&2; exit 2;;
esac
