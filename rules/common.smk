# The experiments of this invocation and the paths of every artifact (workflow_scripts/experiments.py
# decides them). Shared artifacts are one job per distinct config (a wildcard per kind of folder);
# an experiment's own artifacts are one job per experiment ({experiment} wildcard).
import re

EXPERIMENTS = {e.name: e for e in EXPERIMENT_LIST}
SWEEP = config["sweep"]
# The experiment single-experiment targets (push_to_hub, export_gguf) work on.
PRIMARY = next(iter(EXPERIMENTS.values()))
RESULTS = PRIMARY.root
SHARED = "results/shared"
ENV = "../envs/snaketune.yaml"


def _by_folder(attr):
    return {getattr(e, attr).rsplit("/", 1)[1]: e for e in EXPERIMENTS.values()}


# folder name -> one experiment that needs it (all that need it agree on its config)
DATA = _by_folder("data")
PREPROCESSED = _by_folder("preprocessed")
BASE_MODELS = _by_folder("base_model")
FORMATTED = _by_folder("formatted")
BASE_EVALS = _by_folder("base_eval")


def _one_of(names):
    return "|".join(re.escape(n) for n in sorted(names))


wildcard_constraints:
    experiment=_one_of(EXPERIMENTS),
    data=_one_of(DATA),
    prep=_one_of(PREPROCESSED),
    model=_one_of(BASE_MODELS),
    fmt=_one_of(FORMATTED),
    base_eval=_one_of(BASE_EVALS),


def exp(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def setting(section, registry=None, kind=None):
    """A params function: one config section of the experiment a job belongs to."""

    def get(wildcards):
        e = registry[getattr(wildcards, kind)] if registry else exp(wildcards)
        return e.config[section]

    return get


def res(path):
    """An artifact of the primary experiment, for the opt-in single-experiment targets
    (push_to_hub, export_gguf): rule-name targets cannot have wildcards."""
    return f"{RESULTS}/{path}"


def primary_log_of(rule_name):
    return res(f"logs/{rule_name}.log")


def primary_bench_of(rule_name):
    return res(f"benchmarks/{rule_name}.tsv")


def exp_path(path):
    return f"results/{{experiment}}/{path}"


def log_of(rule_name, wildcard="experiment"):
    if wildcard == "experiment":
        return exp_path(f"logs/{rule_name}.log")
    return f"{SHARED}/logs/{rule_name}/{{{wildcard}}}.log"


def bench_of(rule_name, wildcard="experiment"):
    if wildcard == "experiment":
        return exp_path(f"benchmarks/{rule_name}.tsv")
    return f"{SHARED}/benchmarks/{rule_name}/{{{wildcard}}}.tsv"


def local_dataset_input(wildcards):
    """Every local data file is an input: editing one re-runs the data stages."""
    from workflow_scripts.data.sources import local_split_files, looks_local

    dataset = DATA[wildcards.data].config["dataset"]
    if not looks_local(dataset["id"]):
        return []
    by_split, _ = local_split_files(dataset)  # checked at load: cannot fail here
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


def format_params(wildcards):
    """The two training keys format_dataset reads (so other training edits leave it alone)."""
    t = FORMATTED[wildcards.fmt].config["training"]
    return {"max_length": t["max_length"], "overlength": t["overlength"]}


def eval_settings(wildcards):
    """The evaluation section minus what only compare reads (those never re-run an evaluation)."""
    from workflow_scripts.experiments import COMPARE_ONLY

    e = BASE_EVALS[wildcards.base_eval] if hasattr(wildcards, "base_eval") else exp(wildcards)
    return {k: v for k, v in e.config["evaluation"].items() if k not in COMPARE_ONLY}


# Input functions: the upstream folder of a job, looked up from the experiment it belongs to.
def raw_of(split):
    return lambda w: f"{PREPROCESSED[w.prep].data}/{split}.parquet"


def preprocessed_of(split):
    return lambda w: f"{FORMATTED[w.fmt].preprocessed}/{split}.jsonl"


def formatted_of(split):
    return lambda w: f"{exp(w).formatted}/{split}.parquet"


def base_eval_of(name):
    return lambda w: f"{exp(w).base_eval}/{name}"


def per_point(path):
    """One path per experiment (the sweep's points), for the leaderboard."""
    return [f"results/{name}/{path}" for name in EXPERIMENTS]


def base_model_of(wildcards):
    return exp(wildcards).base_model


ALL_TARGETS = []
