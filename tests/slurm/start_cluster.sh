#!/usr/bin/env bash
# Start a local SLURM cluster of NODES compute nodes on this machine and leave it running:
#   bash tests/slurm/start_cluster.sh [NODES]      (default 1; needs root)
# One slurmctld and NODES slurmd daemons (Debian's slurm-wlm runs several on one host: `slurmd -N n1`,
# each node its own port, NodeAddr=127.0.0.1, `%n` in its spool/log/pid paths; the Slurm FAQ "Can Slurm
# emulate a larger cluster?"). Each node offers all CPUs and most of the memory of the machine, so a
# job sees what a real node would give it. Nodes are n1..nNODES in partition `debug`. Installs
# slurm-wlm and munge where they are missing. Re-running it restarts the cluster with a clean state.
# Stop it with: pkill -x slurmd; pkill -x slurmctld
set -euo pipefail
NODES="${1:-1}"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [NODES >= 1]"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0 needs root (it starts slurmctld/slurmd/munged)"; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
CONF_DIR=/etc/slurm
SPOOL=/var/spool/slurmd
mkdir -p "$CONF_DIR" /var/spool/slurmctld "$SPOOL" /var/log/slurm /run/munge /run/slurm
{
  cat <<CONF
ClusterName=snaketune-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MinJobAge=3600
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.%n.log
SlurmdPidFile=/run/slurm/slurmd.%n.pid
CONF
  for i in $(seq "$NODES"); do
    echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
} > "$CONF_DIR/slurm.conf"

# munge: a key, then the daemon; the slurm daemons restarted with a clean state
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" || munged --force
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
for _ in $(seq 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.5; done
slurmctld -c
for i in $(seq "$NODES"); do
  mkdir -p "$SPOOL/n$i"
  slurmd -N "n$i"
done
for _ in $(seq 60); do
  idle=$(sinfo -h -N -o "%N %T" 2>/dev/null | grep -cE " (idle|mixed)$" || true)
  [ "$idle" -ge "$NODES" ] && break
  sleep 1
done
sinfo -N
[ "$(sinfo -h -N -o "%N %T" | grep -cE " (idle|mixed)$")" -ge "$NODES" ] || {
  echo "start_cluster: not all $NODES nodes came up idle; see /var/log/slurm/"; exit 1; }
echo "SLURM cluster up: $NODES node(s) n1..n$NODES in partition debug"
