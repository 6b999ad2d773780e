#!/usr/bin/env bash
# Install and start a single-node Slurm on this machine (as root), for the Slurm integration test.
#   bash tests/slurm/start_slurm.sh          # idempotent: a running cluster is left as it is
# Debian's slurm-wlm and munge; no slurmdbd (the Snakemake plugin then tracks jobs with squeue).
# State, spool and logs live under $HSCONV_SLURM_DIR (default /tmp/hsconv-slurm).
set -euo pipefail

STATE=${HSCONV_SLURM_DIR:-/tmp/hsconv-slurm}
if [ "$(id -u)" != 0 ]; then
  echo "start_slurm.sh: must run as root (it installs packages and starts daemons)" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge authenticates every Slurm message; it needs a key and its own user.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
fi

host=$(hostname -s)
# The node offers 4 job slots per core: the test preset's jobs are mostly short (a Snakemake start-up, a table,
# a figure), so letting them overlap matters more than giving each a core of its own.
cpus=$(( $(nproc) * 4 ))
memory_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
mkdir -p "$STATE/state" "$STATE/spool" /etc/slurm
cat > "$STATE/slurm.conf.new" <<CONF
ClusterName=hsconv
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ReturnToService=2
# Accept the node's CPU count from this file rather than from the hardware (see cpus above).
SlurmdParameters=config_overrides
MpiDefault=none
# A job past its time limit gets SIGTERM, then SIGKILL after KillWait seconds.
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

if cmp -s "$STATE/slurm.conf.new" /etc/slurm/slurm.conf && scontrol ping 2>/dev/null | grep -q "is UP" \
    && sinfo -h -o %T 2>/dev/null | grep -q -E "idle|mix|alloc"; then
  echo "start_slurm.sh: Slurm is already running with this configuration"
  exit 0
fi
mv "$STATE/slurm.conf.new" /etc/slurm/slurm.conf

pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
slurmctld -c   # -c: a clean start, no jobs from an earlier run
slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -q -E "^(idle|mix|alloc)"; then
    echo "start_slurm.sh: Slurm is up on $host ($cpus CPUs, $memory_mb MB)"
    exit 0
  fi
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "start_slurm.sh: Slurm did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 1
