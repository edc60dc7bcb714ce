"""Where every artifact of the workflow lives, and what each shared stage's folder depends on.

The one module that spells a path of the workflow's layout (tests/test_layout.py fails when a
rule or another script spells one). An experiment is one resolved config: its own artifacts are
under results/{experiment}/, a sweep point's experiment name is sweeps/{sweep}/{point}.

Every shared artifact's folder is named by a short hash of exactly the config it depends on
(its *content key*), so experiments that agree on it share one job, and experiments that differ
never overwrite each other:

    results/shared/data/{dataset}-{key}/            download_dataset  (dataset section)
    results/shared/preprocessed/{dataset}-{key}/    preprocess_dataset (+ messages_format, filters)
    models/{model}-{key}/                           prepare_base_model (model id, revision, template)
    results/shared/formatted/{dataset}-{model}-{key}/  format_dataset (+ base model, max_length, overlength)
    results/shared/eval_base/{dataset}-{model}-{key}/  eval_base (+ evaluation settings)
    results/shared/general_base/{model}-{key}/      general_base (base model + general_ability)
    results/{experiment}/                           train, merge, eval_finetuned, compare (+ experiment.json)
    results/{experiment}/checkpoints/               train's checkpoints (outside its outputs: resume reads them)
    results/sweeps/{sweep}/                         leaderboard, best.json, halving.json
    results/sweeps/{sweep}/halving/                 a halving sweep's rung records and promotions
    results/sweeps/{sweep}/finalist-{k}/            a halving sweep's finalists (experiments)

Pure Python (no Snakemake, no torch): the Snakefile calls it at load time, tests call it directly.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from workflow_scripts.errors import ConfigError
from workflow_scripts.evaluation.general_items import python_version

RESULTS = "results"
SHARED_FOLDER = "shared"
SHARED = f"{RESULTS}/{SHARED_FOLDER}"  # the shared stages' folders, logs and benchmarks
SWEEPS = "sweeps"  # results/sweeps/{sweep}/: a sweep's own files; its points are experiments below it
BEST = "best.json"  # in a sweep's folder: the winner its leaderboard chose
HALVING_SUMMARY = "halving.json"  # in a halving sweep's folder: the rung each point reached
LEADERBOARD = "leaderboard.json"  # in a sweep's folder: every point, the finished ones with their folders
EXPERIMENT_INDEX = "experiment.json"  # in an experiment's folder: where its artifacts are
CHECKPOINTS = "checkpoints"  # in an experiment's folder (a halving point's: shared by its rungs)


def experiment_root(name: str) -> str:
    """results/{experiment}: an experiment's own folder (a pattern when ``name`` is `{experiment}`)."""
    return f"{RESULTS}/{name}"


def experiment_path(name: str, path: str) -> str:
    return f"{experiment_root(name)}/{path}"


def checkpoints(name: str) -> str:
    """Where an experiment's (or a halving point's) training checkpoints are."""
    return experiment_path(name, CHECKPOINTS)


def shared_path(kind: str, name: str) -> str:
    """results/shared/{kind}/{name}: a shared stage's folder, log or benchmark."""
    return f"{SHARED}/{kind}/{name}"


def point_experiment(sweep: str, point: str) -> str:
    """The experiment name of a sweep's point (or finalist slot): sweeps/{sweep}/{point}."""
    return f"{SWEEPS}/{sweep}/{point}"


def point_of(experiment: str) -> str:
    """A point's short name: `learning_rate~0.001_r~4` of `sweeps/S/learning_rate~0.001_r~4`."""
    return PurePosixPath(experiment).name


def sweep_dir(sweep: str) -> str:
    """results/sweeps/{sweep}: the leaderboard, best.json, halving.json and the opt-in targets' outputs."""
    return experiment_root(f"{SWEEPS}/{sweep}")


def is_sweep_dir(path: Path) -> bool:
    """A folder results/sweeps/{sweep} (the form `snaketune-chat` accepts for a sweep)."""
    return path.parent.name == SWEEPS and path.parent.parent.name == RESULTS


def workdir_of_sweep(path: Path) -> Path:
    """The workflow folder that holds results/sweeps/{sweep} (paths in best.json are relative to it)."""
    return path.resolve().parents[2]


def workdir_of_experiment(experiment_dir: Path, own: str | None) -> Path:
    """The workflow folder that holds ``experiment_dir`` (results/{experiment}): as many levels above
    it as ``own`` (one of its folders as experiment.json lists it, relative to the workflow folder;
    None: its evaluation folder) has above that folder."""
    depth = len(PurePosixPath(own or experiment_path(experiment_dir.name, "evaluation")).parent.parts)
    return experiment_dir.resolve().parents[depth - 1] if depth else experiment_dir.resolve()


