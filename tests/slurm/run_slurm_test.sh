#!/usr/bin/env bash
# Prove the SLURM profile on a real SLURM: start a 2-node cluster on this machine (Debian slurm-wlm +
# munge; needs root; tests/slurm/start_cluster.sh), run the workflow through profiles/slurm down to the
# merged model on a tiny config, and check every job went through sbatch; then one training across the
# two nodes (training.nodes: 2): both nodes ran a rank, its loss curve equals a 1-node 2-process run of
# the same global batch, and a SIGKILL of one node's launcher mid-run followed by a re-run resumes.
# Used by `make test-slurm`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python}"
[ "$(id -u)" = 0 ] || { echo "make test-slurm needs root (it starts slurmctld/slurmd/munged)"; exit 2; }

# a 2-node cluster on this machine (it stays up afterwards: the same script starts it by hand)
bash "$REPO/tests/slurm/start_cluster.sh" 2

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
echo "single-node SLURM part passed: $n jobs went through sbatch and completed"

# --- one training across two nodes ------------------------------------------------------------
SMK=("$PY" -m snakemake --profile profiles/slurm --slurm-no-account --slurm-status-command squeue)
common="max_steps: 6, logging_steps: 1, eval_steps: 2, save_steps: 2, per_device_train_batch_size: 2, learning_rate: 0.01"
cat > nodes2.yaml <<YAML
experiment: nodes2
training: {nodes: 2, num_processes: 1, $common}
YAML
cat > procs2.yaml <<YAML
experiment: procs2
training: {nodes: 1, num_processes: 2, $common}
YAML
"${SMK[@]}" --until train --configfile tiny.yaml nodes2.yaml 2>&1 | tee slurm_nodes2.log
"${SMK[@]}" --until train --configfile tiny.yaml procs2.yaml 2>&1 | tee slurm_procs2.log
"$PY" - <<'PYEOF'
import csv, json, math
two_nodes = json.load(open("results/nodes2/training/run.json"))
one_node = json.load(open("results/procs2/training/run.json"))
assert two_nodes["world_size"] == 2 and two_nodes["nodes"] == ["n1", "n2"], two_nodes
assert two_nodes["processes_per_node"] == 1 and one_node["world_size"] == 2 and len(one_node["nodes"]) == 1, one_node
def losses(name):
    rows = csv.DictReader(open(f"results/{name}/training/metrics.csv"))
    return {int(r["step"]): (r["loss"], r["eval_loss"]) for r in rows}
a, b = losses("nodes2"), losses("procs2")
assert sorted(a) == sorted(b) == list(range(1, 7)), (a, b)  # a loss at every step, evaluations at 2, 4, 6
for step in a:
    for x, y in zip(a[step], b[step]):
        assert (x == y == "") or math.isclose(float(x), float(y), rel_tol=1e-4, abs_tol=1e-5), (step, a[step], b[step])
print(f"2 nodes x 1 process == 1 node x 2 processes: losses at steps {sorted(a)} agree; nodes {two_nodes['nodes']}")
PYEOF

# more nodes than the partition has: refused at load, naming the key
if "${SMK[@]}" -n --configfile tiny.yaml --config 'training={nodes: 3}' > slurm_nodes3.log 2>&1; then
  echo "training.nodes: 3 on a 2-node partition was accepted"; exit 1
fi
grep -q "Invalid configuration: training.nodes: 3, but SLURM partition debug has 2 node(s)" slurm_nodes3.log \
  || { tail -20 slurm_nodes3.log; exit 1; }

# SIGKILL node n2's launcher mid-run: the job fails; a re-run resumes from the last whole checkpoint
cat > kill.yaml <<YAML
experiment: nodes2-kill
training: {nodes: 2, num_processes: 1, max_steps: 16, eval_steps: 4, save_steps: 2, per_device_train_batch_size: 2}
YAML
"${SMK[@]}" --retries 0 --until train --configfile tiny.yaml kill.yaml > slurm_kill.log 2>&1 &
pid=$!
for _ in $(seq 600); do
  ls results/nodes2-kill/checkpoints/checkpoint-4/trainer_state.json >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.5
done
test -f results/nodes2-kill/checkpoints/checkpoint-4/trainer_state.json || { cat slurm_kill.log; echo "no checkpoint-4"; exit 1; }
pkill -9 -f "torch.distributed.run --nnodes 2 --node_rank 1" || { echo "no launcher of node rank 1 to kill"; exit 1; }
if wait $pid; then echo "the killed run did not fail"; exit 1; fi
grep -q "resuming from" results/nodes2-kill/logs/train.log && { echo "the first run resumed?"; exit 1; }
"${SMK[@]}" --until train --configfile tiny.yaml kill.yaml 2>&1 | tee slurm_resume.log
"$PY" - <<'PYEOF'
import json
log = open("results/nodes2-kill/logs/train.log").read()
run = json.load(open("results/nodes2-kill/training/run.json"))
assert "resuming from checkpoint-" in log, log[-3000:]
assert run["global_step"] == 16 and run["resumed_from"] and run["nodes"] == ["n1", "n2"], run
print(f"killed on n2 mid-run, re-run resumed from {run['resumed_from']} to step {run['global_step']}")
PYEOF
echo "SLURM test passed: single-node jobs, 2-node training, resume after a node's launcher was killed; run in $WORK"
