"""Experiments and where their artifacts live: one module for every path of the workflow.

An experiment is one resolved config. Without a `sweep` section there is one (named by
`experiment`); with one, every point of the grid (plus the explicit `points`) is an experiment
named from the keys it varies, resolved and validated with the full schema at load time.

Every shared artifact's folder is named by a short hash of exactly the config it depends on,
so experiments that agree on it share one job, and experiments that differ never overwrite each
other:

    results/shared/data/{dataset}-{key}/            download_dataset  (dataset section)
    results/shared/preprocessed/{dataset}-{key}/    preprocess_dataset (+ messages_format, filters)
    models/{model}-{key}/                           prepare_base_model (model id, revision, template)
    results/shared/formatted/{dataset}-{model}-{key}/  format_dataset (+ base model, max_length, overlength)
    results/shared/eval_base/{dataset}-{model}-{key}/  eval_base (+ evaluation settings)
    results/shared/general_base/{model}-{key}/      general_base (base model + general_ability)
    results/{experiment}/                           train, merge, eval_finetuned, compare (+ experiment.json)
    results/sweeps/{sweep}/                         leaderboard, best.json

Pure Python (no Snakemake, no torch): the Snakefile calls it at load time, tests call it directly.
"""

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.checks import check_folder_lengths
from workflow_scripts.config import ConfigError, check_safe_name, revalidate
from workflow_scripts.evaluation.general_items import python_version
from workflow_scripts.sampling import sample_points

# Sections a sweep may vary (the rest describe where and how jobs run, not the experiment).
SWEEPABLE = ("training", "peft", "model", "messages_format", "filters", "evaluation", "dataset")
# evaluation keys only `compare` reads: changing them must not re-run the base evaluation.
COMPARE_ONLY = ("bootstrap_samples", "type_column")
# training keys format_dataset reads: other training edits must not re-format the data.
FORMAT_KEYS = ("max_length", "overlength")
# general_ability keys only compare and the leaderboard read: changing them re-measures nothing.
GENERAL_COMPARE_ONLY = ("tolerance", "exclude_from_winning")


def format_settings(config: dict) -> dict:
    """What format_dataset reads of the config (its folder's key hashes exactly this)."""
    return {k: config["training"][k] for k in FORMAT_KEYS}


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
# One value in a sweep point's name (longer ones end in a hash of the whole value), and the whole
# name (a path component holds 255 bytes; checks.COMPONENT_MAX_CHARS leaves room for temporaries).
POINT_VALUE_CHARS = 40
POINT_NAME_CHARS = 150


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
        return f"sweeps/{re.escape(sweep['name'])}/[^/]+"
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
        return f"results/{self.name}"

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


def layout(name: str, config: dict) -> Experiment:
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
        general_base = f"results/shared/general_base/{model}-{general_key}"
    experiment = Experiment(
        name=name,
        config=config,
        data=f"results/shared/data/{data_name}-{data_key}",
        preprocessed=f"results/shared/preprocessed/{data_name}-{prep_key}",
        base_model=base_model,
        formatted=f"results/shared/formatted/{data_name}-{model}-{fmt_key}",
        base_eval=f"results/shared/eval_base/{data_name}-{model}-{eval_key}",
        general_base=general_base,
    )
    paths = experiment.artifacts()
    check_folder_lengths({**paths["shared"], "experiment": experiment.root}, f"experiment {name}")
    return experiment


# --- sweeps ------------------------------------------------------------------------------------