def experiment_of_root(root: str) -> str:
    """The experiment name of its folder: `sweeps/S/p` of `results/sweeps/S/p` (the inverse of
    experiment_root)."""
    return root.removeprefix(f"{RESULTS}/")


# A name used as a folder: no `.`/`..`, no leading dot, nothing that breaks paths or job names.
SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_safe_name(name: str, key: str) -> str:
    """``name`` unchanged if it is safe as one folder name; ConfigError naming ``key`` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} cannot be used as a folder name (letters, digits, `_`, `-`, `.`; "
            "not starting with `.`; `.` and `..` are refused)"
        )
    return name


# The longest folder name the layout may build (derived names, sweep points): the rest of 255
# bytes is for the hidden temporary siblings of atomic writes.
COMPONENT_MAX_CHARS = 200


def check_folder_lengths(paths: dict[str, str], where: str) -> None:
    """Every folder name of an experiment's layout fits (derived and sweep point names included)."""
    for what, path in paths.items():
        for part in Path(path).parts:
            if len(part.encode()) > COMPONENT_MAX_CHARS:
                raise ConfigError(
                    f"{where}: the {what} folder name {part[:40]!r}... is {len(part.encode())} characters; "
                    f"at most {COMPONENT_MAX_CHARS} fit a path component"
                )


# A halving sweep's files (sweeps/plan.py fills the patterns in; the rules' outputs are the patterns).
FINALIST = "finalist-{slot}"
FINALIST_RE = r"finalist-\d+"
SLOT_JOB = "rung-{rung}-slot-{slot}"  # a middle rung's slot job: its log and benchmark file names


def finalist_slot(experiment: str) -> int:
    """k of a finalist's experiment name sweeps/{sweep}/finalist-{k}."""
    return int(point_of(experiment).rsplit("-", 1)[-1])


def halving_dir(sweep: str) -> str:
    return f"{sweep_dir(sweep)}/halving"


RUNG0_RECORD = experiment_path("{point}", "halving/rung-0.json")  # each point's first rung


def slot_record(sweep: str) -> str:
    """The pattern of a middle rung's slot record (wildcards rung, slot)."""
    return halving_dir(sweep) + "/rung-{rung}/slot-{slot}.json"


def promotion_file(sweep: str) -> str:
    """The pattern of a rung's promotion (wildcard rung)."""
    return halving_dir(sweep) + "/promotion-{rung}.json"


# evaluation keys only `compare` reads: changing them must not re-run the base evaluation.
COMPARE_ONLY = ("bootstrap_samples", "type_column")
# training keys format_dataset reads: other training edits must not re-format the data.
FORMAT_KEYS = ("max_length", "overlength")
# general_ability keys only compare and the leaderboard read: changing them re-measures nothing.
GENERAL_COMPARE_ONLY = ("tolerance", "exclude_from_winning")


def format_settings(config: dict) -> dict:
    """What format_dataset reads of the config (its folder's key hashes exactly this): the training
    keys, and the chat template's options where there are any (none keeps the folders of before)."""
    settings = {k: config["training"][k] for k in FORMAT_KEYS}
    if config["model"].get("chat_template_kwargs"):
        settings["chat_template_kwargs"] = config["model"]["chat_template_kwargs"]
    return settings


def evaluation_settings(config: dict) -> dict:
    """What an evaluation reads of the config: the evaluation section minus what only compare reads."""
    return {k: v for k, v in config["evaluation"].items() if k not in COMPARE_ONLY}


def general_settings(config: dict) -> dict:
    """What a general-ability job reads of the config (general_base's folder key hashes it)."""
    return {k: v for k, v in config["general_ability"].items() if k not in GENERAL_COMPARE_ONLY}


def content_key(*parts) -> str:
    """8 hex digits of the sha256 of the parts' canonical JSON."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _slug_or_empty(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")


def slug(text: str) -> str:
    return _slug_or_empty(text) or "x"


# Names derived from an id or a value are a readable prefix of a folder name; the content key
# next to them keeps folders apart, so they are cut to keep every folder name short.
DERIVED_NAME_CHARS = 60


def shorten(text: str, limit: int, whole=None) -> str:
    """``text`` itself if it fits ``limit``, else its start and a hash of ``whole`` (default: text),
    so a shortened name still depends on the full value alone."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 9].rstrip('-.')}-{content_key(text if whole is None else whole)}"


