# The experiments of this invocation and the paths of every artifact (workflow_scripts/layout.py
# decides them; the sweep's points and plan: workflow_scripts/sweeps/). Shared artifacts are one job per distinct config (a wildcard per kind of folder);
# an experiment's own artifacts are one job per experiment ({experiment} wildcard).

SWEEP = config["sweep"]
# The first experiment: the opt-in targets (push_to_hub, export_gguf) act on it without a sweep;
# its `export` section (never swept) is every point's.
PRIMARY = EXPERIMENT_LIST[0]
RESULTS = PRIMARY.root
SHARED = layout.SHARED  # results/shared: the shared stages' folders
ENV = "../envs/snaketune.yaml"


class Registry(dict):
    """name -> experiment; a name the config does not give (a path asked for by hand) is one
    clear error, not a KeyError inside an input function."""

    def __init__(self, kind, items):
        super().__init__(items)
        self.kind = kind

    def __missing__(self, name):
        raise WorkflowError(f"{self.kind} {name!r} belongs to no experiment of this config")


def _by_folder(attr, kind):
    """Folder name -> one experiment that needs it; experiments without such a folder are left out."""
    return Registry(
        kind, {getattr(e, attr).rsplit("/", 1)[1]: e for e in EXPERIMENTS.values() if getattr(e, attr)}
    )


EXPERIMENTS = Registry("experiment", ((e.name, e) for e in EXPERIMENT_LIST))
# folder name -> one experiment that needs it (all that need it agree on its config)
DATA = _by_folder("data", "dataset folder")
PREPROCESSED = _by_folder("preprocessed", "preprocessed folder")
BASE_MODELS = _by_folder("base_model", "base model folder")
FORMATTED = _by_folder("formatted", "formatted folder")
BASE_EVALS = _by_folder("base_eval", "base evaluation folder")
GENERAL_BASES = _by_folder("general_base", "general-ability base folder")  # none when it is off

# The shape of each kind of name, not the list of names: an alternation of every name is copied
# into every path pattern, and made a 1,000-point dry run 22 s instead of 14 s
# (benchmarks/README.md).
from workflow_scripts.layout import SHARED_FOLDER_RE as FOLDER_RE, experiment_name_re, general_settings
from workflow_scripts.evaluation import general_items


wildcard_constraints:
    experiment=experiment_name_re(config),
    data=FOLDER_RE,
    prep=FOLDER_RE,
    model=FOLDER_RE,
    fmt=FOLDER_RE,
    base_eval=FOLDER_RE,
    general_base=FOLDER_RE,


