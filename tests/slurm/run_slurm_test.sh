#!/usr/bin/env bash
# Prove the SLURM profile on a real SLURM: start a single-node cluster on this machine (Debian
# slurm-wlm + munge; needs root), run the workflow through profiles/slurm down to the merged
# model on a tiny config, and check every job went through sbatch. Used by `make test-slurm`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python}"
[ "$(id -u)" = 0 ] || { echo "make test-slurm needs root (it starts slurmctld/slurmd/munged)"; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
CONF_DIR=/etc/slurm
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > "$CONF_DIR/slurm.conf" <<CONF
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
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

# munge: a key, then the daemon; slurm daemons (restarted if already running)
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" || munged --force
pkill -x slurmctld 2>/dev/null || true; pkill -x slurmd 2>/dev/null || true; sleep 1
slurmctld -c   # clean state
slurmd
for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix" && break; sleep 1; done
sinfo

WORK="$(mktemp -d /tmp/snaketune-slurm.XXXX)"
cp -r "$REPO/Snakefile" "$REPO/config.yaml" "$REPO/rules" "$REPO/schemas" "$REPO/envs" "$REPO/profiles" "$WORK/"
ln -s "$REPO/workflow_scripts" "$WORK/workflow_scripts"
ln -s "$REPO/data" "$WORK/data"
cd "$WORK"
"$PY" - <<PYEOF
import sys; sys.path.insert(0, "$REPO/tests")
from pathlib import Path
from helpers import save_tiny_model
p = Path("tiny_model"); p.mkdir(); save_tiny_model(p.resolve())
PYEOF
cat > tiny.yaml <<YAML
experiment: slurm
model: {id: "$WORK/tiny_model", name: tiny}
dataset: {max_rows: 40}
training: {max_steps: 4, eval_steps: 2, save_steps: 2, per_device_train_batch_size: 2}
wandb: {mode: disabled}
YAML
cat > sweep.yaml <<YAML
sweep: {name: slurm-sweep, grid: {training.learning_rate: [0.001, 0.01]}}
YAML
# no accounting database here: no account, and job status from squeue (sacct would hang)
"$PY" -m snakemake --until merge --profile profiles/slurm --configfile tiny.yaml \
  --slurm-no-account --slurm-status-command squeue 2>&1 | tee slurm_run.log
# a 2-point sweep on the same data: its two trainings are separate sbatch jobs
"$PY" -m snakemake --until merge --profile profiles/slurm --configfile tiny.yaml sweep.yaml \
  --slurm-no-account --slurm-status-command squeue 2>&1 | tee slurm_sweep.log
"$PY" - <<'PYEOF'
import re
log = open("slurm_sweep.log").read()
train_jobs = re.findall(r"^rule train:\n(?:\s+\w+:.*\n)*?\s+jobid: (\d+)", log, flags=re.M)
submitted = set(re.findall(r"Job (\d+) has been submitted with SLURM jobid", log))
assert len(train_jobs) == 2, f"expected 2 sweep trainings, planned {train_jobs}"
assert set(train_jobs) <= submitted, f"train jobs {train_jobs} not all submitted via sbatch ({submitted})"
print(f"sweep: both trainings ({train_jobs}) were submitted through sbatch")
PYEOF
ls results/sweeps/slurm-sweep/*/deployment_model/merge_report.json

test -f results/slurm/deployment_model/merge_report.json
"$PY" -c "import json; r=json.load(open('results/slurm/deployment_model/merge_report.json')); assert r['max_logit_diff'] <= 1e-3, r"
# Snakemake's SLURM executor logs "Job N has been submitted with SLURM jobid M" per sbatch call
ids=$(cat slurm_run.log slurm_sweep.log | grep -oE "submitted with SLURM jobid [0-9]+" | grep -oE "[0-9]+$" | sort -un)
n=$(echo "$ids" | grep -c . || true)
echo "jobs submitted through sbatch: $n ($(echo $ids | tr '\n' ' '))"
[ "$n" -ge 10 ] || { echo "expected >= 10 sbatch jobs (download, preprocess, prepare, format, train, merge, and the sweep's 2 train + 2 merge)"; exit 1; }
for id in $ids; do
  scontrol show job "$id" | grep -E "JobState=COMPLETED" >/dev/null || { echo "job $id not COMPLETED:"; scontrol show job "$id"; exit 1; }
done
echo "SLURM test passed: $n jobs went through sbatch and completed; run in $WORK"
