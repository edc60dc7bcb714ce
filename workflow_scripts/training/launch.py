"""Multi-process training: the train stage run again in one process per GPU (or per
`training.num_processes`), each reading the same Job from a spec file, on one node or on
`training.nodes` nodes of a SLURM job.

GPUs: `accelerate launch` (DDP, or FSDP/DeepSpeed through the user's accelerate config file).
CPU: torchrun (DDP over gloo; accelerate runs several CPU processes only through MPI). The
parent has already chosen the checkpoint to resume from; only global rank 0 writes the outputs.

Several nodes (cluster.py): the job's script starts one node launcher per node with srun; each
reads its node rank, the master's address and port inside its own srun task and becomes torchrun
(or accelerate) for its node's processes, with static rendezvous on the first node.
"""

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workflow_scripts import cluster
from workflow_scripts.logs import run_logged
from workflow_scripts.stage import Job, StageError

log = logging.getLogger("snaketune.train")
WORKER = ["-m", "workflow_scripts.training.launch", "--spec"]  # what every training process runs


def num_processes(training: dict, gpus: int) -> int:
    """Training processes per node."""
    return max(training["num_processes"], gpus or 0)


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes of several nodes meet: node ``rank`` of ``nodes``, the master's address."""

    nodes: int
    rank: int
    addr: str
    port: int


def launcher_cmd(nproc: int, accelerate_config: str | None, meet: Rendezvous | None = None) -> list[str]:
    """The launcher of ``nproc`` processes on this node: accelerate on GPUs (or with the user's
    config), torchrun on CPUs; with ``meet``, this node's part of a job of several nodes."""
    nodes = meet.nodes if meet else 1
    if accelerate_config or torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc * nodes)]
        cmd += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
        if meet:
            cmd += ["--num_machines", str(nodes), "--machine_rank", str(meet.rank)]
            cmd += ["--main_process_ip", meet.addr, "--main_process_port", str(meet.port)]
        elif not accelerate_config:
            cmd += ["--num_machines", "1"]
        return cmd
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if meet:  # static rendezvous: node rank 0 hosts the store
        cmd += ["--nnodes", str(nodes), "--node_rank", str(meet.rank)]
        cmd += ["--master_addr", meet.addr, "--master_port", str(meet.port)]
    else:
        cmd += ["--standalone"]
    return cmd + ["--nproc_per_node", str(nproc)]


def write_spec(job: Job, resume: Path | None, spec_dir: Path, entry: str, **extra) -> str:
    """The spec every process reads (on the shared workflow folder: every node reads it)."""
    spec = {"entry": entry, "job": job.to_dict(), "resume": str(resume) if resume else None, **extra}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=spec_dir) as f:
        json.dump(spec, f)
    return f.name


def _run(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    try:
        run_logged(cmd, check=True)
    except subprocess.CalledProcessError as exc:
        raise StageError(f"train: {what} failed (exit {exc.returncode}); see the log above") from None


def relaunch(job: Job, nproc: int, resume: Path | None, spec_dir: Path, entry: str) -> None:
    """Run ``entry(job, resume)`` in ``nproc`` processes on this node; ``entry`` is
    ``"module:function"`` (the processes import it by name). The children's output reaches the log
    masked, like ours."""
    spec = write_spec(job, resume, spec_dir, entry)
    try:
        cmd = launcher_cmd(nproc, job.params.training["accelerate_config"])
        _run([*cmd, *WORKER, spec], f"launching {nproc} training processes")
    finally:
        Path(spec).unlink(missing_ok=True)


def relaunch_nodes(job: Job, nodes: int, nproc: int, resume: Path | None, spec_dir: Path, entry: str) -> None:
    """Run ``entry`` in ``nproc`` processes on each of ``nodes`` nodes of this SLURM job: one node
    launcher per node under srun (a node that fails ends the step: --kill-on-bad-exit)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise StageError(
            f"training.nodes: {nodes} nodes, but this job runs outside SLURM (run the workflow with "
            "--profile profiles/slurm)"
        )
    try:
        held = cluster.allocated_nodes(job_id)
    except cluster.LaunchError as exc:
        raise StageError(f"training.nodes: {exc}") from None
    if held < nodes:
        raise StageError(f"training.nodes: {nodes}, but SLURM job {job_id} holds {held} node(s)")
    spec = write_spec(job, resume, spec_dir, entry, nodes=nodes, nproc=nproc)
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
    srun += [f"--cpus-per-task={job.threads}", "--kill-on-bad-exit=1", "--label"]
    try:
        _run(
            [*srun, sys.executable, "-m", "workflow_scripts.training.launch", "--node", spec],
            f"launching {nodes} nodes x {nproc} training processes",
        )
    finally:
        Path(spec).unlink(missing_ok=True)


def node_main(spec_path: str) -> None:
    """Entry of each node's launcher (its own srun task): this node's rank, the master's address and
    port, then exec torchrun / accelerate for this node's processes."""
    spec = json.loads(Path(spec_path).read_text())
    training = spec["job"]["params"]["training"]
    try:
        meet = Rendezvous(
            spec["nodes"],
            cluster.node_rank(),
            cluster.master_addr(),
            cluster.master_port(training["master_port"]),
        )
    except cluster.LaunchError as exc:
        sys.exit(f"snaketune node launcher on {cluster.node_name()}: {exc}")
    cmd = [*launcher_cmd(spec["nproc"], training["accelerate_config"], meet), *WORKER, spec_path]
    print(f"node {cluster.node_name()}: node rank {meet.rank} of {meet.nodes}: {' '.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)  # the launcher is this task: a signal to it reaches torchrun itself


def die_with_parent() -> None:
    """A training process ends with its launcher, even on SIGKILL (Linux): a node's processes never
    outlive it, waiting on peers that are gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main() -> None:
    """Entry of each launched process: run the spec's entry on its job (or, with --node, a node's launcher)."""
    import argparse
    import importlib

    from workflow_scripts.logs import setup_logging

    parser = argparse.ArgumentParser()
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--spec", help="run the spec's entry (one training process)")
    which.add_argument("--node", help="start this node's training processes (one srun task per node)")
    args = parser.parse_args()
    if args.node:
        node_main(args.node)
        return
    die_with_parent()
    spec = json.loads(Path(args.spec).read_text())
    setup_logging(None)
    module, function = spec["entry"].split(":")
    entry = getattr(importlib.import_module(module), function)
    entry(Job(**spec["job"]), Path(spec["resume"]) if spec["resume"] else None)


if __name__ == "__main__":
    main()
