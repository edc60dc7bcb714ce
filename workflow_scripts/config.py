"""Config resolution: .env, `file:` sections, environment overrides, schema and key checks.

Called by the Snakefile at load time (before any job runs), and by tests. Loading must stay
fast (a no-op `snakemake -n` is expected in seconds), so the accepted TRL / PEFT keys and
their value types are read from ``trainer_keys.json`` (trainer_fields.py; regenerate with
``python -m workflow_scripts.trainer_fields --write``; a test checks it matches the installed
libraries) rather than importing TRL at every launch.
"""

import copy
import functools
import os
import re
import sys
from pathlib import Path

import yaml

from workflow_scripts import trainer_fields
from workflow_scripts.credentials import (
    SECRET_KEY_RE,
    TOKEN_INSIDE_RE,
    TOKEN_VALUE_RE,
    env_secrets,
    secret_values,
)
from workflow_scripts.data import templates

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"

FILE_SECTIONS = ("messages_format", "training", "peft")
# Environment variable -> (section, key) it overrides.
ENV_OVERRIDES = {
    "MODEL_ID": ("model", "id"),
    "DATASET": ("dataset", "id"),
    "SNAKETUNE_SLURM_PARTITION": ("resources", "slurm_partition"),
    "SNAKETUNE_SLURM_ACCOUNT": ("resources", "slurm_account"),
}


# Open mappings a user's config replaces as a whole instead of merging into the default's
# (Snakemake deep-merges --configfile into config.yaml; a dataset without the default's `cot`
# column must be able to drop it).
REPLACED_MAPPINGS = (
    ("messages_format", "training_columns"),
    ("messages_format", "evaluate_columns"),
    ("filters", "min_chars"),
    ("filters", "max_chars"),
)
# A name used as a folder: no `.`/`..`, no leading dot, nothing that breaks paths or job names.
SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Trainer keys that would let training talk to the Hub behind the opt-in push_to_hub rule.
HUB_TRAINING_KEYS = re.compile(r"^(push_to_hub.*|hub_.*)$")
# Shortest secret value looked for in the config (real HF / W&B tokens are 30+ characters; a short
# CI placeholder such as HF_TOKEN=test would otherwise match the split named `test`).
SECRET_MIN_CHARS = 8


class ConfigError(ValueError):
    pass


def check_safe_name(name: str, key: str) -> str:
    """``name`` unchanged if it is safe as one folder name; ConfigError naming ``key`` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{key}: {name!r} cannot be used as a folder name (letters, digits, `_`, `-`, `.`; "
            "not starting with `.`; `.` and `..` are refused)"
        )
    return name


def template_fields(template: str, where: str) -> list[str]:
    """Placeholder names of a config template (data/templates.py); a malformed one is a ConfigError."""
    try:
        return templates.template_fields(template, where)
    except templates.TemplateError as exc:
        raise ConfigError(str(exc)) from None


def load_env_file(path: str | os.PathLike = ".env") -> None:
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def merge_section_files(config: dict, base_dir: Path, user: dict) -> None:
    for section in FILE_SECTIONS:
        sec = config.get(section)
        if not isinstance(sec, dict) or not sec.get("file"):
            continue
        path = Path(sec["file"])
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"{section}.file: {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{section}.file: {path} must hold a mapping of {section} keys")
        # The file is the user's explicit choice: its keys replace the section's defaults.
        sec.update(loaded)
        user.setdefault(section, {}).update(copy.deepcopy(loaded))


def _user_value(user: dict, section: str, key: str):
    sec = user.get(section)
    return (True, sec[key]) if isinstance(sec, dict) and key in sec else (False, None)


def apply_replacements(config: dict, user: dict) -> None:
    """The user's open mappings replace the default's (Snakemake merged them key by key)."""
    for section, key in REPLACED_MAPPINGS:
        given, value = _user_value(user, section, key)
        if given:
            config.setdefault(section, {})[key] = copy.deepcopy(value)
    given_columns, _ = _user_value(user, "messages_format", "training_columns")
    if not given_columns:
        return
    for key in ("min_chars", "max_chars"):
        given, _ = _user_value(user, "filters", key)
        default = config.get("filters", {}).get(key)
        if not given and default:
            # The default's limits name the default's placeholders, not the user's.
            print(
                f"snaketune: filters.{key} of the default config ({default}) is not applied to your "
                f"messages_format.training_columns; set filters.{key} to filter your columns",
                file=sys.stderr,
            )
            config["filters"][key] = {}


def apply_env_overrides(config: dict) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        if os.environ.get(var):
            config.setdefault(section, {})[key] = os.environ[var]


def check_trainer_section(section: str, values: dict) -> None:
    """`training` / `peft`: key names and passed-through values (trainer_fields.py knows them)."""
    if found := trainer_fields.problems(section, values):
        raise ConfigError(found[0])


def check_semantics(config: dict) -> None:
    """Checks JSON schema cannot express; each names the key at fault."""
    from workflow_scripts import checks  # it reads ConfigError from here

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
    checks.check_home_paths(config)  # before any check expands a path
    checks.check_all(config, check_local_dataset(config["dataset"]))


def check_answer_regex(filters: dict) -> None:
    if filters.get("answer_regex") is not None:
        try:
            re.compile(filters["answer_regex"])
        except re.error as exc:
            raise ConfigError(
                f"filters.answer_regex: {filters['answer_regex']!r} is not a valid regex ({exc})"
            ) from None


def _walk(value, path: str):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def _strings(value, path: str):
    """(path, text, is_key) of every string in the config: mapping keys (before their values) and
    values, with numbers as text too."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path, str(k), True
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif value is not None and not isinstance(value, bool):
        yield path, str(value), False


