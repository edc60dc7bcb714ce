"""Where a benchmark runs the workflow: a temporary copy, so nothing touches the checkout's
results/ and .snakemake/."""

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def workflow_copy(dest: Path) -> Path:
    """The Snakefile, rules, schemas and config.yaml copied to ``dest``; the workflow_scripts and
    data folders linked (the code under test and the shipped sample, unchanged)."""
    dest.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, dest / name)
    for name in ("rules", "schemas", "envs", "profiles"):
        shutil.copytree(REPO / name, dest / name)
    for name in ("workflow_scripts", "data"):
        (dest / name).symlink_to(REPO / name)
    return dest
