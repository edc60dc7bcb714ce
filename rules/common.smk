# Paths of every artifact and helpers shared by the rules. Nothing here reads files.
from workflow_scripts.config import check_safe_name, model_dir

EXPERIMENT = check_safe_name(config["experiment"], "experiment")  # checked again where paths are built
RESULTS = f"results/{EXPERIMENT}"
BASE_MODEL_DIR = model_dir(config["model"])
ENV = "../envs/snaketune.yaml"


def res(path):
    """An artifact of this experiment."""
    return f"{RESULTS}/{path}"


def log_of(rule_name):
    return res(f"logs/{rule_name}.log")


def bench_of(rule_name):
    return res(f"benchmarks/{rule_name}.tsv")


def local_dataset_input(wildcards):
    """Every local data file is an input: editing one re-runs the data stages."""
    from workflow_scripts.data.sources import local_split_files, looks_local

    if not looks_local(config["dataset"]["id"]):
        return []
    by_split, _ = local_split_files(config["dataset"])  # checked at load: cannot fail here
    return sorted(f for files in by_split.values() for f in files)


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
