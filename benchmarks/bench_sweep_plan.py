"""How long `snakemake -n` takes to plan a sweep of 100 / 1,000 / 10,000 points.

Each size is a grid over `training.learning_rate` (10 values) x `training.seed` (size / 10
values): one training, merge and evaluation chain per point on shared data and base-model jobs,
the one-job-per-point DAG a real sweep has. Each dry run is one fresh `snakemake -n --cores 2`
process in a temporary copy of the workflow (its Snakefile, rules, schemas and config.yaml; the
workflow_scripts and data folders are links), so nothing is read from or written to the
checkout's results/ and .snakemake/. The wall time includes Python start-up, config loading and
validation, sweep expansion, DAG building and printing the plan (to a pipe). A size that runs past
`--timeout` seconds is stopped and reported as such.

Usage: python benchmarks/bench_sweep_plan.py [--sizes 100,1000,10000] [--timeout 600]
"""

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from machine import cpu_model
from workdir import workflow_copy


def sweep_config(n: int) -> dict:
    rates = [round(1e-4 * (i + 1), 6) for i in range(10)]
    return {
        "sweep": {
            "name": f"bench{n}",
            "grid": {"training.learning_rate": rates, "training.seed": list(range(n // 10))},
        },
        "wandb": {"mode": "disabled"},
    }


def dry_run(wf: Path, n: int, timeout: float) -> str:
    cfg = wf / f"sweep{n}.yaml"
    cfg.write_text(yaml.safe_dump(sweep_config(n)))
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "DATASET")}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", str(cfg)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=wf, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout:.0f} s (stopped)"
    wall = time.perf_counter() - start
    # the largest child so far: sizes run in increasing order, so this run's peak
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        return f"failed after {wall:.1f} s: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}"
    jobs = re.search(r"^total\s+(\d+)", proc.stdout, flags=re.M)
    return f"{wall:.1f} s ({jobs.group(1) if jobs else '?'} jobs planned, peak RSS {peak_mb:.0f} MB)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores), python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench_sweep_plan-") as tmp:
        wf = workflow_copy(Path(tmp) / "wf")
        for n in sizes:
            print(f"{n:>6} points: {dry_run(wf, n, args.timeout)}", flush=True)


if __name__ == "__main__":
    main()
