# Paths of every artifact and helpers shared by the rules. Nothing here reads files.
from workflow_scripts.config import model_name

EXPERIMENT = config["experiment"]
RESULTS = f"results/{EXPERIMENT}"
BASE_MODEL_DIR = f"models/{model_name(config['model'])}"
SPLITS = ["train", "validation", "test"]
ENV = "../envs/snaketune.yaml"


def res(path):
    """An artifact of this experiment."""
    return f"{RESULTS}/{path}"


def log_of(rule_name):
    return res(f"logs/{rule_name}.log")


def bench_of(rule_name):
    return res(f"benchmarks/{rule_name}.tsv")


def local_dataset_input(wildcards):
    """A local dataset file/folder is an input, so editing it re-runs the data stages."""
    from pathlib import Path

    path = Path(config["dataset"]["id"])
    return [str(path)] if path.exists() else []


def resources_for(group, gpu=False):
    """mem_mb / runtime (minutes) / gpu of a rule group, for local runs and the SLURM profile."""
    r = config["resources"]
    out = {"mem_mb": r["mem_mb"][group], "runtime": r["runtime"][group]}
    for key in ("slurm_partition", "slurm_account"):
        if r.get(key):
            out[key] = r[key]
    if gpu:
        out["gpu"] = r["gpu"]
        if r["gpu"] and r.get("gpu_model"):
            out["gpu_model"] = r["gpu_model"]
    return out


def training_format_params():
    """The two training keys format_dataset reads (so other training edits leave it alone)."""
    t = config["training"]
    return {"max_length": t["max_length"], "overlength": t["overlength"]}


# `all` grows as stages land.
ALL_TARGETS = []