def check_no_secrets(config: dict) -> None:
    """Secrets are never config (Snakemake records the config in .snakemake/metadata): a value under
    a key that names a credential, and a secret's value or a credential's shape anywhere inside a
    key or value is refused. Runs before every other check, so no error message echoes a secret
    (a refused key is named by the mapping that holds it)."""
    training = config.get("training")
    for key in training if isinstance(training, dict) else ():
        if HUB_TRAINING_KEYS.match(key):
            raise ConfigError(
                f"training.{key}: pushing to the Hub from the trainer is refused; the opt-in "
                "`push_to_hub` rule (hub.repo_id, private by default) is the one way out, and the "
                "token comes from HF_TOKEN in the environment or .env"
            )
    whole = {s for s in env_secrets() if len(s) >= SECRET_MIN_CHARS}
    inside = [s for s in secret_values() if len(s) >= SECRET_MIN_CHARS]
    for path, text, is_key in _strings(config, ""):
        if not text:
            continue
        # the key a value belongs to: `revision` for a sweep's `model.revision[0]` and for
        # `sweep.samples.space.model.revision.choice[0]`
        parts = re.sub(r"\[\d+\]", "", path).split(".")
        leaf = parts[-2] if len(parts) > 1 and parts[-1] in ("choice", "range", "log_range") else parts[-1]
        found = (
            text in whole
            or any(s in text for s in inside)
            or TOKEN_INSIDE_RE.search(text)
            or (TOKEN_VALUE_RE.match(text) and (is_key or not leaf.endswith("revision")))
            or (not is_key and SECRET_KEY_RE.match(leaf))
        )
        if found:
            where = f"a key of {path or 'the top level'}" if is_key else path
            raise ConfigError(
                f"{where}: looks like a secret or holds one; secrets are never config (they would be "
                "recorded in .snakemake/metadata). Put it in .env or the environment (HF_TOKEN, WANDB_API_KEY)"
            )


def check_local_dataset(dataset: dict) -> dict[str, list[str]] | None:
    """A local dataset's files per split are known at load: an unrecognised file fails here.
    Returns them (None for a Hub dataset)."""
    from workflow_scripts.data.sources import (
        SourceError,
        check_hub_data_files,
        local_split_files,
        looks_local,
    )

    try:
        if not looks_local(dataset["id"]):
            check_hub_data_files(dataset)
            return None
        if dataset["split_names"]:
            raise ConfigError(
                "dataset.split_names: only for Hub datasets; name local files with dataset.data_files"
            )
        return local_split_files(dataset)[0]
    except SourceError as exc:
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


