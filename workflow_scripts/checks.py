"""Load-time checks of inputs the schema cannot judge: each class of bad input is refused as a class.

- numbers: every number in the config is finite (`.nan` passes `minimum` checks, `.inf` passes
  `exclusiveMinimum`);
- names: a name used as a folder fits a path component with room to spare, and never takes a
  folder the workflow itself uses under results/;
- every file the config names exists when the workflow loads (model.id as a local path,
  evaluation.bertscore_model, training.accelerate_config);
- no split is left empty by the carving ratios (with the rows of local files where they are
  cheap to count);
- generation fits the model's context window where the window is known at load (a local model);
- the sections the schema only shapes: TRL / PEFT keys and values (read from ``trainer_keys.json``,
  trainer_fields.py: importing TRL at every launch would make a no-op `snakemake -n` slow), the
  split ratios, the messages format and filters, a local dataset's files, the general-ability tasks.

Each check raises ConfigError with one line naming the key, file or value at fault, before any
job runs. config.py runs `check_semantics` after the schema (also for every sweep point, through
`config.revalidate`) and `check_general_ability` once per load.
"""

import json
import math
import re
from pathlib import Path

from workflow_scripts import layout, trainer_fields
from workflow_scripts.data import sources, templates
from workflow_scripts.errors import ConfigError

# general_ability.tasks is checked by the task readers themselves (they know lm-eval's formats)
from workflow_scripts.evaluation.general_items import check_general_ability  # noqa: F401

# A path component holds 255 bytes on common filesystems (ext4, xfs, btrfs, APFS, NTFS). A name
# the user gives becomes part of longer components (`{model}-{experiment}-q8_0.gguf`, hidden
# `.{name}.tmp-xxxxxxxx` siblings), so each is kept well below: two names plus suffixes still fit.
NAME_MAX_CHARS = 100
# Folders of results/ the workflow itself writes: an experiment of that name would mix its
# artifacts into them (`sweeps` next to a sweep named like a stage folder would nest one in the other).
RESERVED_EXPERIMENT_NAMES = (layout.SHARED_FOLDER, layout.SWEEPS)


def check_finite(config: dict) -> None:
    """Every number in the config is finite (also inside TRL/PEFT fields and sweep values)."""
    for path, value in walk(config, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {value} is not a finite number (.nan and .inf are refused)")


def check_name_length(name: str, key: str, limit: int = NAME_MAX_CHARS) -> str:
    if len(name.encode()) > limit:
        raise ConfigError(
            f"{key}: {name[:40]!r}... is {len(name.encode())} characters; at most {limit} "
            "(a folder name must fit a path component with the file names built from it)"
        )
    return name


def check_names(config: dict) -> None:
    """Names the user gives: safe as a folder name, not too long, not reserved for the workflow's
    own folders. (model.id is checked as a file or Hub id by check_named_files.)"""
    experiment = layout.check_safe_name(config["experiment"], "experiment")
    if config["model"].get("name") is not None:
        layout.check_safe_name(config["model"]["name"], "model.name")
    check_name_length(experiment, "experiment")
    if experiment.lower() in RESERVED_EXPERIMENT_NAMES:
        raise ConfigError(
            f"experiment: {experiment!r} is a folder the workflow uses ({layout.experiment_root(experiment.lower())}/); "
            f"choose another name (reserved: {', '.join(RESERVED_EXPERIMENT_NAMES)})"
        )
    for section, key in (("model", "name"), ("export", "name")):
        value = (config.get(section) or {}).get(key)
        if isinstance(value, str):
            check_name_length(value, f"{section}.{key}")
    sweep = config.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("name"), str):
        check_name_length(sweep["name"], "sweep.name")


# ---------------------------------------------------------------- files the config names


