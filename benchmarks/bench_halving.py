"""Successive halving vs a grid of the same points, side by side in one run.

The points, rungs and settings are examples/sweep-halving.yaml's (8 points: 4 learning rates x 2
LoRA ranks on the embedded model and the shipped sample; rungs 4/12/36, keep 0.5). The grid is
the same file with `strategy: grid` (every point trains 36 steps, then is merged and evaluated).
Both run in one temporary copy of the workflow (Snakefile, rules, schemas, config.yaml; the
workflow_scripts and data folders are links), after the stages they share (data, base model,
base evaluations), which are timed apart. Prints the CPU, each sweep's wall time and training
steps (halving.json's `steps_spent` and `grid_steps`), the ratios, both validation rankings, and
whether halving picked the grid's validation winner.

Usage: python benchmarks/bench_halving.py [--keep-workdir]
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from machine import cpu_model
from workdir import REPO, workflow_copy

EXAMPLE = REPO / "examples" / "sweep-halving.yaml"


def snakemake(wf: Path, cfg: Path, *args: str) -> float:
    """Seconds `snakemake --cores 2` took; its output goes to a log next to the config."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "DATASET")}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(cfg), *args]
    start = time.perf_counter()
    with open(cfg.with_suffix(".log"), "a") as log:
        proc = subprocess.run(cmd, cwd=wf, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.exit(f"snakemake failed for {cfg.name}; see {cfg.with_suffix('.log')}")
    return time.perf_counter() - start


def ranking(board: dict) -> list[tuple[str, float]]:
    """(point, final validation loss) of the leaderboard's ranked points (finalists first)."""
    return [
        (r["experiment"].rsplit("/", 1)[-1], r["selection_value"])
        for r in board["points"]
        if r["selection_value"] is not None
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary workflow copy")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-halving-"))
    wf = workflow_copy(work / "wf")
    halving = yaml.safe_load(EXAMPLE.read_text())
    grid = copy.deepcopy(halving)
    grid["sweep"].update(name=f"{halving['sweep']['name']}-grid", strategy="grid")
    grid["sweep"].pop("halving")
    configs = {}
    for label, cfg in (("halving", halving), ("grid", grid)):
        configs[label] = wf / f"{label}.yaml"
        configs[label].write_text(yaml.safe_dump(cfg, sort_keys=False))

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores)")
    shared = snakemake(wf, configs["halving"], "--until", "eval_base", "general_base")
    print(f"shared stages (data, base model, base evaluations): {shared:.0f} s")
    wall = {label: snakemake(wf, cfg) for label, cfg in configs.items()}

    out = {}
    for label, cfg in (("halving", halving), ("grid", grid)):
        folder = wf / "results" / "sweeps" / cfg["sweep"]["name"]
        out[label] = {
            "board": json.loads((folder / "leaderboard.json").read_text()),
            "best": json.loads((folder / "best.json").read_text())["experiment"].rsplit("/", 1)[-1],
        }
    summary = json.loads((wf / "results" / "sweeps" / halving["sweep"]["name"] / "halving.json").read_text())
    spent, grid_steps = summary["steps_spent"], summary["grid_steps"]

    print(f"{'':10} {'wall':>8} {'train steps':>12}  winner")
    print(f"{'halving':10} {wall['halving']:7.0f}s {spent:12d}  {out['halving']['best']}")
    print(f"{'grid':10} {wall['grid']:7.0f}s {grid_steps:12d}  {out['grid']['best']}")
    print(
        f"halving / grid: wall {wall['halving'] / wall['grid']:.2f}, training steps {spent / grid_steps:.2f}; "
        f"same winner: {out['halving']['best'] == out['grid']['best']}"
    )
    print("grid ranking (final validation loss, lower wins):")
    for name, value in ranking(out["grid"]["board"]):
        print(f"  {value:.4f}  {name}")
    print("halving: validation loss per rung (steps " + ", ".join(map(str, summary["rungs"])) + "):")
    for p in sorted(summary["points"], key=lambda p: (-p["rung_reached"], p["scores"][p["rung_reached"]])):
        scores = "  ".join("   —  " if s is None else f"{s:.4f}" for s in p["scores"])
        print(f"  {scores}  {p['point'].rsplit('/', 1)[-1]}")
    if args.keep_workdir:
        print(f"workflow copy kept: {wf}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
