"""One training across several nodes (training.nodes): the load-time checks, the SLURM request of the
train rules, the world-size check on resume, and the node launcher itself, run as two torchrun
agents on this machine (static rendezvous), as two SLURM nodes would run it. A real 2-node SLURM
run: tests/slurm/run_slurm_test.sh (`make test-slurm`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, smk, train_job, write_config, write_formatted

from workflow_scripts import cluster
from workflow_scripts.errors import ConfigError
from workflow_scripts.models.loading import load_chat_formatter
from workflow_scripts.stage import StageError
from workflow_scripts.sweeps.points import expand
from workflow_scripts.training import launch
from workflow_scripts.training.checkpoints import check_world_size, fingerprint, prepare_checkpoint_dir

TRAINING = {
    "max_length": 4096,
    "learning_rate": 0.01,
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "save_steps": 2,
    "seed": 3,
}
PEFT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "less than the minimum of 1"),
        ("two", "is not of type 'integer'"),
        (1.5, "is not of type 'integer'"),
    ],
)
def test_bad_node_counts_are_refused_naming_the_key(resolved_config, value, message):
    with pytest.raises(ConfigError, match=rf"training\.nodes: .*{message}"):
        resolved_config({"training": {"nodes": value}})


def test_several_nodes_need_slurm_at_load(resolved_config, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    config = resolved_config({"training": {"nodes": 2}})
    with pytest.raises(ConfigError, match=r"training\.nodes: 2 nodes need SLURM .*profiles/slurm"):
        cluster.check_nodes(cluster.sweep_nodes(expand(config)), None)
    cluster.check_nodes(1, None)  # one node needs nothing
    assert cluster.sweep_nodes(expand(resolved_config())) == 1


@pytest.mark.e2e  # a real (not dry) Snakemake run, refused before its first job
def test_a_local_run_of_several_nodes_is_refused_before_any_job(workflow_copy):
    """Without sbatch the Snakefile refuses it at load; where SLURM is installed (make test-slurm
    leaves it so) but the run is local, before its first job (onstart): one line either way."""
    cfg = write_config(workflow_copy / "nodes.yaml", {"training": {"nodes": 2}})
    proc = smk(workflow_copy, "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "Invalid configuration: training.nodes: 2 nodes need SLURM" in proc.stdout + proc.stderr
    assert not (workflow_copy / "results").exists()


def test_a_sweep_trains_every_point_on_the_same_nodes(resolved_config):
    config = resolved_config({"sweep": {"name": "n", "grid": {"training.nodes": [1, 2]}}})
    with pytest.raises(
        ConfigError, match=r"training\.nodes: the points of this sweep ask for \[1, 2\] nodes"
    ):
        cluster.sweep_nodes(expand(config))


def test_the_slurm_request_of_a_multi_node_training():
    assert cluster.train_resources(1, 4, None) == {}
    assert cluster.train_resources(2, 0, None) == {"nodes": 2, "tasks": 2, "mpi": "srun", "tasks_per_gpu": 0}
    assert cluster.train_resources(3, 4, "a100")["gres"] == "gpu:a100:4"  # per node, not a job total
    assert cluster.train_resources(2, 8, None)["gres"] == "gpu:8"


def test_the_master_port_is_the_same_on_every_node(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234567")
    assert cluster.master_port(None) == cluster.PORT_BASE + 1234567 % cluster.PORT_SPREAD
    assert cluster.master_port(40123) == 40123
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(cluster.LaunchError, match="set training.master_port"):
        cluster.master_port(None)


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for rank in range(2):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    check_world_size(checkpoint, 2)
    with pytest.raises(StageError, match=r"checkpoint-4: written by 2 training processes, this run has 4"):
        check_world_size(checkpoint, 4)
    single = tmp_path / "checkpoint-2"
    single.mkdir()
    (single / "rng_state.pth").write_bytes(b"")
    check_world_size(single, 1)
    with pytest.raises(StageError, match="written by 1 training processes, this run has 2"):
        check_world_size(single, 2)


def test_a_multi_node_training_outside_slurm_is_one_line(
    tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch
):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    formatted = write_formatted(tmp_path, load_chat_formatter(tiny_model_dir), tiny_tokenizer)
    job = train_job(tmp_path / "run", formatted, tiny_model_dir, {**TRAINING, "nodes": 2}, PEFT)
    with pytest.raises(StageError, match=r"training\.nodes: 2 nodes, but this job runs outside SLURM"):
        launch.relaunch_nodes(job, 2, 1, None, tmp_path, "workflow_scripts.training.train:train_process")


def test_two_node_launchers_train_one_model(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Two node launchers (as srun starts one per node) on this machine: each reads its own node rank
    and becomes a torchrun agent of a 2-node static rendezvous; one world of 2 processes trains, rank
    0 writes the outputs, every rank its RNG state into each checkpoint."""
    formatted = write_formatted(tmp_path, load_chat_formatter(tiny_model_dir), tiny_tokenizer)
    job = train_job(tmp_path / "run", formatted, tiny_model_dir, {**TRAINING, "nodes": 2}, PEFT)
    checkpoints = Path(job.params.checkpoint_dir)
    training, peft = job.params.training, job.params.peft
    data = [job.input.train, job.input.validation, str(Path(job.input.model_dir) / "config.json")]
    assert prepare_checkpoint_dir(checkpoints, fingerprint(training, peft, data)) is None
    spec = launch.write_spec(
        job, None, checkpoints, "workflow_scripts.training.train:train_process", nodes=2, nproc=1
    )
    env = {
        **os.environ,
        "SLURM_JOB_ID": "4242",
        cluster.MASTER_ADDR_ENV: "127.0.0.1",
        "PYTHONPATH": str(REPO),
    }
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]  # files: a full pipe would stall a node
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "workflow_scripts.training.launch", "--node", spec],
            env={**env, "SLURM_NODEID": str(rank), "SLURMD_NODENAME": f"n{rank + 1}"},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank, log in enumerate(logs)
    ]
    for agent in agents:
        agent.wait(timeout=300)
    outputs = [log.read_text() for log in logs]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for rank, out in enumerate(outputs):
        assert f"node n{rank + 1}: node rank {rank} of 2: " in out and "--nnodes 2" in out
    run = json.loads(Path(job.output.run_info).read_text())
    assert (run["world_size"], run["nodes"], run["processes_per_node"]) == (2, ["n1", "n2"], 1)
    assert run["global_step"] == 4 and Path(job.output.adapter_dir, "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (checkpoints / "checkpoint-4").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    losses = pd.read_csv(job.output.metrics)["loss"].dropna()
    assert len(losses) == 4 and losses.iloc[-1] < losses.iloc[0]