def _set_dotted(config: dict, dotted: str, value, where: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in SWEEPABLE or len(parts) < 2:
        raise ConfigError(f"{where}: {dotted!r} is not a key of {', '.join(SWEEPABLE)} (write section.key)")
    node = config
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a mapping, cannot set {dotted}")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or more parts where the last one is ambiguous."""
    names = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            short = "_".join(parts[-n:])
            if sum(1 for other in keys if "_".join(other.split(".")[-n:]) == short) == 1:
                break
        names[k] = short
    return names


def point_overrides(sweep: dict) -> list[dict]:
    """The grid's Cartesian product (in the order written), the explicit points, then the
    sampled ones (workflow_scripts/sampling.py)."""
    grid = sweep.get("grid") or {}
    combos = (
        [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] if grid else []
    )
    written = combos + [dict(p) for p in sweep.get("points") or []]
    samples = sample_points(sweep["samples"], SWEEPABLE, written) if sweep.get("samples") else []
    return written + samples


def point_names(overrides: list[dict]) -> list[str]:
    """Readable, unique, path- and job-name-safe names: each point by the keys it sets itself.

    Built with snakemake.utils.Paramspace (`key~value` joined by `_`). A point's name depends
    only on its own keys and values, so adding or removing other points (or a grid value) never
    renames it, and its finished jobs are kept.
    """
    import pandas as pd
    from snakemake.utils import Paramspace

    short = _short_names(list(dict.fromkeys(k for o in overrides for k in o)))
    names = []
    for o in overrides:
        row = pd.DataFrame(
            [
                {
                    short[k]: shorten(slug(_value_text(v)), POINT_VALUE_CHARS, _value_text(v))
                    for k, v in o.items()
                }
            ]
        )
        name = next(iter(Paramspace(row, filename_params="*").instance_patterns))
        names.append(shorten(name, POINT_NAME_CHARS))
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise ConfigError(
                f"sweep: points {seen[n]} and {i} are both named {n!r}: the same values (a point "
                "repeated), or values that differ only in characters a folder name cannot hold"
            )
        seen[n] = i
    return names


def sweep_base(config: dict) -> dict:
    """What every point of a sweep starts from: the config without its `sweep` section; under
    halving, max_steps is the last rung (check_halving has checked it was -1 or equal)."""
    base = copy.deepcopy(config)
    sweep = base.pop("sweep")
    if sweep["strategy"] == "halving":
        base["training"]["max_steps"] = sweep["halving"]["rungs"][-1]
    return base


def expand(config: dict) -> list[Experiment]:
    """The experiments of a resolved config: one, or one per sweep point (each validated)."""
    sweep = config.get("sweep")
    if not sweep:
        name = check_safe_name(config["experiment"], "experiment")
        return [layout(name, config)]
    sweep_name = check_safe_name(sweep["name"], "sweep.name")
    overrides = point_overrides(sweep)
    if not overrides:
        raise ConfigError("sweep: none of `grid`, `points`, `samples` gives a point")
    names = point_names(overrides)
    if sweep["strategy"] == "halving":
        check_halving(sweep, config["training"], overrides)
    elif sweep.get("halving"):
        raise ConfigError(
            "sweep.halving: set, but sweep.strategy is grid (set strategy: halving, or drop it)"
        )
    check_act_on(sweep, names)
    base = sweep_base(config)
    experiments = []
    for i, (name, values) in enumerate(zip(names, overrides, strict=True)):
        where = f"sweep point {i} ({name})"
        point = copy.deepcopy(base)
        for dotted, value in values.items():
            _set_dotted(point, dotted, value, where)
        try:
            revalidate(point)
            experiments.append(layout(f"sweeps/{sweep_name}/{name}", point))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return experiments


def check_act_on(sweep: dict, names: list[str]) -> None:
    """`sweep.act_on` is `best` or one of the points (short or full name)."""
    act_on = sweep["act_on"]
    if act_on == "best" or act_on in names or act_on in (f"sweeps/{sweep['name']}/{n}" for n in names):
        return
    import difflib

    close = difflib.get_close_matches(act_on.rsplit("/", 1)[-1], names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the points: {', '.join(names[:5])}"
    raise ConfigError(
        f"sweep.act_on: {act_on!r} is neither `best` nor a point of sweep {sweep['name']!r}{hint}"
    )


# --- successive halving --------------------------------------------------------------------------

# Training keys a halving sweep cannot vary: max_length/overlength change the formatted (so the
# validation) data the rungs rank on, max_steps is the last rung.
HALVING_FIXED_TRAINING = (*FORMAT_KEYS, "max_steps")


def check_halving(sweep: dict, training: dict, overrides: list[dict]) -> None:
    """What a halving sweep needs, refused at load naming the key (the points are checked by
    `halving_point_problems` once resolved)."""
    halving = sweep.get("halving")
    if halving is None:
        raise ConfigError("sweep.halving: required with sweep.strategy: halving (rungs and keep)")
    rungs = halving["rungs"]
    if any(b <= a for a, b in itertools.pairwise(rungs)):
        raise ConfigError(f"sweep.halving.rungs: {rungs} must be strictly increasing training steps")
    if training["max_steps"] not in (-1, rungs[-1]):
        raise ConfigError(
            f"sweep.halving.rungs: the last rung ({rungs[-1]}) is every point's max_steps, but "
            f"training.max_steps is {training['max_steps']} (config.yaml's demo value applies unless you "
            f"set it): set training.max_steps to {rungs[-1]} or -1"
        )
    for origin, dotted in _varied_keys(sweep, overrides):
        section, _, key = dotted.partition(".")
        top = key.split(".", 1)[0]
        if section not in ("training", "peft") or (section == "training" and top in HALVING_FIXED_TRAINING):
            raise ConfigError(
                f"sweep.{origin}: {dotted}: a halving sweep ranks every point on one validation split at "
                f"the same steps, so its points vary only training and peft keys (not "
                f"{', '.join('training.' + k for k in HALVING_FIXED_TRAINING)})"
            )


def _varied_keys(sweep: dict, overrides: list[dict]) -> list[tuple[str, str]]:
    """(where it is written, dotted key) of every key the sweep's points set."""
    written = [("grid", k) for k in sweep.get("grid") or {}]
    written += [(f"points[{i}]", k) for i, p in enumerate(sweep.get("points") or []) for k in p]
    written += [("samples.space", k) for k in (sweep.get("samples") or {}).get("space", {})]
    seen = {k for _, k in written}
    return written + [("points", k) for o in overrides for k in o if k not in seen]


def halving_point_problems(point: dict) -> list[str]:
    """A resolved point's settings halving cannot work with (a point may set them itself)."""
    training = point["training"]
    problems = []
    if training["eval_strategy"] != "steps":
        problems.append(
            f"training.eval_strategy: {training['eval_strategy']!r} — halving ranks points on the validation "
            "loss at each rung's step, and an epoch's evaluation (and save) at a rung's end would change the "
            "state a promoted point continues from; use 'steps'"
        )
    if training["early_stopping_patience"]:
        problems.append(
            "training.early_stopping_patience: halving stops points early itself; a point stopped before "
            "a rung's step could not be compared there (set it to null)"
        )
    # TRL keys (set only when the user sets them) that break continuing a point from its rung checkpoint
    breaks = {
        "save_only_model": "a rung's checkpoint needs the optimizer and scheduler to continue from",
        "load_best_model_at_end": "a finalist must be the model at the last step, as a straight run's",
        "ignore_data_skip": "a continued point would see the first batches of its epoch again",
    }
    problems += [f"training.{k}: true — {why}" for k, why in breaks.items() if training.get(k)]
    if training.get("save_strategy") == "best":
        problems.append("training.save_strategy: 'best' — every rung must save a checkpoint at its step")
    return problems


def halving_slots(n_points: int, keep: float, n_rungs: int) -> list[int]:
    """How many points train in each rung: all at the first, then ceil(keep * previous), at least 1."""
    slots = [n_points]
    for _ in range(n_rungs - 1):
        slots.append(max(1, math.ceil(keep * slots[-1] - 1e-9)))
    return slots


@dataclass(frozen=True)
class Halving:
    """The static plan of a halving sweep: every rung's slots and the files that connect them.

    results/sweeps/{S}/{point}/halving/rung-0.json       each point's first rung (train_rung0)
    results/sweeps/{S}/halving/promotion-{r}.json        the survivors of rung r (promote)
    results/sweeps/{S}/halving/rung-{r}/slot-{k}.json    slot k of a middle rung r (train_rung)
    results/sweeps/{S}/finalist-{k}/                     slot k of the last rung: an experiment
                                                         (train_finalist, then merge, evaluation ...)
    """

    sweep: str
    rungs: tuple[int, ...]
    keep: float
    slots: tuple[int, ...]
    points: tuple[Experiment, ...]
    finalists: tuple[Experiment, ...]

    @property
    def folder(self) -> str:
        return f"results/sweeps/{self.sweep}/halving"

    @property
    def last(self) -> int:
        return len(self.rungs) - 1

    # The rules' output patterns; record() and promotion() fill them in.
    RUNG0_RECORD = "results/{point}/halving/rung-0.json"

    @property
    def slot_record(self) -> str:
        return self.folder + "/rung-{rung}/slot-{slot}.json"

    @property
    def promotion_file(self) -> str:
        return self.folder + "/promotion-{rung}.json"

    def record(self, rung: int, slot: int) -> str:
        """The record of slot ``slot`` of rung ``rung`` < last (at rung 0, a slot is a point)."""
        if rung == 0:
            return self.RUNG0_RECORD.format(point=self.points[slot].name)
        return self.slot_record.format(rung=rung, slot=slot)

    def records(self, rung: int) -> list[str]:
        return [self.record(rung, k) for k in range(self.slots[rung])]

    def promotion(self, rung: int) -> str:
        return self.promotion_file.format(rung=rung)

    def plan(self) -> dict:
        """What the leaderboard and halving.json read of the plan."""
        return {
            "rungs": list(self.rungs),
            "keep": self.keep,
            "slots": list(self.slots),
            "points": [p.name for p in self.points],
            "finalists": [f.name for f in self.finalists],
        }


FINALIST_RE = r"finalist-\d+"


def halving(config: dict, points: list[Experiment]) -> Halving | None:
    """The halving plan of a sweep with `strategy: halving` (None otherwise). The finalists are
    experiments of the sweep's base config: which point each one holds is decided at run time
    (its run.json and experiment.json name it)."""
    sweep = config.get("sweep")
    if not sweep or sweep["strategy"] != "halving":
        return None
    for p in points:
        problems = halving_point_problems(p.config)
        if problems:
            raise ConfigError(f"sweep point {p.name.rsplit('/', 1)[-1]}: {problems[0]}")
    rungs, keep = tuple(sweep["halving"]["rungs"]), sweep["halving"]["keep"]
    slots = tuple(halving_slots(len(points), keep, len(rungs)))
    base = sweep_base(config)
    finalists = tuple(layout(f"sweeps/{sweep['name']}/finalist-{k}", base) for k in range(slots[-1]))
    return Halving(sweep["name"], rungs, keep, slots, tuple(points), finalists)
