"""One training across several nodes: what the train rules ask SLURM for, and where each node's
launcher finds its rank, the master's address and port.

With `training.nodes` N > 1 a train job is one SLURM job of N nodes, one task per node
(snakemake-executor-plugin-slurm: `nodes`, `tasks`, `mpi`; `tasks_per_gpu=0` keeps `tasks` from
becoming --ntasks-per-gpu). The job's script runs once, on the first node, and starts one launcher
per node with srun (training/launch.py); each launcher reads its node rank from SLURM_NODEID inside
its own srun task, never from the batch shell, and starts torchrun (CPU, gloo) or
`accelerate launch` (GPU, NCCL) for its node's processes.

The workflow folder (results/, checkpoints) must be one filesystem every node sees: only global
rank 0 writes the adapter, metrics, plots and run.json; every rank writes its RNG state into each
checkpoint; the formatted data is prepared once by format_dataset and only read by the ranks.
"""

import os
import re
import shutil
import subprocess

from workflow_scripts.errors import ConfigError

# Overrides for clusters where SLURM's own answer is not the one to use (documented in the README).
MASTER_ADDR_ENV = "SNAKETUNE_MASTER_ADDR"  # e.g. the address of a fast interface of the first node
# A port no other job of the cluster uses at the same time: derived from the job id unless
# training.master_port is set (29500 is torchrun's default; the job id spreads jobs over 10,000 ports).
PORT_BASE, PORT_SPREAD = 29500, 10000


class LaunchError(RuntimeError):
    """A multi-node launch that cannot go on; the message names what is missing."""


def sweep_nodes(experiments) -> int:
    """The node count every training of this invocation uses: a sweep's points may not differ in
    it (the train rule's SLURM request is one shape for all its jobs)."""
    counts = {e.config["training"]["nodes"] for e in experiments}
    if len(counts) > 1:
        raise ConfigError(
            f"training.nodes: the points of this sweep ask for {sorted(counts)} nodes; one sweep trains "
            "every point on the same number of nodes (run sweeps of another node count separately)"
        )
    return counts.pop()


def check_nodes(nodes: int, partition: str | None) -> None:
    """At load: training.nodes > 1 needs SLURM, and no more nodes than the partition has (where
    SLURM can say so: `sinfo` answers on a cluster's login node)."""
    if nodes <= 1 or os.environ.get("SLURM_JOB_ID"):
        return  # one node needs nothing; inside a SLURM job (the job's own load) SLURM is there
    if shutil.which("sbatch") is None:
        raise ConfigError(
            f"training.nodes: {nodes} nodes need SLURM (run with --profile profiles/slurm on a cluster); "
            "sbatch is not on this machine's PATH"
        )
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return
    cmd = [sinfo, "-h", "-o", "%P %D"] + (["-p", partition] if partition else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return  # SLURM does not answer here: sbatch will say so at submission
    if proc.returncode != 0:
        return
    sizes = {}
    for line in proc.stdout.split("\n"):
        if line.strip():
            name, count = line.split()
            default = name.endswith("*")
            name = name.rstrip("*")
            sizes[name] = sizes.get(name, 0) + int(count)
            if default and not partition:
                partition = name
    if partition in sizes and nodes > sizes[partition]:
        raise ConfigError(
            f"training.nodes: {nodes}, but SLURM partition {partition} has {sizes[partition]} node(s)"
        )


def train_resources(nodes: int, gpus: int, gpu_model: str | None) -> dict:
    """The SLURM request of a training of ``nodes`` nodes (none beyond the usual for one node):
    one task per node; GPUs per node as gres (the plugin's `gpu` is a total across the job)."""
    if nodes <= 1:
        return {}
    extra = {"nodes": nodes, "tasks": nodes, "mpi": "srun", "tasks_per_gpu": 0}
    if gpus:
        extra["gres"] = f"gpu:{gpu_model}:{gpus}" if gpu_model else f"gpu:{gpus}"
    return extra


def _scontrol(*args: str) -> str:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise LaunchError(
            f"scontrol is not on this node's PATH: cannot resolve the master node (set {MASTER_ADDR_ENV})"
        )
    proc = subprocess.run([scontrol, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def allocated_nodes(job_id: str) -> int:
    """How many nodes the SLURM job holds (the batch step's SLURM_* variables are not passed on to
    the script by Snakemake's jobstep executor, scontrol is asked)."""
    found = re.search(r"\bNumNodes=(\d+)", _scontrol("show", "job", "-o", job_id))
    if not found:
        raise LaunchError(f"scontrol show job {job_id} names no NumNodes")
    return int(found.group(1))


def node_rank() -> int:
    """This launcher's node rank: SLURM_NODEID of its own srun task (one task per node)."""
    value = os.environ.get("SLURM_NODEID")
    if value is None:
        raise LaunchError("SLURM_NODEID is not set: the node launcher runs only inside an srun task")
    return int(value)


def node_name() -> str:
    """The name SLURM gives this node (SLURMD_NODENAME), else the host name."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def master_addr() -> str:
    """The address of the step's first node: SNAKETUNE_MASTER_ADDR, else the NodeAddr SLURM has for
    the first host of the step's node list (node names need not resolve as host names)."""
    if os.environ.get(MASTER_ADDR_ENV):
        return os.environ[MASTER_ADDR_ENV]
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set: cannot find the master node")
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    found = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", first))
    return found.group(1) if found else first


def master_port(configured: int | None) -> int:
    """training.master_port, else a port derived from the SLURM job id (the same on every node)."""
    if configured:
        return configured
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        raise LaunchError("SLURM_JOB_ID is not set: set training.master_port")
    return PORT_BASE + int(job_id) % PORT_SPREAD