def looks_like_path(value: str) -> bool:
    """A model reference that can only be a local path: a Hub id is `name` or `org/name`."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.endswith(".gguf")
        or value.count("/") > 1
        or "\\" in value
        or Path(value).expanduser().exists()
    )


def check_hub_id(value: str, key: str) -> None:
    """A Hub id the Hub would accept (huggingface_hub's own rule), before any job asks for it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ConfigError(f"{key}: {value!r} is neither a local path nor a Hub id ({exc})") from None


def check_model_reference(value: str, key: str) -> None:
    """A local model (folder or .gguf file) exists and is one; a Hub id is well-formed."""
    if value.startswith("embedded:"):
        return
    if not looks_like_path(value):
        check_hub_id(value, key)
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{key}: local path {value} does not exist (a Hub id is `name` or `org/name`, an embedded "
            "model `embedded:<name>`)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ConfigError(
            f"{key}: {path} is a file but not a .gguf file; give a model folder or a .gguf file"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{key}: folder {path} has no config.json (not a Hugging Face model folder)")


def check_named_files(config: dict) -> None:
    check_model_reference(config["model"]["id"], "model.id")
    check_model_reference(config["evaluation"]["bertscore_model"], "evaluation.bertscore_model")
    accelerate = config["training"].get("accelerate_config")
    if accelerate:  # read by `accelerate launch` in the job's working directory
        path = Path(accelerate).expanduser()
        if not path.is_file():
            raise ConfigError(f"training.accelerate_config: file {path.absolute()} does not exist")


# ---------------------------------------------------------------- splits


def check_split_sizes(dataset: dict, found: dict[str, list[str]] | None) -> None:
    """No split is carved empty. ``found``: a local dataset's files per split (None for the Hub)."""
    ratios = dataset["split"]
    if found is None:  # a Hub dataset: its splits are known only once downloaded, unless named
        names = dataset.get("split_names")
        if not names:
            return
        present = {s for s in sources.SPLITS if names.get(s)}
    else:
        present = set(found)
    missing = [s for s in ("validation", "test") if s not in present]
    if not missing:
        return
    for s in ["train", *missing]:
        if ratios[s] <= 0:
            raise ConfigError(
                f"dataset.split.{s}: {ratios[s]} leaves the {s} split empty (it is carved out of train "
                f"with the ratios; splits that come from files: {', '.join(sorted(present))})"
            )
    if found is None:
        return
    rows = sources.count_rows(found["train"])
    if rows is None:  # not cheap to count (csv, json arrays, large files): download_dataset checks
        return
    counts = sources.carve_counts(rows, ratios, missing)
    for s, n in counts.items():
        if n == 0:
            raise ConfigError(
                f"dataset.split.{s}: {ratios[s]} of the {rows} train rows leaves the {s} split empty "
                f"(rows per split would be {json.dumps(counts)})"
            )


# ---------------------------------------------------------------- generation


def local_context_window(model_id: str) -> int | None:
    """The context window of a local Hugging Face model folder (its config.json), else None."""
    path = Path(model_id).expanduser()
    if model_id.startswith("embedded:") or not (path / "config.json").is_file():
        return None
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.id: {path / 'config.json'} cannot be read as JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"model.id: {path / 'config.json'} is not a JSON object")
    cfg = cfg.get("text_config") or cfg
    window = cfg.get("max_position_embeddings")
    return window if isinstance(window, int) and window > 0 else None


def check_generation_length(config: dict) -> None:
    """max_new_tokens (plus at least one prompt token) fits the model's context window, where it is
    known at load; the generator checks each prompt against it again (evaluation/generate.py)."""
    window = local_context_window(config["model"]["id"])
    new = config["evaluation"]["max_new_tokens"]
    if window is not None and new >= window:
        raise ConfigError(
            f"evaluation.max_new_tokens: {new} does not fit the context window of model.id "
            f"({window} tokens, prompt included)"
        )


def check_home_paths(config: dict) -> None:
    """A `~user/...` path names a user this machine knows (Path.expanduser would raise mid-check)."""
    for path, value in walk(config, ""):
        if isinstance(value, str) and value.startswith("~"):
            try:
                Path(value).expanduser()
            except RuntimeError:
                raise ConfigError(
                    f"{path}: {value!r} starts with ~ but names no home folder of this machine"
                ) from None


def check_all(config: dict, local_files: dict[str, list[str]] | None) -> None:
    """The checks after the schema's (check_finite runs first, before any arithmetic on values)."""
    check_names(config)
    check_named_files(config)
    if local_files is None:
        check_hub_id(config["dataset"]["id"], "dataset.id")
    check_split_sizes(config["dataset"], local_files)
    check_generation_length(config)


def template_fields(template: str, where: str) -> list[str]:
    """Placeholder names of a config template (data/templates.py); a malformed one is a ConfigError."""
    try:
        return templates.template_fields(template, where)
    except templates.TemplateError as exc:
        raise ConfigError(str(exc)) from None


def check_trainer_section(section: str, values: dict) -> None:
    """`training` / `peft`: key names and passed-through values (trainer_fields.py knows them)."""
    if found := trainer_fields.problems(section, values):
        raise ConfigError(found[0])


def check_semantics(config: dict) -> None:
    """Checks JSON schema cannot express; each names the key at fault."""
    for section in ("training", "peft"):
        check_trainer_section(section, config[section])

    split = config["dataset"]["split"]
    total = split["train"] + split["validation"] + split["test"]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"dataset.split: train + validation + test must sum to 1, got {total:g} "
            f"({split['train']} + {split['validation']} + {split['test']})"
        )

    check_messages_format(config["messages_format"], config["filters"])
    check_answer_regex(config["filters"])
    check_home_paths(config)  # before any check expands a path
    check_all(config, check_local_dataset(config["dataset"]))