def exp(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def setting(section, registry=None, kind=None):
    """A params function: one config section of the experiment a job belongs to."""

    def get(wildcards):
        e = registry[getattr(wildcards, kind)] if registry else exp(wildcards)
        return e.config[section]

    return get


# The opt-in targets (rules/publish.smk): rule-name targets cannot have wildcards, so their paths
# are fixed. They act on the experiment, or after a sweep on the point workflow_scripts/sweeps/winner.py
# picks at run time (best.json's winner, or `sweep.act_on`), and write beside best.json.
PUBLISH_DIR = layout.sweep_dir(SWEEP["name"]) if SWEEP else RESULTS


def pub(path):
    return f"{PUBLISH_DIR}/{path}"


def export_name():
    """The GGUF files' stem: `export.name`, else {model name}-{experiment}, for a sweep
    {model name}-{sweep name} (the sweep name alone when its points vary the model)."""
    if PRIMARY.config["export"]["name"]:
        return PRIMARY.config["export"]["name"]
    if not SWEEP:
        return f"{layout.model_name(PRIMARY.config['model'])}-{layout.point_of(PRIMARY.name)}"
    models = {layout.model_name(e.config["model"]) for e in EXPERIMENTS.values()}
    return f"{models.pop()}-{SWEEP['name']}" if len(models) == 1 else SWEEP["name"]


def export_inputs(e):
    """What export_gguf reads of an experiment."""
    return {"deployment_dir": f"{e.root}/deployment_model", "test": f"{e.formatted}/test.parquet"}


def exportable_inputs(e):
    """export_inputs, once the base model is known to be exportable: a model llama.cpp's converter
    cannot take is refused while the workflow plans, naming its architecture, not after training."""
    from workflow_scripts.models import llama_cpp

    refusal = llama_cpp.refusal_at_load(e.config["model"], e.base_model)
    if refusal:
        raise WorkflowError(f"Invalid configuration: model.id {e.config['model']['id']}: {refusal}")
    return export_inputs(e)


def push_inputs(e):
    """What push_to_hub reads of an experiment."""
    return {
        "deployment_dir": f"{e.root}/deployment_model",
        "base_model_dir": e.base_model,
        "base": f"{e.base_eval}/base_model_evaluation.json",
        "finetuned": f"{e.root}/evaluation/finetuned_model_evaluation.json",
        "comparison": f"{e.root}/evaluation/comparison.json",
    }


def push_settings(e):
    return {"dataset": e.config["dataset"]}


def publish_input(inputs):
    """An input function: the experiment's inputs; after a sweep, best.json and every candidate's
    inputs and run.json (the point it holds), so whichever is chosen is built. (A function: the
    leaderboard rule is defined after rules/publish.smk.)"""

    def get(wildcards):
        if not SWEEP:
            return inputs(PRIMARY)
        files = (f for e in EXPERIMENTS.values() for f in (*inputs(e).values(), f"{e.root}/training/run.json"))
        return {"best": rules.leaderboard.output.best, "candidates": list(dict.fromkeys(files))}

    return get


def publish_params(inputs, settings=lambda e: {}):
    """The experiment's own settings; after a sweep, the candidates (the sweep's experiments: grid
    points or halving finalists, each with the rule's inputs and settings for it) and
    `sweep.act_on`, which winner.subject resolves at run time."""
    if not SWEEP:
        return settings(PRIMARY)
    candidates = {
        name: {"root": e.root, "input": inputs(e), "params": settings(e)} for name, e in EXPERIMENTS.items()
    }
    return {"candidates": candidates, "act_on": SWEEP["act_on"]}


def exp_path(path):
    return layout.experiment_path("{experiment}", path)


def log_of(rule_name, wildcard="experiment"):
    if wildcard == "experiment":
        return exp_path(f"logs/{rule_name}.log")
    return layout.shared_path("logs", f"{rule_name}/{{{wildcard}}}.log")


def bench_of(rule_name, wildcard="experiment"):
    if wildcard == "experiment":
        return exp_path(f"benchmarks/{rule_name}.tsv")
    return layout.shared_path("benchmarks", f"{rule_name}/{{{wildcard}}}.tsv")


def local_dataset_input(wildcards):
    """Every local data file is an input: editing one re-runs the data stages."""
    from workflow_scripts.data.sources import is_local_dataset, local_split_files

    dataset = DATA[wildcards.data].config["dataset"]
    if not is_local_dataset(dataset["id"]):
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


def train_resources():
    """The training rules' resources: resources_for("train", gpu=True), and for training.nodes > 1
    the multi-node SLURM request (workflow_scripts/cluster.py: one task per node, GPUs per node)."""
    out = resources_for("train", gpu=True)
    if NODES > 1:
        gpus, gpu_model = out.pop("gpu", 0), out.pop("gpu_model", None)
        out.update(cluster.train_resources(NODES, gpus, gpu_model))
    return out


def format_params(wildcards):
    """The training keys format_dataset reads (so other training edits leave it alone)."""
    return layout.format_settings(FORMATTED[wildcards.fmt].config)


def eval_settings(wildcards):
    """The evaluation section minus what only compare reads (those never re-run an evaluation)."""
    e = BASE_EVALS[wildcards.base_eval] if hasattr(wildcards, "base_eval") else exp(wildcards)
    return layout.evaluation_settings(e.config)


# Input functions: the upstream folder of a job, looked up from the experiment it belongs to.
def raw_of(split):
    return lambda w: f"{PREPROCESSED[w.prep].data}/{split}.parquet"


def preprocessed_of(split):
    return lambda w: f"{FORMATTED[w.fmt].preprocessed}/{split}.parquet"


def formatted_of(split):
    return lambda w: f"{exp(w).formatted}/{split}.parquet"


def tokens_of(split):
    """The memory-mapped token file training reads (workflow_scripts/data/tokens.py)."""
    return lambda w: f"{exp(w).formatted}/{split}.tokens.arrow"


def base_eval_of(name):
    return lambda w: f"{exp(w).base_eval}/{name}"


def per_point(path):
    """One path per experiment (the sweep's points), for the leaderboard."""
    return [layout.experiment_path(name, path) for name in EXPERIMENTS]


def base_model_of(wildcards):
    return exp(wildcards).base_model


ALL_TARGETS = []


# General ability (rules/general.smk)
def general_task_files(experiment):
    """Every file of the local lm-eval task folders: editing one re-measures both models."""
    return general_items.task_input_files(tuple(experiment.config["general_ability"]["tasks"]))


def general_inputs(wildcards):
    """compare's general-ability inputs; none when general_ability is off."""
    e = exp(wildcards)
    if not e.general_base:
        return {}
    return {
        "general_base": f"{e.general_base}/general_ability.json",
        "general_base_items": f"{e.general_base}/general_items.jsonl",
        "general_finetuned": f"{e.root}/evaluation/general_ability.json",
        "general_finetuned_items": f"{e.root}/evaluation/general_items.jsonl",
    }


def train_outputs():
    """What training writes for an experiment: `train`, or for a halving finalist `train_finalist`."""
    return {
        "adapter_dir": directory(exp_path("model")),
        "metrics": exp_path("training/metrics.csv"),
        "loss_plot": report(
            exp_path("training/loss.png"),
            caption="report/loss.rst",
            category="Training",
            subcategory="{experiment}",
        ),
        "run_info": exp_path("training/run.json"),
    }


# The experiments `train` trains: all but a halving sweep's finalists (train_finalist's), so the two
# rules never match one path.
TRAINED_BY_TRAIN = (
    f"(?!{HALVING.finalist_re}/){experiment_name_re(config)}" if HALVING else experiment_name_re(config)
)


def checkpoints_of(wildcard):
    """A params function: the checkpoint folder of the job's experiment or point (outside the
    outputs: Snakemake must not delete it when a run dies, resume reads it)."""
    return lambda w: layout.checkpoints(getattr(w, wildcard))


# Successive halving (rules/halving.smk): the parameters of each rung job (workflow_scripts/sweeps/plan.py)
def rung_job(kind):
    """params.halving of a rung job: `rung0` (wildcard point), `slot` (rung, slot) or `finalist`
    (experiment). Past rung 0 the promotion names the point, at run time."""
    from workflow_scripts.sweeps.plan import PlanError

    def get(w):
        try:
            if kind == "rung0":
                return HALVING.rung0_job(w.point)
            if kind == "slot":
                return HALVING.slot_job(w.rung, w.slot)
            return HALVING.finalist_job(w.experiment)
        except PlanError as exc:
            raise WorkflowError(str(exc)) from None

    return get
