#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the tests (and for trying the templates by hand).
#
#   tests/slurm/cluster.sh start     # writes a slurm.conf, starts munged, slurmctld, slurmd; waits for an idle node
#   tests/slurm/cluster.sh stop      # stops them by PID
#   tests/slurm/cluster.sh env       # prints `export SLURM_CONF=...` for your shell
#
# Needs root and Debian's packages: apt-get install -y slurmctld slurmd slurm-client munge
# (.ci/run installs them). Everything lives under $QLORA_SFT_SLURM_DIR (default /tmp/qlora-sft-slurm);
# no system configuration is touched: the tools find the cluster through SLURM_CONF.
set -euo pipefail
DIR="${QLORA_SFT_SLURM_DIR:-/tmp/qlora-sft-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
# (nproc honours OMP_NUM_THREADS: a test run with OMP_NUM_THREADS=1 made a one-CPU node two-rank jobs never fit)
CPUS="${QLORA_SFT_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"

die() { echo "tests/slurm/cluster.sh: $*" >&2; exit 1; }

start() {
  for bin in munged slurmctld slurmd sinfo sbatch; do
    command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurmctld slurmd slurm-client munge"
  done
  [ "$(id -u)" = 0 ] || die "must run as root (the test cluster runs its daemons as root)"
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR"/{ctld,d,munge} /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chmod 400 /etc/munge/munge.key
  munged --force --pid-file="$DIR/munge/munged.pid" --socket=/run/munge/munge.socket.2 \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
  cat > "$CONF" <<CONF
ClusterName=qlorasft
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=60
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  export SLURM_CONF="$CONF"
  slurmctld -c -f "$CONF"  # -c: start with no jobs (a failed test run may leave some in the saved state)
  slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    state="$(sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true)"
    if [ "$state" = "idle" ]; then
      echo "SLURM is up: node $HOST idle ($CPUS CPUs); export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  die "the node did not become idle within 60 s (state: ${state:-none})"
}

stop() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    if [ -s "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      rm -f "$pidfile"
    fi
  done
  echo "SLURM stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 start|stop|env" ;;
esac