def check_answer_regex(filters: dict) -> None:
    if filters.get("answer_regex") is not None:
        try:
            re.compile(filters["answer_regex"])
        except re.error as exc:
            raise ConfigError(
                f"filters.answer_regex: {filters['answer_regex']!r} is not a valid regex ({exc})"
            ) from None


def walk(value, path: str):
    """(dotted path, value) of every leaf of the config."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, value


def check_local_dataset(dataset: dict) -> dict[str, list[str]] | None:
    """A local dataset's files per split are known at load: an unrecognised file fails here.
    Returns them (None for a Hub dataset)."""
    try:
        if not sources.is_local_dataset(dataset["id"]):
            sources.check_hub_data_files(dataset)
            return None
        if dataset["split_names"]:
            raise ConfigError(
                "dataset.split_names: only for Hub datasets; name local files with dataset.data_files"
            )
        return sources.local_split_files(dataset)[0]
    except sources.SourceError as exc:
        raise ConfigError(str(exc)) from None


def check_messages_format(mf: dict, filters: dict) -> None:
    """Templates use only defined placeholders; filters name only placeholders."""
    messages = mf["messages_format"]["messages"]
    if messages[-1]["role"] != "assistant":
        raise ConfigError(
            "messages_format.messages_format.messages: the last message must be the assistant's"
        )
    user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user_turns:
        raise ConfigError(
            "messages_format.messages_format.messages: no user message; the prompt needs a user turn "
            "with a {placeholder} of a question column"
        )
    defined = set(mf["training_columns"]) | {"system_prompt"}
    for i, msg in enumerate(messages):
        where = f"messages_format.messages_format.messages[{i}].content"
        for name in template_fields(msg["content"], where):
            if name not in defined:
                raise ConfigError(
                    f"{where}: unknown placeholder {{{name}}}; defined names: {', '.join(sorted(defined))}"
                )
            if name == "system_prompt" and mf["messages_format"].get("system_prompt") is None:
                raise ConfigError(
                    f"{where}: uses {{system_prompt}} but messages_format.system_prompt is not set"
                )
    row_names = set(mf["training_columns"])
    for i, role in ((user_turns[-1], "user"), (len(messages) - 1, "assistant")):
        where = f"messages_format.messages_format.messages[{i}].content"
        if not set(template_fields(messages[i]["content"], where)) & row_names:
            raise ConfigError(
                f"{where}: the {role} message has no placeholder of a column "
                f"({', '.join(sorted(row_names))}); every row would get the same {role} text"
            )
    names = ", ".join(sorted(mf["training_columns"]))
    for key in ("min_chars", "max_chars"):
        for name in filters.get(key) or {}:
            if name not in mf["training_columns"]:
                raise ConfigError(f"filters.{key}.{name}: not a placeholder name; names: {names}")
