"""Multi-process training: the train stage run again in one process per GPU (or per
`training.num_processes`), each reading the same Job from a spec file.

GPUs: `accelerate launch` (DDP, or FSDP/DeepSpeed through the user's accelerate config file).
CPU: torchrun (DDP over gloo; accelerate runs several CPU processes only through MPI). The
parent has already chosen the checkpoint to resume from; only rank 0 writes the outputs.
"""

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from workflow_scripts.logs import run_logged
from workflow_scripts.stage import Job, StageError

log = logging.getLogger("snaketune.train")


def num_processes(training: dict, gpus: int) -> int:
    return max(training["num_processes"], gpus or 0)


def relaunch(job: Job, nproc: int, resume: Path | None, spec_dir: Path, entry: str) -> None:
    """Run ``entry(job, resume)`` in ``nproc`` processes; ``entry`` is ``"module:function"``
    (the processes import it by name). The children's output reaches the log masked, like ours."""
    spec = {"entry": entry, "job": job.to_dict(), "resume": str(resume) if resume else None}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=spec_dir) as f:
        json.dump(spec, f)
    accelerate_config = job.params.training["accelerate_config"]
    if accelerate_config or torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc)]
        cmd += (
            ["--config_file", accelerate_config]
            if accelerate_config
            else ["--multi_gpu", "--num_machines", "1"]
        )
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "workflow_scripts.training.launch", "--spec", f.name]
    log.info("launching %d training processes: %s", nproc, " ".join(cmd))
    try:
        run_logged(cmd, check=True)
    except subprocess.CalledProcessError as exc:
        raise StageError(
            f"train: distributed training failed (exit {exc.returncode}); see the log above"
        ) from None
    finally:
        Path(f.name).unlink(missing_ok=True)


def main() -> None:
    """Entry of each launched process: run the spec's entry on its job."""
    import argparse
    import importlib

    from workflow_scripts.logs import setup_logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    setup_logging(None)
    module, function = spec["entry"].split(":")
    entry = getattr(importlib.import_module(module), function)
    entry(Job(**spec["job"]), Path(spec["resume"]) if spec["resume"] else None)


if __name__ == "__main__":
    main()