def resolve(config: dict, base_dir: str | os.PathLike = ".", validate=None, user: dict | None = None) -> dict:
    """Resolve ``config`` in place and return it.

    ``validate`` is snakemake.utils.validate; ``user`` is what the user gave on top of
    config.yaml (Snakemake's ``workflow.config_settings.overwrite_config``: --configfile and
    --config merged), used to replace rather than merge the open mappings.
    """
    base_dir = Path(base_dir)
    user = copy.deepcopy(user or {})
    load_env_file(base_dir / ".env")
    for section in FILE_SECTIONS:  # `file:` is documented per section; tolerate a missing section
        config.setdefault(section, {})
    merge_section_files(config, base_dir, user)
    apply_replacements(config, user)
    apply_env_overrides(config)
    if config.get("sweep") is None:  # null disables a sweep; the schema's defaults need a mapping
        config.pop("sweep", None)
    check_no_secrets(config)  # first: later error messages quote values
    check_schema(config)
    if validate is None:
        from snakemake.utils import validate
    validate(config, str(SCHEMA_FILE))  # fills the schema's defaults in place
    config.setdefault("sweep", None)
    check_semantics(config)
    # once per load, not per sweep point: general_ability is not a sweepable section
    from workflow_scripts.evaluation.general_items import check_general_ability  # it reads ConfigError

    check_general_ability(config["general_ability"])
    sort_keys({k: v for k, v in config.items() if k != "sweep"})  # a sweep's grid keeps its order
    return config


def revalidate(config: dict) -> dict:
    """Check an already resolved config again after keys were changed (a sweep point without
    its `sweep` section)."""
    check_no_secrets(config)
    check_schema(config)
    check_semantics(config)
    sort_keys(config)
    return config


def sort_keys(value) -> None:
    """Every mapping in key order, in place: params written with keys in another order are equal
    (Snakemake compares params by repr, so order alone would re-run a stage)."""
    if isinstance(value, dict):
        items = sorted(value.items())
        value.clear()
        value.update(items)
        for v in value.values():
            sort_keys(v)
    elif isinstance(value, list):
        for v in value:
            sort_keys(v)


def coerce_cli_strings(value, schema: dict):
    """`--config 'hub={dry_run: true}'` arrives as strings (Snakemake parses nested values with
    YAML's BaseLoader); turn them into the booleans/numbers/nulls the schema asks for."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k) or (extra if isinstance(extra, dict) else {})
            value[k] = coerce_cli_strings(v, sub)
        return value
    if isinstance(value, list):
        return [coerce_cli_strings(v, schema.get("items", {})) for v in value]
    if not isinstance(value, str):
        return value
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    lowered = value.strip().lower()
    if "null" in types and lowered in ("null", "~"):
        return None  # YAML's spellings of null (Snakemake reads nested --config values as text)
    if "string" in types:
        return value
    if "boolean" in types and lowered in ("true", "false"):
        return lowered == "true"
    for kind, cast in (("integer", int), ("number", float)):
        if kind in types:
            try:
                return cast(value)
            except ValueError:
                pass
    return value


@functools.cache
def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def schema_default(key: str):
    """The schema's default of a dotted config key (``evaluation.max_new_tokens``): code that needs
    a config default outside a resolved config reads it here instead of restating it."""
    node = load_schema()
    for part in key.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            raise KeyError(f"{key}: not a key of {SCHEMA_FILE.name}")
    if "default" not in node:
        raise KeyError(f"{key}: has no default in {SCHEMA_FILE.name}")
    return copy.deepcopy(node["default"])


def check_schema(config: dict) -> None:
    """Validate against the schema; the error names the config key at fault."""
    import jsonschema

    schema = load_schema()
    coerce_cli_strings(config, schema)
    from workflow_scripts import checks  # it reads ConfigError from here

    checks.check_finite(config)  # NaN passes every `minimum`; one message for every non-finite number
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        key = ".".join(filter(None, [path, extra[0] if extra else ""]))
        raise ConfigError(f"config key {key}: unknown key ({error.message})")
    raise ConfigError(f"config key {path or '(top level)'}: {error.message}")


def load_and_resolve(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """For tests and tools: read a config file, merge overrides the way Snakemake merges a
    --configfile into config.yaml, resolve."""
    from snakemake.utils import update_config

    config = yaml.safe_load(Path(path).read_text())
    update_config(config, copy.deepcopy(overrides or {}))  # deep, exactly as Snakemake merges
    return resolve(config, Path(path).parent, user=overrides)