def model_name(model_cfg: dict) -> str:
    """Readable folder name: `model.name`, else a slug of `model.id` (checked safe)."""
    if model_cfg.get("name"):
        return check_safe_name(model_cfg["name"], "model.name")
    mid = model_cfg["id"]
    if mid.startswith("embedded:"):
        stem = mid.split(":", 1)[1]
    elif mid.endswith(".gguf") or Path(mid).exists():
        stem = Path(mid).name
    else:
        stem = mid.replace("/", "--")
    name = _slug_or_empty(re.sub(r"\.gguf$", "", stem))[:DERIVED_NAME_CHARS].rstrip("-.")
    if not name:
        raise ConfigError(f"model.id: cannot derive a folder name from {mid!r}; set model.name")
    return name


# The shape of a shared folder's name ({readable}-{content_key}), for Snakemake's wildcard
# constraints: a shape, not an alternation of every name, keeps planning linear in the points.
SHARED_FOLDER_RE = r"[^/]+-[0-9a-f]{8}"


def experiment_name_re(config: dict) -> str:
    """The shape of the experiment names of a resolved config: the one name, or any point of
    its sweep (point names never hold a `/`)."""
    sweep = config.get("sweep")
    if sweep:
        return point_experiment(re.escape(sweep["name"]), "[^/]+")
    return re.escape(config["experiment"])


# model keys that change the prepared folder's content (trust_remote_code only allows loading)
MODEL_CONTENT_KEYS = ("id", "revision", "fallback_chat_template")


def model_dir(model_cfg: dict) -> str:
    """models/{name}-{key}: the key hashes every setting that changes the folder's content, so
    experiments with different settings never overwrite each other's base model."""
    return f"models/{model_name(model_cfg)}-{content_key({k: model_cfg.get(k) for k in MODEL_CONTENT_KEYS})}"


@dataclass(frozen=True)
class Experiment:
    """One experiment: its name (a path under results/), its resolved config and artifact folders."""

    name: str
    config: dict
    data: str
    preprocessed: str
    base_model: str
    formatted: str
    base_eval: str
    general_base: str | None = None  # None: general_ability is off

    @property
    def root(self) -> str:
        return experiment_root(self.name)

    def artifacts(self) -> dict:
        """Where everything of this experiment is (written to results/{experiment}/experiment.json)."""
        return {
            "experiment": self.name,
            "shared": {
                "dataset": self.data,
                "preprocessed": self.preprocessed,
                "base_model": self.base_model,
                "formatted": self.formatted,
                "base_evaluation": self.base_eval,
                **({"general_base": self.general_base} if self.general_base else {}),
            },
            "own": {
                "adapter": f"{self.root}/model",
                "training": f"{self.root}/training",
                "deployment_model": f"{self.root}/deployment_model",
                "evaluation": f"{self.root}/evaluation",
                "logs": f"{self.root}/logs",
            },
            "config": self.config,
        }


def locate(name: str, config: dict) -> Experiment:
    """The experiment ``name`` of a resolved config, with the folder of each of its artifacts."""
    ds, mf, flt = config["dataset"], config["messages_format"], config["filters"]
    data_name = slug(Path(ds["id"]).stem if Path(ds["id"]).suffix else Path(ds["id"]).name or ds["id"])
    data_name = data_name[:DERIVED_NAME_CHARS].rstrip("-.") or "x"
    base_model = model_dir(config["model"])
    data_key = content_key(ds)
    prep_key = content_key(data_key, mf, flt)
    fmt_key = content_key(prep_key, base_model, format_settings(config))
    eval_key = content_key(fmt_key, evaluation_settings(config))
    model = model_name(config["model"])
    general_base = None
    if config["general_ability"]["enabled"]:
        # the text passages ship with the interpreter: another Python version, other passages
        general_key = content_key(base_model, general_settings(config), f"python{python_version()}")
        general_base = shared_path("general_base", f"{model}-{general_key}")
    experiment = Experiment(
        name=name,
        config=config,
        data=shared_path("data", f"{data_name}-{data_key}"),
        preprocessed=shared_path("preprocessed", f"{data_name}-{prep_key}"),
        base_model=base_model,
        formatted=shared_path("formatted", f"{data_name}-{model}-{fmt_key}"),
        base_eval=shared_path("eval_base", f"{data_name}-{model}-{eval_key}"),
        general_base=general_base,
    )
    paths = experiment.artifacts()
    check_folder_lengths({**paths["shared"], "experiment": experiment.root}, f"experiment {name}")
    return experiment
